// The decode attention of one token in CUDA C, the S programs of a head in one thread-block
// cluster (sm_90), compiled at run time by NVRTC (CuPy) with common.cuh in front. Host side:
// ds4tp/kernels/cuda_attn.py (prepared, off by default). Twin: decode_graph.decode_attention_torch;
// the Triton kernel it would replace: triton_attn._attn_kernel (the same math and layout).
//
// Why: in the replayed step the Triton kernel's merge of a head's S partials (a ticket after the
// sums: release fence, atomic round trip, the last program's loads of the partials) costs 2.0-2.6
// us of its ~6-7 (docs/performance.md, thirty-second session). Here the S blocks of a head are
// one cluster: each leaves its partial (max, denominator, value sum) in its own shared memory,
// one cluster barrier, and block 0 reads the others' partials through distributed shared memory
// (mapa + ld.shared::cluster), merges, and a second barrier keeps every block's shared memory
// alive until then. No workspace, no atomics.
//
// Grid (AS, H), cluster (AS, 1, 1): block (j, h) takes key blocks j, j+AS, ... of ABK rows of the
// ring and of the compressed rows. AD/4 threads: thread t holds dims 4t..4t+3 of q, of its rows
// and of its value sum (two RoPE pairs). Compile-time: AD (head dim, a multiple of 128, <= 512),
// ANROT (rotated dims, the last ANROT), ABK (keys a block), AS (blocks a head, <= 8).

#ifndef AD
#define AD 512
#endif
#ifndef ANROT
#define ANROT 64
#endif
#ifndef ABK
#define ABK 16
#endif
#ifndef AS
#define AS 8
#endif
#ifndef AMINB
#define AMINB 4             // blocks an SM the registers must allow: 64 heads x 8 = 512 blocks resident
#endif                      // at once on 132 SMs (162 registers unbounded: 3 an SM)
#define ATHREADS (AD / 4)
#define AWARPS (ATHREADS / 32)

// the sum of v over the block, in every thread (scratch: AWARPS slots; ends with a barrier)
__device__ __forceinline__ double block_sum_d(double v, double* scratch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    if (AWARPS == 1) return v;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = 0.0;
#pragma unroll
    for (int w = 0; w < AWARPS; w++) t += scratch[w];
    __syncthreads();
    return t;
}

// the ABK row dots of the block (each thread's four-dim parts in part), summed over the block,
// in every thread (scratch: AWARPS x ABK floats; ends with a barrier)
__device__ __forceinline__ void block_sums_rows(float (&part)[ABK], float* scratch) {
#pragma unroll
    for (int r = 0; r < ABK; r++) part[r] = warp_sum(part[r]);
    if (AWARPS == 1) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane < ABK) {
        float mine = 0.0f;
#pragma unroll
        for (int r = 0; r < ABK; r++) if (r == lane) mine = part[r];
        scratch[warp * ABK + lane] = mine;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < ABK; r++) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < AWARPS; w++) t += scratch[w * ABK + r];
        part[r] = t;
    }
    __syncthreads();
}

// One block of keys (K = V; rows not ok were zeroed by the caller and score -inf) into the
// running max m, denominator l and this thread's value sums acc (as triton_attn._online).
__device__ __forceinline__ void online_block(const float4& q, const float4 (&kv)[ABK], const bool (&ok)[ABK],
                                             float scale, float& m, float& l, float4& acc, float* scratch) {
    float sc[ABK];
#pragma unroll
    for (int r = 0; r < ABK; r++) sc[r] = q.x * kv[r].x + q.y * kv[r].y + q.z * kv[r].z + q.w * kv[r].w;
    block_sums_rows(sc, scratch);
    float mx = m;
#pragma unroll
    for (int r = 0; r < ABK; r++) {
        sc[r] = ok[r] ? sc[r] * scale : __int_as_float(0xff800000);   // -inf
        mx = fmaxf(mx, sc[r]);
    }
    const float alpha = expf(m - mx);
    float ps = 0.0f;
    float4 a = make_float4(acc.x * alpha, acc.y * alpha, acc.z * alpha, acc.w * alpha);
#pragma unroll
    for (int r = 0; r < ABK; r++) {
        const float p = expf(sc[r] - mx);
        ps += p;
        a.x += p * kv[r].x; a.y += p * kv[r].y; a.z += p * kv[r].z; a.w += p * kv[r].w;
    }
    m = mx;
    l = l * alpha + ps;
    acc = a;
}

// The rotation of this thread's two pairs (dims 4t..4t+3) at position pos (sgn -1: the inverse):
// the table's row for the last ANROT dims (GPT-J pairs), identity for the others.
__device__ __forceinline__ float4 rope4(float4 x, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, long long pos, float sgn) {
    const int t = threadIdx.x;
    float c[2] = {1.0f, 1.0f}, s[2] = {0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int p = 2 * t + k - (AD - ANROT) / 2;
        if (p >= 0) {
            c[k] = __ldg(cos_t + pos * (ANROT / 2) + p);
            s[k] = sgn * __ldg(sin_t + pos * (ANROT / 2) + p);
        }
    }
    return make_float4(x.x * c[0] - x.y * s[0], x.x * s[0] + x.y * c[0],
                       x.z * c[1] - x.w * s[1], x.z * s[1] + x.w * c[1]);
}

