// The Q8_0 matvec of one decode token in CUDA C, compiled at run time by NVRTC (CuPy), with
// common.cuh in front. Host side and dispatch: ds4tp/kernels/cuda_matvec.py. Twins:
// ops.linear_torch, ops.grouped_linear_torch, ops.linear_normed_torch.
//
// The weight is read in the split layout (triton_matvec.q8_0_split: the GGUF bytes re-laid out
// once as int8 quants [N, K] and f16 scales [N, K/32]), so every row is 16-byte aligned. The
// block quantises its input to Q8_0 in shared memory exactly as numerics.q8_0_act does (after
// an RMS norm as numerics.rms_norm, when asked); each 32-block's product is an exact dp4a
// integer, scaled by d_x * d_w in float32: the twin's result up to float32 summation order.
//
// One warp owns a whole row (no split K, no workspace): lane l reads the row's 16-byte pieces
// l, l+32, ... (half a 32-block each; lane pairs add their integer halves). With rows shorter
// than LOADS pieces per lane, a warp reads several rows per step, so every lane always has
// LOADS 16-byte loads in flight.

#ifndef WARPS
#define WARPS 8                 // warps per block; the host compiles and launches with the same
#endif
#define MAX_K 16384             // inputs per row (per group)
#ifndef LOADS
#define LOADS 8                 // 16-byte loads in flight per lane per step (a power of two)
#endif
#ifndef MINB
#define MINB 0                  // blocks per SM the register allocation must allow (0: ptxas' choice)
#endif
#if MINB > 0
#define BOUNDS __launch_bounds__(WARPS * 32, MINB)
#else
#define BOUNDS __launch_bounds__(WARPS * 32)
#endif

// Rows row0 .. row0+nrows-1 of a weight with K = 512 * CPR inputs (CPR 16-byte pieces per lane
// per row); warp w owns rows w, w+WARPS, ... of them. A step loads U pieces of each of R rows
// (U * R = LOADS) before using any.
template <int CPR>
__device__ __forceinline__ void q8_0_rows(const signed char* __restrict__ q,
                                          const unsigned short* __restrict__ d,
                                          const signed char* s_q, const float* s_d,
                                          float* __restrict__ y, long long row0, int nrows,
                                          int lane, int warp) {
    constexpr int U = CPR < LOADS ? CPR : LOADS;
    constexpr int R = LOADS / U;
    constexpr int K = 512 * CPR;
    for (int j0 = warp; j0 < nrows; j0 += WARPS * R) {
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.0f;
        for (int c0 = 0; c0 < CPR; c0 += U) {
            int4 v[R][U];
            unsigned short dh[R][U];
#pragma unroll
            for (int r = 0; r < R; r++) {
                const bool ok = j0 + r * WARPS < nrows;
                const long long row = row0 + j0 + r * WARPS;
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int c = c0 + u;
                    v[r][u] = ok ? wld((const int4*)(q + row * K) + 32 * c + lane) : make_int4(0, 0, 0, 0);
                    dh[r][u] = ok ? wld(d + row * (K / 32) + 16 * c + (lane >> 1)) : (unsigned short)0;
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
#pragma unroll
                for (int u = 0; u < U; u++) acc[r] += q8_0_piece(v[r][u], dh[r][u], s_q, s_d, c0 + u, lane);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float t = warp_sum(acc[r]);
            if (lane == 0 && j0 + r * WARPS < nrows) y[row0 + j0 + r * WARPS] = t;
        }
    }
}

#ifndef Q_PRE
#define Q_PRE 1                 // steps of the warp's first rows prefetched before the wait (0: all)
#endif

// The first Q_PRE steps' pieces of this warp's first rows into L2 (Q_PRE 0: every step of them),
// so that they arrive while the block quantises its input (and, launched with PDL, while the
// kernel ahead finishes).
template <int CPR>
__device__ __forceinline__ void q8_0_prefetch(const signed char* q, long long row0, int nrows,
                                              int lane, int warp) {
    constexpr int U = CPR < LOADS ? CPR : LOADS;
    constexpr int R = LOADS / U;
    constexpr int S = (Q_PRE == 0 || Q_PRE * U > CPR) ? CPR / U : Q_PRE;
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (warp + r * WARPS < nrows) {
            const signed char* p = q + (row0 + warp + r * WARPS) * (512LL * CPR);
#pragma unroll
            for (int u = 0; u < U * S; u++) l2_prefetch_warp(p + 512 * u, lane);
        }
    }
}

template <int CPR>
__device__ __forceinline__ void q8_0_block(const signed char* q, const unsigned short* d,
                                           const float* x, const float* nw, float eps, float clamp,
                                           float* y, long long row0, int nrows, signed char* s_q,
                                           float* s_d, double* s_red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    q8_0_prefetch<CPR>(q, row0, nrows, lane, warp);
    pdl_wait();                       // x is the kernel ahead's output (PDL: ds4tp.kernels.pdl)
    q8_0_prologue<WARPS>(x, nw, eps, clamp, 512 * CPR, s_q, s_d, s_red);
    q8_0_rows<CPR>(q, d, s_q, s_d, y, row0, nrows, lane, warp);
}

