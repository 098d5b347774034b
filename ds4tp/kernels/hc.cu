// The hyper-connection step of one decode token in CUDA C (compiled by NVRTC through CuPy; host
// side ds4tp/kernels/cuda_hc.py). Twins, in sequence: ds4tp.model.hc_post_torch, hc_logits_torch
// and the x of hc_combine_torch. Compiled with common.cuh in front (ds4tp.kernels.cuda_c).
//
// The step: the stream update of the sublayer just run, H'[i] = post[i] f + sum_r M[r][i] H[r]
// (4 streams of E), then the next sublayer's mixer logits z = s * (W . flat(H')), s the RMS scale
// of all 4E values (W: F16 [24, 4E]), and its input x = rms_norm(sum_h pre[h] H'[h]) * nw with
// pre[h] = sigmoid(z[h] scale[0] + base[h]) + eps. post' and M' (Sinkhorn) are left to the
// launch beside the sublayer (triton_hc.hc_mix, from z).
//
// Block b owns columns [128b, 128b + 128) of every stream. Two quantities need the whole row:
// the logits (and s, from the sum of squares) and x's RMS scale, which needs pre, so the logits
// first. The Triton kernel (triton_hc._hc_step_kernel) has the last block to arrive (a ticket)
// read all new streams back and form x alone: 64 KB through one SM, then a 4096-wide reduction.
// Here every block publishes its partial logits and the partial Gram matrix of its columns,
// G[h][h'] = sum_c H'[h][c] H'[h'][c] (float64; its trace is the sum of squares), as tagged
// words, and reads every other block's back (polling until they carry this launch's tag: the
// grid is small, and every block is resident before the next kernel may launch, since each
// calls pdl_trigger first). Then each block adds the partials in the same order, and
// sum_c x_c^2 = sum_hh' pre[h] pre[h'] G[h][h'], so it forms x for its own columns from the H'
// it holds in registers. That sum of squares is x's taken before x is rounded
// to float32 (the twin squares the float32 x): the scale differs in the last bits, not more.