// Ring rows k0..k0+ABK-1: this thread's four dims of each and their positions (rows past the ring:
// zeros and a position no window holds). All rows that exist are loaded, the caller masks them.
__device__ __forceinline__ void load_ring_block(const float* ring, const long long* ring_pos, int k0,
                                                int n_swa, float4 (&kv)[ABK], long long (&rp)[ABK]) {
#pragma unroll
    for (int r = 0; r < ABK; r++) {
        const int row = k0 + r;
        rp[r] = row < n_swa ? prior(ring_pos + row) : -(1LL << 40);
        kv[r] = row < n_swa ? prior((const float4*)(ring + (long long)row * AD) + threadIdx.x)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// A float (or four) of block `rank`'s shared memory at the address of `local` in this block's
__device__ __forceinline__ unsigned dsmem_addr(const void* local, unsigned rank) {
    unsigned a, r;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(local));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    return r;
}
__device__ __forceinline__ float dsmem_f(const float* local, unsigned rank) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(dsmem_addr(local, rank)) : "memory");
    return v;
}
__device__ __forceinline__ float4 dsmem_f4(const float4* local, unsigned rank) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(dsmem_addr(local, rank)) : "memory");
    return v;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// out [1, H, AD] = the attention of qb [1, H*AD] (per-head RMS norm without weight, RoPE at pos)
// over the ring rows in the window (ring [n_swa, AD], ring_pos [n_swa]) and, with has_comp, the
// first (pos+1)/ratio rows of comp (those with mask[row] != 0 where has_mask), with the head's
// sink, then the inverse RoPE. Earlier kernels' outputs (qb, ring, ring_pos, comp, mask, pos)
// are read after the PDL wait with `prior`; the sinks and the RoPE tables are weights (__ldg).
extern "C" __global__ void __cluster_dims__(AS, 1, 1) __launch_bounds__(ATHREADS, AMINB)
attn_decode(const float* qb, const float* ring, const long long* ring_pos, const float* comp,
            const signed char* mask, const float* __restrict__ sinks, const float* __restrict__ cos_t,
            const float* __restrict__ sin_t, const long long* pos_p, float* out, int n_swa,
            int ratio, int has_comp, int has_mask, float eps, float scale) {
    __shared__ __align__(16) float s_acc[AD];          // this block's partial: value sums,
    __shared__ float s_ml[2];                          // max and denominator
    __shared__ float s_red[AWARPS * ABK];
    __shared__ double s_redd[AWARPS];
    const int t = threadIdx.x;
    const int j = blockIdx.x, h = blockIdx.y;           // j: the block's rank in its cluster
    pdl_trigger();
    const float sink = __ldg(sinks + h);
    pdl_wait();
    const long long pos = prior(pos_p);
    float4 q = prior((const float4*)(qb + (long long)h * AD) + t);
    // the first ring block's rows go out with q (their mask needs pos and ring_pos only)
    float4 kv[ABK];
    long long rp[ABK];
    load_ring_block(ring, ring_pos, j * ABK, n_swa, kv, rp);
    // q: RMS norm (float64 squares, the mean rounded to float32, as numerics.rms_scale), RoPE
    const double sq = (double)q.x * q.x + (double)q.y * q.y + (double)q.z * q.z + (double)q.w * q.w;
    const float ms = (float)(block_sum_d(sq, s_redd) / AD);
    const float rs = __fdiv_rn(1.0f, __fsqrt_rn(ms + eps));
    q = rope4(make_float4(q.x * rs, q.y * rs, q.z * rs, q.w * rs), cos_t, sin_t, pos, 1.0f);

    float m = -1e30f, l = 0.0f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    bool ok[ABK];
    for (int k0 = j * ABK; k0 < n_swa; k0 += AS * ABK) {
        if (k0 != j * ABK) load_ring_block(ring, ring_pos, k0, n_swa, kv, rp);
#pragma unroll
        for (int r = 0; r < ABK; r++) {
            ok[r] = rp[r] <= pos && rp[r] > pos - n_swa;
            if (!ok[r]) kv[r] = make_float4(0.f, 0.f, 0.f, 0.f);     // (a stale row may hold NaN)
        }
        online_block(q, kv, ok, scale, m, l, acc, s_red);
    }
    if (has_comp) {
        const long long n_vis = (pos + 1) / ratio;
        for (long long k0 = j * ABK; k0 < n_vis; k0 += AS * ABK) {
#pragma unroll
            for (int r = 0; r < ABK; r++) {
                const long long row = k0 + r;
                ok[r] = row < n_vis && (!has_mask || prior(mask + row) != 0);
                kv[r] = ok[r] ? prior((const float4*)(comp + row * AD) + t) : make_float4(0.f, 0.f, 0.f, 0.f);
            }
            online_block(q, kv, ok, scale, m, l, acc, s_red);
        }
    }
    ((float4*)s_acc)[t] = acc;
    if (t == 0) { s_ml[0] = m; s_ml[1] = l; }
    cluster_sync();                                     // every block's partial in its shared memory
    if (j == 0) {
        float mj[AS], lj[AS];
        float mt = sink;
#pragma unroll
        for (int r = 0; r < AS; r++) {
            mj[r] = dsmem_f(s_ml, r);
            lj[r] = dsmem_f(s_ml + 1, r);
            mt = fmaxf(mt, mj[r]);
        }
        float lt = 0.0f;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int r = 0; r < AS; r++) {
            const float w = expf(mj[r] - mt);
            lt += lj[r] * w;
            const float4 a = dsmem_f4((const float4*)s_acc + t, r);
            o.x += a.x * w; o.y += a.y * w; o.z += a.z * w; o.w += a.w * w;
        }
        lt += expf(sink - mt);
        o = make_float4(__fdiv_rn(o.x, lt), __fdiv_rn(o.y, lt), __fdiv_rn(o.z, lt), __fdiv_rn(o.w, lt));
        ((float4*)(out + (long long)h * AD))[t] = rope4(o, cos_t, sin_t, pos, -1.0f);   // inverse RoPE
    }
    cluster_sync();                                     // block 0 has read every block's partial
}
