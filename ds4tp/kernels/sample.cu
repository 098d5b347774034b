// One token's random draw over its sorted logits, in two launches (host side:
// ds4tp/kernels/cuda_sample.py; twin: ds4tp.worker.sampling._draw_torch, the same rule).
//
// Inputs: x [V] float64 (logits plus logit_bias) and ids [V], the token ids in descending order
// of x (ties: lower id first; a stable sort's). With z = x / T and e_j = exp(z_{ids[j]} - z_max),
// the kept set is a prefix of the sorted order, of length n = min(top_k (if on), n_p, n_m):
// top_p keeps positions whose mass before them is below top_p x the mass of what top_k kept
// (all: S), min_p keeps positions with e_j >= min_p (e of the most likely is 1). The draw is the
// first kept position whose running mass c_j exceeds u x the kept mass (none, by rounding: the
// last kept). Running masses are sums in sorted order.
// draw_sum: block b sums e over sorted positions [b*DT*PER, ...) into part[b] (S is their sum);
// draw_scan, one block: the rest, stepping over whole blocks that cannot hold the position it
// looks for by their sums (a block scanned or stepped over rounds its running sum differently,
// so the two may differ only where a threshold lies within rounding of a block's end).
// Every sum has a fixed order (no atomics), so every rank draws the same token from the same
// logits.

#define DT 1024                 // threads of a block
#define PER 4                   // elements a thread takes per step
#define BIG 0x7fffffff

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// e of sorted position j: exp(z - z_max), z = x / T (zm = z_max), as every sum here takes it
template <typename I>
__device__ __forceinline__ double e_at(const double* x, const long long* ids, I j, double T, double zm) {
    return exp(prior(x + prior(ids + j)) / T - zm);
}

extern "C" __global__ void __launch_bounds__(DT)
draw_sum(const double* x, const long long* ids, double* part, double T, int V) {
    __shared__ double s_w[DT / 32];
    pdl_trigger();
    pdl_wait();                       // x and ids are earlier kernels' outputs
    const double zm = prior(x + prior(ids)) / T;
    const long long i0 = ((long long)blockIdx.x * DT + threadIdx.x) * PER;
    double s = 0.0;
#pragma unroll
    for (int k = 0; k < PER; k++)
        if (i0 + k < V) s += e_at(x, ids, i0 + k, T, zm);
    s = warp_sum_d(s);
    if ((threadIdx.x & 31) == 0) s_w[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int w = 0; w < DT / 32; w++) t += s_w[w];
        part[blockIdx.x] = t;
    }
}

// The shortest prefix [0, L) of [0, n) that ends at the first position j with c_j >= ge, c_j > gt
// or (then L = j) e_j < lt, and c_{L-1} (0 for L = 0): L = n where none holds. Whole block.
__device__ void prefix(const double* x, const long long* ids, const double* part, double T,
                       double zm, int n, double ge, double gt, double lt, int& L, double& mass,
                       double* s_w, double* s_c, int* s_len) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    double carry = 0.0;
    L = n;
    mass = 0.0;
    for (int j0 = 0; j0 < n; j0 += DT * PER) {
        if (j0 + DT * PER <= n) {     // a whole block: stepped over where nothing in it can stop
            const double c_end = carry + prior(part + j0 / (DT * PER));
            const double e_end = e_at(x, ids, j0 + DT * PER - 1, T, zm);
            if (!(c_end >= ge || c_end > gt || e_end < lt)) {   // (uniform over the block)
                carry = c_end;
                mass = carry;
                continue;
            }
        }
        const int jt = j0 + threadIdx.x * PER;
        double e[PER], l[PER], run = 0.0;
#pragma unroll
        for (int k = 0; k < PER; k++) {
            e[k] = jt + k < n ? e_at(x, ids, jt + k, T, zm) : 0.0;
            run += e[k];
            l[k] = run;                               // this thread's running sum
        }
        double inc = run;                             // block scan of the threads' sums
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double v = __shfl_up_sync(FULL, inc, o);
            if (lane >= o) inc += v;
        }
        if (lane == 31) s_w[warp] = inc;
        if (threadIdx.x == 0) *s_len = BIG;
        __syncthreads();
        if (warp == 0) {
            double w = s_w[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const double v = __shfl_up_sync(FULL, w, o);
                if (lane >= o) w += v;
            }
            s_w[lane] = w;                            // inclusive over warps
        }
        __syncthreads();
        const double off = carry + ((warp ? s_w[warp - 1] : 0.0) + (inc - run));
        int cand = BIG;
        double c[PER];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            c[k] = off + l[k];
            const int j = jt + k;
            if (j < n) {
                if (e[k] < lt) cand = min(cand, j);
                else if (c[k] >= ge || c[k] > gt) cand = min(cand, j + 1);
            }
        }
        if (cand != BIG) atomicMin(s_len, cand);
        if (threadIdx.x == DT - 1) s_c[0] = c[PER - 1];  // the step's last running sum
        __syncthreads();
        const int len = *s_len;
        if (len != BIG) {                             // c_{len-1}: in this step or the carry
#pragma unroll
            for (int k = 0; k < PER; k++)
                if (jt + k == len - 1) s_c[1] = c[k];
            __syncthreads();
            L = len;
            mass = len - 1 < j0 ? carry : s_c[1];
            return;
        }
        carry = s_c[0];
        mass = carry;
        __syncthreads();                              // (s_w, s_c, s_len are reused)
    }
}

extern "C" __global__ void __launch_bounds__(DT)
draw_scan(const double* x, const long long* ids, const double* part, int P, long long* tok,
          double T, int top_k, double top_p, double min_p, double u, int V) {
    __shared__ double s_w[DT / 32], s_c[2];
    __shared__ int s_len;
    pdl_trigger();
    pdl_wait();                       // x, ids and part are earlier kernels' outputs
    const double zm = prior(x + prior(ids)) / T;
    double S = 0.0;
    for (int b = 0; b < P; b++) S += prior(part + b);   // (every thread, the same order)
    const double inf = __longlong_as_double(0x7ff0000000000000ll);
    int n = top_k > 0 && top_k < V ? top_k : V, L;
    double base = S, mass;
    if (top_k > 0) {                  // the mass of what top_k keeps
        prefix(x, ids, part, T, zm, n, inf, inf, -inf, L, base, s_w, s_c, &s_len);
    }
    double keep = base;
    if ((top_p > 0.0 && top_p < 1.0) || min_p > 0.0) {
        prefix(x, ids, part, T, zm, n, top_p > 0.0 && top_p < 1.0 ? top_p * base : inf, inf,
               min_p > 0.0 ? min_p : -inf, L, mass, s_w, s_c, &s_len);
        n = max(L, 1);
        keep = mass;
    }
    prefix(x, ids, part, T, zm, n, inf, u * keep, -inf, L, mass, s_w, s_c, &s_len);
    if (threadIdx.x == 0) tok[0] = prior(ids + max(L, 1) - 1);
}
