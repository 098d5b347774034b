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

// x [K] (16-byte aligned) -> Q8_0 in shared memory: s_q int8 [K], s_d float32 [K/32]. With nw,
// x is RMS-normed first: float64 sum of squares, the mean rounded to float32, correctly rounded
// sqrt and reciprocal, then (x * s) * nw. With clamp > 0, x is [2K] (gate, then up) and the input
// is numerics.swiglu_clamped of its halves: g = min(gate, c), u = clamp(up, -c, c), (g *
// sigmoid(g)) * u, sigmoid(g) = 1 / (1 + exp(-g)). Per 32-block: d = amax/127 and 1/d correctly
// rounded, q = rint(clamp(x * (1/d), -128, 127)).
__device__ __forceinline__ void q8_0_prologue(const float* x, const float* __restrict__ nw,
                                              float eps, float clamp, int K, signed char* s_q,
                                              float* s_d, double* s_red) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float rs = 1.0f;
    if (nw != 0) {
        double acc = 0.0;
        for (int i = 4 * tid; i < K; i += 4 * WARPS * 32) {
            const float4 v = prior((const float4*)(x + i));
            acc += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL, acc, o);
        if (lane == 0) s_red[warp] = acc;
        __syncthreads();
        double tot = 0.0;
        for (int w = 0; w < WARPS; w++) tot += s_red[w];          // same order in every thread
        const float ms = (float)(tot / (double)K);
        rs = __fdiv_rn(1.0f, __fsqrt_rn(ms + eps));
    }
    // four lanes per 32-block, 8 elements each (K/8 is a multiple of 64, so a warp's lanes are
    // all in the loop or all out of it)
    for (int i = tid; i < K / 8; i += WARPS * 32) {
        const float4 a = prior((const float4*)(x + 8 * i)), c = prior((const float4*)(x + 8 * i + 4));
        float v[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
        if (clamp > 0.0f) {
            const float4 ua = prior((const float4*)(x + K + 8 * i)), uc = prior((const float4*)(x + K + 8 * i + 4));
            const float u[8] = {ua.x, ua.y, ua.z, ua.w, uc.x, uc.y, uc.z, uc.w};
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float g = fminf(v[j], clamp);
                const float sg = __fdiv_rn(1.0f, 1.0f + expf(-g));
                v[j] = __fmul_rn(__fmul_rn(g, sg), fminf(fmaxf(u[j], -clamp), clamp));
            }
        }
        if (nw != 0) {
            const float4 na = *(const float4*)(nw + 8 * i), nc = *(const float4*)(nw + 8 * i + 4);
            const float n[8] = {na.x, na.y, na.z, na.w, nc.x, nc.y, nc.z, nc.w};
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = __fmul_rn(__fmul_rn(v[j], rs), n[j]);
        }
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) amax = fmaxf(amax, fabsf(v[j]));
        amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(FULL, amax, 2));
        const float d = __fdiv_rn(amax, 127.0f);
        const float inv = d > 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
        unsigned wq[2] = {0u, 0u};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int q = __float2int_rn(fminf(fmaxf(__fmul_rn(v[j], inv), -128.0f), 127.0f));
            wq[j >> 2] |= (unsigned)(q & 255) << (8 * (j & 3));
        }
        *(uint2*)(s_q + 8 * i) = make_uint2(wq[0], wq[1]);
        if ((i & 3) == 0) s_d[i >> 2] = d;
    }
    __syncthreads();
}

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
    const int4* xq = (const int4*)s_q;
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
                    v[r][u] = ok ? __ldg((const int4*)(q + row * K) + 32 * c + lane) : make_int4(0, 0, 0, 0);
                    dh[r][u] = ok ? __ldg(d + row * (K / 32) + 16 * c + (lane >> 1)) : (unsigned short)0;
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const int c = c0 + u;
                    const int4 a = xq[32 * c + lane];
                    int s = __dp4a(v[r][u].x, a.x, 0);
                    s = __dp4a(v[r][u].y, a.y, s);
                    s = __dp4a(v[r][u].z, a.z, s);
                    s = __dp4a(v[r][u].w, a.w, s);
                    s += __shfl_xor_sync(FULL, s, 1);                   // the block's other half
                    const float f = __fmul_rn(__fmul_rn((float)s, s_d[16 * c + (lane >> 1)]), h2f(dh[r][u]));
                    acc[r] += (lane & 1) ? 0.0f : f;
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            const float t = warp_sum(acc[r]);
            if (lane == 0 && j0 + r * WARPS < nrows) y[row0 + j0 + r * WARPS] = t;
        }
    }
}

// The first step's pieces of this warp's rows into L2, so that they arrive while the block
// quantises its input (and, launched with PDL, while the kernel ahead finishes).
template <int CPR>
__device__ __forceinline__ void q8_0_prefetch(const signed char* q, long long row0, int nrows,
                                              int lane, int warp) {
    constexpr int U = CPR < LOADS ? CPR : LOADS;
    constexpr int R = LOADS / U;
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (warp + r * WARPS < nrows) {
            const signed char* p = q + (row0 + warp + r * WARPS) * (512LL * CPR) + 16 * lane;
#pragma unroll
            for (int u = 0; u < U; u++) asm volatile("prefetch.global.L2 [%0];" :: "l"(p + 512 * u));
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
    q8_0_prologue(x, nw, eps, clamp, 512 * CPR, s_q, s_d, s_red);
    q8_0_rows<CPR>(q, d, s_q, s_d, y, row0, nrows, lane, warp);
}

// y[n] = sum_k w[n, k] * x_g[k] for the rows n of group g = n / rows_per_group, x_g = x + g*K
// (nw: rms_norm(x_g, nw) instead; clamp > 0: swiglu_clamped(x[:K], x[K:2K]) instead; one
// group). Grid (cdiv(rows_per_group, rpb), groups); block b of group g owns rows
// g*rows_per_group + b*rpb + 0 .. rpb-1.
// Requires (host-checked): K = 512 * 2^i <= MAX_K, q and x 16-byte aligned, contiguous.
extern "C" __global__ void BOUNDS
q8_0_matvec(const signed char* __restrict__ q, const unsigned short* __restrict__ d,
            const float* x, const float* __restrict__ nw, float eps, float clamp,
            float* __restrict__ y, int K, int rows_per_group, int rpb) {
    __shared__ __align__(16) signed char s_q[MAX_K];
    __shared__ float s_d[MAX_K / 32];
    __shared__ double s_red[WARPS];
    pdl_trigger();                    // all blocks resident: the next kernel may launch
    const int g = blockIdx.y;
    const int first = blockIdx.x * rpb;
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