#define HC_NH 4                 // streams (DS4: n_hc = 4)
#define HC_N 24                 // mixer logits: 2 n + n^2
#define HC_BE 128               // stream columns per block
#define HC_RG 4                 // groups of logit rows (HC_N / HC_RG rows each)
#define HC_RPG (HC_N / HC_RG)
// thread t: columns 8 (t % 16) .. +7 of the block's 128, stream hh = (t / 16) % 4, logit rows
// 6 rg .. 6 rg + 5 with rg = t / 64 (two warps per rg)

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned atom_add_acq_rel(unsigned* p, unsigned v) {
    unsigned old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

__device__ __forceinline__ void st_relaxed64(unsigned long long* p, unsigned long long v) {
    asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long ld_relaxed64(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// Data and a tag (the launch's number) in one 8-byte store: a block that reads the tag it
// expects has read the data with it (no fence, no counter: the protocol of NCCL's LL buffers).
__device__ __forceinline__ unsigned long long tag(unsigned word, unsigned gen) {
    return ((unsigned long long)gen << 32) | word;
}

// (HC_BARRIER: the blocks' partials exchanged through a grid-wide barrier instead; timed against
// the tagged words in session 25.) All blocks of the grid meet here (all must be resident).
// bar[0] counts arrivals and is left at zero; bar[1] is a generation number (gen: read after the
// PDL wait) the last arrival advances, which the others wait on. One thread per block takes
// part, after the block's barrier.
__device__ __forceinline__ void grid_meet(unsigned* bar, unsigned gen) {
    __syncthreads();
    if (threadIdx.x == 0) {
        if (atom_add_acq_rel(bar, 1u) == gridDim.x - 1) {
            bar[0] = 0u;                      // (ordered before the release below)
            st_release(bar + 1, gen + 1u);
        } else {
            while (ld_acquire(bar + 1) == gen) {
            }
        }
    }
    __syncthreads();
}

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    const float4 a = prior((const float4*)p), b = prior((const float4*)p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

#define HC_WORDS (HC_N + 2 * HC_NH * HC_NH)     // a block's partials as 32-bit words
#define HC_MAXB 32                               // blocks (E <= 4096)

// f [E], h [4, E], post [4], m [4, 4] (M[r][i]): the sublayer's output and the streams with their
// mixing (earlier kernels' outputs); w F16 [24, 4E], scale [3], base [24], nw [E]: the next
// sublayer's mixer and norm (weights). Writes out [4, E] (H'), x [E], z [24] (block 0). bar: the
// exchange's state, one per stream, zeroed once: bar[1] the last launch's tag, then from bar + 2
// the tagged words [grid][HC_WORDS] (each block's 24 partial logits, then its 16 Gram entries as
// low and high words; HC_BARRIER: bar[0] the barrier's count, ws_y and ws_g the partials).
// Requires (host-checked): E % 128 == 0, all pointers 16-byte aligned, the grid resident at once.
extern "C" __global__ void __launch_bounds__(256)
hc_step(const float* f, const float* h, const float* post, const float* m,
        const unsigned short* __restrict__ w, const float* __restrict__ scale,
        const float* __restrict__ base, const float* __restrict__ nw,
        float* out, float* x, float* z, float* ws_y, double* ws_g, unsigned* bar,
        int E, float eps, float rms_eps) {
    __shared__ float s_y[8][HC_RPG];
    __shared__ double s_g[HC_NH * HC_NH];
    __shared__ float s_yt[HC_N];
    __shared__ double s_gt[HC_NH * HC_NH];
#ifndef HC_BARRIER
    __shared__ unsigned s_raw[HC_MAXB][HC_WORDS];
#endif
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int oct = tid & 15, hh = (tid >> 4) & 3, rg = tid >> 6;
    const int c0 = blockIdx.x * HC_BE + 8 * oct;

    pdl_trigger();                    // all blocks resident: the next kernel may launch
    uint4 wv[HC_RPG];                 // this thread's 8 weights of each of its logit rows
#pragma unroll
    for (int r = 0; r < HC_RPG; r++)
        wv[r] = __ldg((const uint4*)(w + (long long)(HC_RPG * rg + r) * (HC_NH * E) + (long long)hh * E + c0));
    pdl_wait();                       // f, h, post and m are earlier kernels' outputs
    const unsigned gen = *(volatile unsigned*)(bar + 1);   // the last launch's (it has finished)

    float fv[8], hv[HC_NH][8], acc[HC_NH][8];
    load8(f + c0, fv);
#pragma unroll
    for (int r = 0; r < HC_NH; r++) load8(h + (long long)r * E + c0, hv[r]);
#pragma unroll
    for (int i = 0; i < HC_NH; i++) {
        const float p = prior(post + i);
        float mr[HC_NH];
#pragma unroll
        for (int r = 0; r < HC_NH; r++) mr[r] = prior(m + r * HC_NH + i);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float a = p * fv[k];
#pragma unroll
            for (int r = 0; r < HC_NH; r++) a = fmaf(mr[r], hv[r][k], a);
            acc[i][k] = a;
        }
    }
    float a[8];                       // this thread's stream hh
#pragma unroll
    for (int k = 0; k < 8; k++)
        a[k] = hh == 0 ? acc[0][k] : hh == 1 ? acc[1][k] : hh == 2 ? acc[2][k] : acc[3][k];
    if (rg == 0) {                    // the new streams (and this block's share of G)
        float4* o = (float4*)(out + (long long)hh * E + c0);
        o[0] = make_float4(a[0], a[1], a[2], a[3]);
        o[1] = make_float4(a[4], a[5], a[6], a[7]);
        double g[HC_NH];
#pragma unroll
        for (int j = 0; j < HC_NH; j++) {
            g[j] = 0.0;
#pragma unroll
            for (int k = 0; k < 8; k++) g[j] = fma((double)a[k], (double)acc[j][k], g[j]);
#pragma unroll
            for (int o2 = 8; o2 > 0; o2 >>= 1) g[j] += __shfl_xor_sync(FULL, g[j], o2);   // 16 lanes
        }
        if (oct == 0) {
#pragma unroll
            for (int j = 0; j < HC_NH; j++) s_g[hh * HC_NH + j] = g[j];
        }
    }
#pragma unroll
    for (int r = 0; r < HC_RPG; r++) {   // partial logits of rows 6 rg + r over (hh, 8 columns)
        const unsigned ws[4] = {wv[r].x, wv[r].y, wv[r].z, wv[r].w};
        float y = 0.0f;
#pragma unroll
        for (int k = 0; k < 8; k++) y = fmaf(h2f((unsigned short)(ws[k >> 1] >> (16 * (k & 1)))), a[k], y);
        y = warp_sum(y);
        if (lane == 0) s_y[warp][r] = y;
    }
    __syncthreads();
#ifdef HC_BARRIER
    if (tid < HC_N) {
        const int q = tid / HC_RPG, r = tid % HC_RPG;
        ws_y[blockIdx.x * HC_N + tid] = s_y[2 * q][r] + s_y[2 * q + 1][r];
    } else if (tid < HC_N + HC_NH * HC_NH) {
        ws_g[blockIdx.x * (HC_NH * HC_NH) + tid - HC_N] = s_g[tid - HC_N];
    }
    grid_meet(bar, gen);
    // every block: the partials added in block order (the same bits in every block)
    if (tid < HC_N) {
        float t = 0.0f;
        for (int b = 0; b < (int)gridDim.x; b++) t += __ldcg(ws_y + b * HC_N + tid);
        s_yt[tid] = t;
    } else if (tid < HC_N + HC_NH * HC_NH) {
        double t = 0.0;
        for (int b = 0; b < (int)gridDim.x; b++) t += __ldcg(ws_g + b * (HC_NH * HC_NH) + tid - HC_N);
        s_gt[tid - HC_N] = t;
    }
#else
    // this block's partials as tagged words, then every block's read back (polled until tagged
    // with this launch's tag) and added in block order: the same bits in every block
    const unsigned now = gen + 1u;
    unsigned long long* words = (unsigned long long*)(bar + 2);
    if (tid < HC_N) {
        const int q = tid / HC_RPG, r = tid % HC_RPG;
        st_relaxed64(words + blockIdx.x * HC_WORDS + tid, tag(__float_as_uint(s_y[2 * q][r] + s_y[2 * q + 1][r]), now));
    } else if (tid < HC_N + HC_NH * HC_NH) {
        const int j = tid - HC_N;
        const double g = s_g[j];
        st_relaxed64(words + blockIdx.x * HC_WORDS + HC_N + 2 * j, tag(__double2loint(g), now));
        st_relaxed64(words + blockIdx.x * HC_WORDS + HC_N + 2 * j + 1, tag(__double2hiint(g), now));
    }
    const int nblk = gridDim.x;
    if (tid < HC_WORDS) {             // word tid of every block: all loads out at once, then polled
        unsigned long long v[HC_MAXB];
#pragma unroll
        for (int b = 0; b < HC_MAXB; b++)
            if (b < nblk) v[b] = ld_relaxed64(words + b * HC_WORDS + tid);
#pragma unroll
        for (int b = 0; b < HC_MAXB; b++) {
            if (b < nblk) {
                while ((unsigned)(v[b] >> 32) != now) v[b] = ld_relaxed64(words + b * HC_WORDS + tid);
                s_raw[b][tid] = (unsigned)v[b];
            }
        }
    }
    __syncthreads();
    if (tid < HC_N) {
        float t = 0.0f;
        for (int b = 0; b < nblk; b++) t += __uint_as_float(s_raw[b][tid]);
        s_yt[tid] = t;
    } else if (tid < HC_N + HC_NH * HC_NH) {
        const int j = tid - HC_N;
        double t = 0.0;
        for (int b = 0; b < nblk; b++)
            t += __hiloint2double((int)s_raw[b][HC_N + 2 * j + 1], (int)s_raw[b][HC_N + 2 * j]);
        s_gt[j] = t;
    }
    if (blockIdx.x == 0 && tid == 0) bar[1] = now;   // the next launch reads it after its wait
#endif
    __syncthreads();
    if (tid >= 32) return;
    double tr = 0.0;
#pragma unroll
    for (int j = 0; j < HC_NH; j++) tr += s_gt[j * HC_NH + j];
    const float s = __fdiv_rn(1.0f, __fsqrt_rn((float)(tr / (double)(HC_NH * E)) + rms_eps));
    if (blockIdx.x == 0 && tid < HC_N) z[tid] = s_yt[tid] * s;
    if (tid >= 16) return;
    const float sc0 = __ldg(scale);
    float pre[HC_NH];
#pragma unroll
    for (int j = 0; j < HC_NH; j++)
        pre[j] = __fdiv_rn(1.0f, 1.0f + expf(-fmaf(s_yt[j] * s, sc0, __ldg(base + j)))) + eps;
    double sx = 0.0;
#pragma unroll
    for (int j = 0; j < HC_NH; j++) {
        double t = 0.0;
#pragma unroll
        for (int i = 0; i < HC_NH; i++) t += (double)pre[i] * s_gt[j * HC_NH + i];
        sx += (double)pre[j] * t;
    }
    const float xs = __fdiv_rn(1.0f, __fsqrt_rn((float)(sx / (double)E) + rms_eps));
    const float4 na = __ldg((const float4*)(nw + c0)), nb = __ldg((const float4*)(nw + c0) + 1);
    const float n8[8] = {na.x, na.y, na.z, na.w, nb.x, nb.y, nb.z, nb.w};
    float xv[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float v = pre[0] * acc[0][k];
#pragma unroll
        for (int j = 1; j < HC_NH; j++) v = fmaf(pre[j], acc[j][k], v);
        xv[k] = __fmul_rn(__fmul_rn(v, xs), n8[k]);
    }
    float4* xo = (float4*)(x + c0);
    xo[0] = make_float4(xv[0], xv[1], xv[2], xv[3]);
    xo[1] = make_float4(xv[4], xv[5], xv[6], xv[7]);
}
