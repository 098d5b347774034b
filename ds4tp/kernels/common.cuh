// Helpers shared by the CUDA C kernels (experts.cu, matvec.cu, experts_mma.cu): PDL, loads of
// earlier kernels' outputs (prior), loads and L2 prefetches of streamed weights (wld,
// l2_prefetch_*), the one-token Q8_0 activation and block dot.
// ds4tp.kernels.cuda_c compiles every .cu file with this text in front of it. No headers: NVRTC
// sees only built-in types and intrinsics.
#define FULL 0xffffffffu

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float ex2_approx(float x) {
    float r;
    asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// Programmatic dependent launch (sm_90+; ds4tp.kernels.pdl). Launched with it, a kernel may start
// while the kernel before it on the stream still runs: pdl_trigger() lets the next kernel launch
// (once every block of this one has called it or exited) and pdl_wait() blocks until the kernel
// before has finished and its writes are visible. Before pdl_wait() a kernel reads only weights
// and tables, never what an earlier kernel writes; it writes nothing. Both are no-ops in a plain
// launch.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// A load of an earlier kernel's output (after pdl_wait()), cached in L1 and L2 (ld.global.ca).
// Such pointers are never `const __restrict__`: with that the compiler may read them through the
// non-coherent read-only path (ld.global.nc), which is only valid for data that no one writes
// during this kernel's lifetime. Under PDL this kernel is resident before the kernel ahead has
// written its output, and a read-only-path load returned stale bytes: q2k_down_sum read expert
// ids that were not this step's and faulted (graph replays, sessions 18-22; cuda-gdb, s22d).
// griddepcontrol.wait makes the kernel ahead's writes visible to ordinary loads: on an H200,
// lines a consumer had cached in L1 by .ca before the wait were never stale after it (0 of 13.4
// million words), while .nc loads of the same lines were all stale (bench/l1_wait_probe.py,
// s23a). .ca was 2.2% / 2.8% faster on the TP=2 / TP=1 step than .cg (L2 only; PRIOR_CG, s23a).
// Weights and tables are read-only for the whole step and keep __ldg. tests/test_ptx_loads.py
// checks every kernel's PTX for read-only-path loads from anything but its weight parameters.
template <typename T>
__device__ __forceinline__ T prior(const T* p) {
#ifdef PRIOR_CG
    return __ldcg(p);
#else
    return __ldca(p);
#endif
}

// A load of a streamed weight (read once a token: the matvecs' and routed experts' rows), on the
// read-only path as __ldg, with the streaming operator (.cs: evict-first in L1 and L2), so that
// the ~9 GB a token push less of what the latency-bound launches re-read out of L2 (the HC
// streams, the caches' rows, tables, small weights): -2.0% / -2.3% on the TP=2 / TP=1 step
// against plain __ldg, the same bits (s35d). WEIGHT_LD 0 (a timing variant,
// bench/critical_path.py) loads them with plain __ldg. Measured and removed (code at 918c834):
// L2 evict-first with no L1 allocation (+1.9% / +3.0%), no L1 allocation alone (+1.5% / +3.3%),
// and either level's evict-first alone (equal to .cs, s35e).
#ifndef WEIGHT_LD
#define WEIGHT_LD 1
#endif
#if WEIGHT_LD == 0
template <typename T>
__device__ __forceinline__ T wld(const T* p) { return __ldg(p); }
#else
__device__ __forceinline__ uint4 wld(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.cs.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ int4 wld(const int4* p) {
    const uint4 v = wld((const uint4*)p);
    return make_int4((int)v.x, (int)v.y, (int)v.z, (int)v.w);
}
__device__ __forceinline__ uint2 wld(const uint2* p) {
    uint2 v;
    asm volatile("ld.global.cs.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned wld(const unsigned* p) {
    unsigned v;
    asm volatile("ld.global.cs.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned short wld(const unsigned short* p) {
    unsigned short v;
    asm volatile("ld.global.cs.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}
#endif

// A streamed weight's bytes into L2 ahead of their loads, at normal priority (as bulk prefetches
// with an L2 evict-first policy, like the loads that read them, they were not faster: s36a, code
// at 57fdb52). l2_prefetch_warp: the 512 contiguous bytes at p, by a whole warp (lane l asks for
// p + 16 l). l2_prefetch_one: the line at p, by the calling thread.
__device__ __forceinline__ void l2_prefetch_one(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" :: "l"(p));
}
__device__ __forceinline__ void l2_prefetch_warp(const void* p, int lane) {
    l2_prefetch_one((const char*)p + 16 * lane);
}

// The clamped SwiGLU (numerics.swiglu_clamped) of 8 gate values v and their up values (ua, uc), in
// place: g = min(gate, c), u = clamp(up, -c, c), (g * sigmoid(g)) * u, sigmoid(g) = 1 / (1 +
// exp(-g)).
__device__ __forceinline__ void swiglu8(float (&v)[8], const float4& ua, const float4& uc, float clamp) {
    const float u[8] = {ua.x, ua.y, ua.z, ua.w, uc.x, uc.y, uc.z, uc.w};
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const float g = fminf(v[j], clamp);
        const float sg = __fdiv_rn(1.0f, 1.0f + expf(-g));
        v[j] = __fmul_rn(__fmul_rn(g, sg), fminf(fmaxf(u[j], -clamp), clamp));
    }
}

// Q8_0 of elements 8i..8i+7 (v) into shared memory (s_q int8 at 8i, the 32-block's scale at
// s_d[i/4]), by the four lanes lane ^ 0..3 that hold the block's quarters (all 32 lanes of the
// warp call it together): d = amax/127 and 1/d correctly rounded, q = rint(clamp(x * (1/d),
// -128, 127)).
__device__ __forceinline__ void q8_0_eight(const float (&v)[8], int i, signed char* s_q, float* s_d) {
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

// x [K] (16-byte aligned) -> Q8_0 in shared memory: s_q int8 [K], s_d float32 [K/32], by a block of
// NW warps (s_red: a double per warp; ends with a barrier). With nw,
// x is RMS-normed first: float64 sum of squares, the mean rounded to float32, correctly rounded
// sqrt and reciprocal, then (x * s) * nw. With clamp > 0, x is [2K] (gate, then up) and the input
// is swiglu8 of its halves. Per 32-block: q8_0_eight.
template <int NW>
__device__ __forceinline__ void q8_0_prologue(const float* x, const float* __restrict__ nw,
                                              float eps, float clamp, int K, signed char* s_q,
                                              float* s_d, double* s_red) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    float rs = 1.0f;
    if (nw != 0) {
        double acc = 0.0;
        for (int i = 4 * tid; i < K; i += 4 * NW * 32) {
            const float4 v = prior((const float4*)(x + i));
            acc += (double)v.x * v.x + (double)v.y * v.y + (double)v.z * v.z + (double)v.w * v.w;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(FULL, acc, o);
        if (lane == 0) s_red[warp] = acc;
        __syncthreads();
        double tot = 0.0;
        for (int w = 0; w < NW; w++) tot += s_red[w];          // same order in every thread
        const float ms = (float)(tot / (double)K);
        rs = __fdiv_rn(1.0f, __fsqrt_rn(ms + eps));
    }
    // four lanes per 32-block, 8 elements each (K/8 is a multiple of 64, so a warp's lanes are
    // all in the loop or all out of it)
    for (int i = tid; i < K / 8; i += NW * 32) {
        const float4 a = prior((const float4*)(x + 8 * i)), c = prior((const float4*)(x + 8 * i + 4));
        float v[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
        if (clamp > 0.0f)
            swiglu8(v, prior((const float4*)(x + K + 8 * i)), prior((const float4*)(x + K + 8 * i + 4)), clamp);
        if (nw != 0) {
            const float4 na = *(const float4*)(nw + 8 * i), nc = *(const float4*)(nw + 8 * i + 4);
            const float n[8] = {na.x, na.y, na.z, na.w, nc.x, nc.y, nc.z, nc.w};
#pragma unroll
            for (int j = 0; j < 8; j++) v[j] = __fmul_rn(__fmul_rn(v[j], rs), n[j]);
        }
        q8_0_eight(v, i, s_q, s_d);
    }
    __syncthreads();
}

// Piece c of a Q8_0 row in the split layout (16 int8 quants v, half a 32-block; dh the block's
// f16 scale) against the block's Q8_0 activation (s_q, s_d: q8_0_prologue): lane pairs add their
// integer halves, and the even lane returns the block's product d_x * d_w * sum, the odd one 0.
// Every one-token Q8_0 row dot sums these in the same order, so their results are bit-identical.
__device__ __forceinline__ float q8_0_piece(const int4& v, unsigned short dh, const signed char* s_q,
                                            const float* s_d, int c, int lane) {
    const int4 a = ((const int4*)s_q)[32 * c + lane];
    int s = __dp4a(v.x, a.x, 0);
    s = __dp4a(v.y, a.y, s);
    s = __dp4a(v.z, a.z, s);
    s = __dp4a(v.w, a.w, s);
    s += __shfl_xor_sync(FULL, s, 1);                       // the block's other half
    const float f = __fmul_rn(__fmul_rn((float)s, s_d[16 * c + (lane >> 1)]), h2f(dh));
    return (lane & 1) ? 0.0f : f;
}

// The HC mixer's Sinkhorn of one token (triton_hc._hc_mix's operations; the twin: model.hc_split)
// by one warp, for a launch that carries it as one more block (cuda_c.MixJob): post [4] and M
// [4, 4] from the mixer logits z [24] (an earlier kernel's output: read after pdl_wait), scale
// [3] and base [24]. Lane l holds M[(l & 15) / 4][l % 4] (lanes 16-31 the same again): a row
// sums over lanes l ^ 2, then l ^ 1, a column over l ^ 8, then l ^ 4, the order of Triton's
// warp reductions (the largest lane offset first), so (a + c) + (b + d). exp as Triton's
// (ex2.approx of x * log2 e), divisions correctly rounded, a * b + c contracted: the same bits
// as the Triton kernels' (tests/kernel_cases.py case_cuda_mix_ride).
__device__ __forceinline__ float exp_tl(float x) {
    return ex2_approx(__fmul_rn(x, 1.4426950408889634f));
}
__device__ __forceinline__ float hc_row_sum(float v) {
    v += __shfl_xor_sync(FULL, v, 2);
    return v + __shfl_xor_sync(FULL, v, 1);
}
__device__ __forceinline__ float hc_col_sum(float v) {
    v += __shfl_xor_sync(FULL, v, 8);
    return v + __shfl_xor_sync(FULL, v, 4);
}
__device__ __noinline__ void hc_sinkhorn_warp(const float* z, const float* __restrict__ scale,
                                              const float* __restrict__ base, float* post,
                                              float* m_out, float eps, int iters) {
    const int lane = threadIdx.x & 31, i = lane & 15;
    if (lane < 4) {
        const float v = fmaf(prior(z + 4 + lane), __ldg(scale + 1), __ldg(base + 4 + lane));
        post[lane] = 2.0f * __fdiv_rn(1.0f, 1.0f + exp_tl(-v));
    }
    float m = fmaf(prior(z + 8 + i), __ldg(scale + 2), __ldg(base + 8 + i));
    float mx = fmaxf(m, __shfl_xor_sync(FULL, m, 1));
    mx = fmaxf(mx, __shfl_xor_sync(FULL, mx, 2));
    const float e = exp_tl(m - mx);
    m = __fadd_rn(__fdiv_rn(e, hc_row_sum(e)), eps);                 // row softmax
    m = __fdiv_rn(m, __fadd_rn(hc_col_sum(m), eps));                  // columns
    for (int it = 1; it < iters; it++) {
        m = __fdiv_rn(m, __fadd_rn(hc_row_sum(m), eps));              // rows
        m = __fdiv_rn(m, __fadd_rn(hc_col_sum(m), eps));              // columns
    }
    if (lane < 16) m_out[i] = m;
}

// In a launch that carries the Sinkhorn as one more block (matvec.cu q8_0_matvec_mix, experts.cu
// q2k_down_sum_mix): whether this block is that one (MIX_FIRST: the grid's first, placed first;
// else its last), having run it: hc_sinkhorn_warp of logits mz into mpost, mm after the PDL
// wait. The caller's other blocks take block index blockIdx.x - MIX_FIRST.
#ifndef MIX_FIRST
#define MIX_FIRST 1
#endif
__device__ __forceinline__ bool hc_sinkhorn_block(const float* mz, const float* __restrict__ ms,
                                                  const float* __restrict__ mb, float* mpost,
                                                  float* mm, float meps, int miters) {
    if (blockIdx.x != (MIX_FIRST ? 0 : gridDim.x - 1)) return false;
    pdl_trigger();
    pdl_wait();                       // z is an earlier kernel's output
    if (threadIdx.x < 32) hc_sinkhorn_warp(mz, ms, mb, mpost, mm, meps, miters);
    return true;
}