// y[n] = sum_k w[n, k] * x_g[k] for the rows n of group g = n / rows_per_group, x_g = x + g*K
// (nw: rms_norm(x_g, nw) instead; clamp > 0: swiglu_clamped(x[:K], x[K:2K]) instead; one
// group). Grid (cdiv(rows_per_group, rpb), groups); block b of group g owns rows
// g*rows_per_group + b*rpb + 0 .. rpb-1.
// Requires (host-checked): K = 512 * 2^i <= MAX_K, q and x 16-byte aligned, contiguous.
__device__ __forceinline__ void
q8_0_matvec_body(const signed char* __restrict__ q, const unsigned short* __restrict__ d,
                 const float* x, const float* __restrict__ nw, float eps, float clamp,
                 float* __restrict__ y, int K, int rows_per_group, int rpb, int bx) {
    __shared__ __align__(16) signed char s_q[MAX_K];
    __shared__ float s_d[MAX_K / 32];
    __shared__ double s_red[WARPS];
    pdl_trigger();                    // all blocks resident: the next kernel may launch
    const int g = blockIdx.y;
    const int first = bx * rpb;
    const int nrows = min(rpb, rows_per_group - first);
    const long long row0 = (long long)g * rows_per_group + first;
    const float* xg = x + (long long)g * K;
    switch (K >> 9) {
        case 1: q8_0_block<1>(q, d, xg, nw, eps, clamp, y, row0, nrows, s_q, s_d, s_red); break;
        case 2: q8_0_block<2>(q, d, xg, nw, eps, clamp, y, row0, nrows, s_q, s_d, s_red); break;
        case 4: q8_0_block<4>(q, d, xg, nw, eps, clamp, y, row0, nrows, s_q, s_d, s_red); break;
        case 8: q8_0_block<8>(q, d, xg, nw, eps, clamp, y, row0, nrows, s_q, s_d, s_red); break;
        case 16: q8_0_block<16>(q, d, xg, nw, eps, clamp, y, row0, nrows, s_q, s_d, s_red); break;
        case 32: q8_0_block<32>(q, d, xg, nw, eps, clamp, y, row0, nrows, s_q, s_d, s_red); break;
    }
}
extern "C" __global__ void BOUNDS
q8_0_matvec(const signed char* __restrict__ q, const unsigned short* __restrict__ d,
            const float* x, const float* __restrict__ nw, float eps, float clamp,
            float* __restrict__ y, int K, int rows_per_group, int rpb) {
    q8_0_matvec_body(q, d, x, nw, eps, clamp, y, K, rows_per_group, rpb, blockIdx.x);
}

// q8_0_matvec with the next HC update's Sinkhorn as one more block (one group; the grid is one
// block wider: common.cuh hc_sinkhorn_block). The launch ends only when it has run, so the
// kernels after it on the stream read post and M with no join.
extern "C" __global__ void BOUNDS
q8_0_matvec_mix(const signed char* __restrict__ q, const unsigned short* __restrict__ d,
                const float* x, const float* __restrict__ nw, float eps, float clamp,
                float* __restrict__ y, int K, int rows_per_group, int rpb,
                const float* mz, const float* __restrict__ ms, const float* __restrict__ mb,
                float* mpost, float* mm, float meps, int miters) {
    if (hc_sinkhorn_block(mz, ms, mb, mpost, mm, meps, miters)) return;
    q8_0_matvec_body(q, d, x, nw, eps, clamp, y, K, rows_per_group, rpb, blockIdx.x - MIX_FIRST);
}

// y[n] = sum_k f32(w[n, k]) * x[k], float32 FMAs, for one token: the F16 matvec (the MoE router,
// 4096 -> 256, and the other one-token F16 linears). w F16 [N, K] with row stride sw (elements,
// a multiple of 8), K = 1024 * S, S <= 16. Warp j of a row takes elements 1024j .. 1024j+1023:
// lane l the 8-element pieces 32p + l (p < 4), 16-byte loads issued before the PDL wait (weights
// only), then x's same pieces from L2. A row's S warp sums are added in order j = 0..S-1.
// Block: R rows, S*R warps (<= 16); grid cdiv(N, R).
extern "C" __global__ void __launch_bounds__(512)
f16_matvec(const unsigned short* __restrict__ w, long long sw, const float* x,
           float* __restrict__ y, int N, int K, int R) {
    __shared__ float s_part[16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int S = K >> 10;
    const int r = warp / S, j = warp % S;
    const long long n = (long long)blockIdx.x * R + r;
    const bool ok = n < N;
    pdl_trigger();                    // all blocks resident: the next kernel may launch
    uint4 wv[4];
#pragma unroll
    for (int p = 0; p < 4; p++)
        wv[p] = ok ? wld((const uint4*)(w + n * sw + 1024 * j + 8 * (32 * p + lane))) : make_uint4(0, 0, 0, 0);
    pdl_wait();                       // x is the kernel ahead's output
    float acc = 0.0f;
    if (ok) {
#pragma unroll
        for (int p = 0; p < 4; p++) {
            const float4* xp = (const float4*)(x + 1024 * j + 8 * (32 * p + lane));
            const float4 a = prior(xp), b = prior(xp + 1);
            const float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            const unsigned ws[4] = {wv[p].x, wv[p].y, wv[p].z, wv[p].w};
#pragma unroll
            for (int i = 0; i < 8; i++)
                acc = fmaf(h2f((unsigned short)(ws[i >> 1] >> (16 * (i & 1)))), xs[i], acc);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) s_part[warp] = acc;
    __syncthreads();
    if (ok && j == 0 && lane == 0) {
        float t = 0.0f;
        for (int i = 0; i < S; i++) t += s_part[r * S + i];
        y[n] = t;
    }
}
