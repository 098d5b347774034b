// Routed experts of many tokens (prefill) on tensor cores, float16 path (host side:
// ds4tp.kernels.cuda_experts.many; tile table from triton_gemm.expert_tiles_device, whose rows
// with count 0 are spare).
//
// Block (m, n): tile m = (expert e, first index into pairs, count <= 64 pairs) times 64 weight
// rows (gate/up: the same 64 rows of gate and of up, SwiGLU epilogue) or 128 rows (per-slot
// down). 4 warps; warp w owns 16 rows of gate and of up (or 32 rows of down) and all 64 pair
// columns: two 16-row A fragments x eight 8-column B fragments of mma.m16n8k16 (float16 in,
// float32 accumulate).
//
// The weights are decoded straight from global memory into A fragments (each lane loads its
// row's words one 32-value step ahead): each value is the exact dequantised weight rounded once
// to float16 for IQ2_XXS (d/8 times the exact integer (2s+1)*grid*sign), and d*scale*q -
// dmin*min with d*scale and dmin*min rounded to float16 first for Q2_K. The activations, which
// all 4 warps read, are staged XS steps ahead in shared memory by cp.async. To decode 4
// consecutive values at once, the 16 k-slots of an mma step are permuted: lane (g, c) holds
// k-slots 2c, 2c+1, 2c+8, 2c+9, which here stand for elements 4c .. 4c+3 of the 16 (the same
// permutation for the activation's B fragment, so the dot is unchanged). Four IQ2_XXS magnitudes are one 32-bit word of the grid table; PRMT places two
// bytes under the float16 exponent of 1024, one FMA takes (1024 + b) * sc - 1024 * sc = b * sc
// exactly, the sign bits are XORed in. H200, 2048 tokens, 256 experts, TP=1 shapes: gate/up
// 3.5 ms, down 1.7 ms (the exact Q8_K path: 7.0-7.3 and 2.8-2.9 ms; bench/results/
// experts_mma_variants_h200_*, gemm_sweep_h200_s9_*).
//
// x: the activation rounded to float16 (pair p = t*K + k reads row t*sxt + k*sxk, elements).
#define TQ 64
// __launch_bounds__ minimum blocks per SM (compile-time; benchmarks time others): 3 keeps every
// kernel under 170 registers without spills; 4 spills, 2 measured slower
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 3
#endif

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
    return r;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 r;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
// float -> float16 (round to nearest even) in both halves
__device__ __forceinline__ u32 splat_h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return (u32)h | ((u32)h << 16);
}
__device__ __forceinline__ u32 ld16(const unsigned char* p) {
    return (u32)__ldg((const u16*)p);
}
__device__ __forceinline__ void mma16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 32-element step (an IQ2_XXS sub-block; two Q2_K sub-blocks) of one row: the raw words
// this lane needs, loaded one step ahead of their use.
struct RowStep { u32 a, b, s, d; };

#ifndef IQ2_DL
#define IQ2_DL 0        // IQ2_XXS rows of 16 super-blocks in the decode order (qtensor.IQ2_DECODE)
#endif

// The sub-block (32 inputs) a step takes. In the decode order the steps follow the row's bytes:
// step s reads the 8 bytes at 32 + 8s, sub-block g = (s % 64) / 2 + 32 (s % 2) + 64 (s / 64),
// and the activation's g-th 32 values are staged for it (the sum over k runs in another order
// than from GGUF's order, so the results differ by the tensor cores' float32 accumulation).
template <int IQ2>
__device__ __forceinline__ int step_sub(int step) {
    return (IQ2 && IQ2_DL) ? ((step & 63) >> 1) + 32 * (step & 1) + 64 * (step >> 6) : step;
}

template <int IQ2>
__device__ __forceinline__ RowStep load_step(const unsigned char* row, int step, int c) {
    RowStep r;
    if (IQ2 && IQ2_DL) {   // sub-block step_sub(step) at 32 + 8 step (4-aligned); the scale of
        const unsigned char* p = row + 32 + 8 * step;                // super-block sb at
        r.a = __ldg((const u32*)p);                                  // 8 (sb % 4) + 2 (sb / 4)
        r.b = __ldg((const u32*)(p + 4));
        r.s = 0;
        const int sb = step_sub<IQ2>(step) >> 3;
        r.d = ld16(row + 8 * (sb & 3) + 2 * (sb >> 2));
    } else if (IQ2) {   // d (2 bytes), 8 x (4 grid-index bytes, u32 signs+scale); 2-aligned: 16-bit loads
        const unsigned char* sb = row + (step >> 3) * 66;
        const unsigned char* p = sb + 2 + 8 * (step & 7);
        r.a = ld16(p) | (ld16(p + 2) << 16);
        r.b = ld16(p + 4) | (ld16(p + 6) << 16);
        r.s = 0;
        r.d = ld16(sb);
    } else {     // scales[16], qs[64], d, dmin (84 bytes, 4-aligned); sub-blocks 2j', 2j'+1
        const unsigned char* sb = row + (step >> 3) * 84;
        const int j = 2 * (step & 7);
        const unsigned char* q = sb + 16 + 32 * (j >> 3) + 4 * c;
        r.a = __ldg((const u32*)q);                      // sub-block j: bytes l = 4c..4c+3
        r.b = __ldg((const u32*)(q + 16));               // sub-block j + 1
        // lane 0 of the row's four loads the scales' word, the others d | dmin; shared below
        const int q0 = (threadIdx.x & 31) & ~3;
        const u32 v = __ldg((const u32*)(c ? sb + 80 : sb + (j & ~3)));
        r.s = __shfl_sync(FULL, v, q0) >> (8 * (j & 2));  // their scale/min bytes
        r.d = __shfl_sync(FULL, v, q0 + 1);              // d | dmin << 16
    }
    return r;
}

// small integer v (0..1023) -> float16 v in both halves, exactly, without conversion units
__device__ __forceinline__ u32 small_h2(u32 v) {
    return hsub2((v | 0x6400u) * 0x10001u, 0x64006400u);
}

// The A-fragment halves of one row for both k16 steps of a step: lo[kk] holds elements 4c, 4c+1
// and hi[kk] elements 4c+2, 4c+3 of k16 step kk. ksigns: per 7-bit sign index the 8 sign bits
// (the index plus its parity bit; 128 bytes, one bank each word: lookups never conflict).
template <int IQ2>
__device__ __forceinline__ void decode_step(const RowStep& r, int step, int c, const u32* grid,
                                            const unsigned char* ksigns, u32* lo, u32* hi) {
    if (IQ2) {
        const u32 sc2 = small_h2(2 * (r.b >> 28) + 1);   // (2s + 1) of the sub-block
        const u32 nc2 = hmul2(sc2, 0xE400E400u);         // -1024 * (2s + 1), exact
        const u32 d2 = hmul2(prmt(r.d, 0, 0x1010), 0x30003000u);   // d / 8
        const int h = c & 1;
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const int G = 2 * kk + (c >> 1);             // group of 8 within the sub-block
            const u32 W = grid[2 * ((r.a >> (8 * G)) & 255) + h];   // magnitudes 4h .. 4h+3
            const u32 n = (ksigns[(r.b >> (7 * G)) & 127] >> (4 * h)) & 15;   // 4 sign bits
            const u32 mx = ((n << 15) & 0x8000u) | ((n << 30) & 0x80000000u);
            const u32 my = ((n << 13) & 0x8000u) | ((n << 28) & 0x80000000u);
            lo[kk] = hmul2(hfma2(prmt(W, 0x64, 0x4140), sc2, nc2) ^ mx, d2);
            hi[kk] = hmul2(hfma2(prmt(W, 0x64, 0x4342), sc2, nc2) ^ my, d2);
        }
    } else {
        const u32 d2 = prmt(r.d, 0, 0x1010);                       // d in both halves
        const u32 nm2 = prmt(r.d, 0, 0x3232) ^ 0x80008000u;        // -dmin
        const int sh = 2 * (step & 3);
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            const u32 scb = (r.s >> (8 * kk)) & 255;
            const u32 dsc2 = hmul2(d2, small_h2(scb & 15));        // d * scale, rounded once
            const u32 ndm2 = hmul2(nm2, small_h2(scb >> 4));       // -dmin * min, rounded once
            const u32 qv = ((kk ? r.b : r.a) >> sh) & 0x03030303u;
            lo[kk] = hfma2(hsub2(prmt(qv, 0x64, 0x4140), 0x64006400u), dsc2, ndm2);
            hi[kk] = hfma2(hsub2(prmt(qv, 0x64, 0x4342), 0x64006400u), dsc2, ndm2);
        }
    }
}

#define XS 8          // activation pipeline depth (32-element steps staged ahead in shared memory)
#define XROW 32       // float16 values of one column per step (64 bytes)

// byte offset of column col's 8-byte piece at value v (multiple of 4) of a staged step: cols 2, 3
// (mod 4) have their 32-byte halves swapped, so the 16 lanes of one B-fragment load hit 16
// distinct bank pairs
__device__ __forceinline__ int xs_off(int col, int v) {
    return col * (2 * XROW) + ((2 * v) ^ (((col >> 1) & 1) << 5));
}

template <int IQ2, int SWIGLU>
__device__ __forceinline__ void experts_mma(
    const unsigned char* __restrict__ w, const unsigned char* __restrict__ w2, long long stride_we,
    long long stride_wn, const u16* x, long long sxt, long long sxk,
    const int* tiles, const int* pairs, const float* rw,
    float* __restrict__ out, long long stride_op, const u32* __restrict__ grid64, int N, int K,
    int KB, float clamp) {
    __shared__ u32 grid[IQ2 ? 512 : 1];
    __shared__ unsigned char ksigns[IQ2 ? 128 : 4];
    __shared__ __align__(16) unsigned char xs[XS][TQ * 2 * XROW];
    pdl_trigger();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    if (IQ2) {
        for (int i = tid; i < 512; i += blockDim.x) grid[i] = __ldg(grid64 + i);
        if (tid < 128) ksigns[tid] = (unsigned char)(tid | ((__popc(tid) & 1) << 7));
    }
    pdl_wait();
    const int e = prior(tiles + 3 * blockIdx.x), first = prior(tiles + 3 * blockIdx.x + 1);
    const int count = prior(tiles + 3 * blockIdx.x + 2);
    if (count <= 0) return;                              // a spare row of the tile table
    const int nf = (count + 7) >> 3;                     // 8-column fragments with a live pair
    // the lane's four rows: slot i is A fragment i >> 1, row g + 8 * (i & 1) of it
    const unsigned char* rp[4];
    int row[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int r = SWIGLU ? blockIdx.y * 64 + warp * 16 + g + 8 * (i & 1)
                             : blockIdx.y * 128 + warp * 32 + 16 * (i >> 1) + g + 8 * (i & 1);
        row[i] = r;
        const unsigned char* base = (SWIGLU && (i >> 1)) ? w2 : w;
        rp[i] = base + (long long)e * stride_we + (long long)min(r, N - 1) * stride_wn;
    }
    // this thread stages 32 bytes of column tid/2 per step (dead columns: the first pair's row)
    const int scol = tid >> 1, spart = 2 * (tid & 1);    // 16-byte pieces spart, spart + 1
    const u16* xsrc;
    {
        const int p = prior(pairs + first + (scol < count ? scol : 0));
        const int t = p / K;
        xsrc = x + (long long)t * sxt + (long long)(p - t * K) * sxk + 8 * spart;
    }
    const int steps = KB * 8;
    auto stage = [&](int step) {
        if (step < steps) {
            unsigned char* dst = xs[step % XS];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 d = (u32)__cvta_generic_to_shared(dst + xs_off(scol, 8 * (spart + h)));
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                             :: "r"(d), "l"(xsrc + (long long)step_sub<IQ2>(step) * XROW + 8 * h));
            }
        }
        asm volatile("cp.async.commit_group;");
    };
#pragma unroll
    for (int s = 0; s < XS - 1; s++) stage(s);

    float acc[2][8][4];
#pragma unroll
    for (int m = 0; m < 2; m++)
#pragma unroll
        for (int f = 0; f < 8; f++)
#pragma unroll
            for (int v = 0; v < 4; v++) acc[m][f][v] = 0.f;

    int boff[8];                                         // B fragment f, k16 step 0 (step 1: ^ 32)
#pragma unroll
    for (int f = 0; f < 8; f++) boff[f] = xs_off(f * 8 + g, 4 * c);
    RowStep ra[4], rb[4];
#pragma unroll
    for (int i = 0; i < 4; i++) ra[i] = load_step<IQ2>(rp[i], 0, c);
    auto compute = [&](const RowStep* r, int step) {
        asm volatile("cp.async.wait_group %0;" :: "n"(XS - 2));
        __syncthreads();                                   // step's activations are staged and
        stage(step + XS - 1);                              // the slot of step - 1 is free
        if ((step & 7) == 0 && c == 0) {                   // the super-block after next into L2
#pragma unroll
            for (int i = 0; i < 4; i++)      // (decode order: the 64 bytes after the next 64)
                asm volatile("prefetch.global.L2 [%0];" :: "l"(rp[i] + (IQ2 && IQ2_DL ? 32 + 8 * step + 128
                                                                          : ((step >> 3) + 2) * (IQ2 ? 66 : 84))));
        }
        const unsigned char* xb = xs[step % XS];
        u32 lo[4][2], hi[4][2];
#pragma unroll
        for (int i = 0; i < 4; i++) decode_step<IQ2>(r[i], step, c, grid, ksigns, lo[i], hi[i]);
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
#pragma unroll
            for (int f = 0; f < 8; f++) {   // all 8 (dead columns hold a live pair's row)
                const uint2 bv = *(const uint2*)(xb + (boff[f] ^ (32 * kk)));
                mma16816(acc[0][f], lo[0][kk], lo[1][kk], hi[0][kk], hi[1][kk], bv.x, bv.y);
                mma16816(acc[1][f], lo[2][kk], lo[3][kk], hi[2][kk], hi[3][kk], bv.x, bv.y);
            }
        }
    };
    for (int step = 0; step < steps; step += 2) {          // steps is even: ping-pong, no copies
#pragma unroll
        for (int i = 0; i < 4; i++) rb[i] = load_step<IQ2>(rp[i], step + 1, c);
        compute(ra, step);
        if (step + 2 < steps) {
#pragma unroll
            for (int i = 0; i < 4; i++) ra[i] = load_step<IQ2>(rp[i], step + 2, c);
        }
        compute(rb, step + 1);
    }
    asm volatile("cp.async.wait_group 0;");

    // C fragment: acc[m][f][2*rr + i2] is row g + 8*rr of fragment m, column f*8 + 2c + i2
#pragma unroll
    for (int f = 0; f < 8; f++) {
        if (f >= nf) continue;
#pragma unroll
        for (int i2 = 0; i2 < 2; i2++) {
            const int j = f * 8 + 2 * c + i2;
            if (j >= count) continue;
            const int p = prior(pairs + first + j);
            float* o = out + (long long)p * stride_op;
            if (SWIGLU) {   // clamped SwiGLU times the router weight (numerics.swiglu_clamped)
                const float rwp = prior(rw + p);
#pragma unroll
                for (int rr = 0; rr < 2; rr++) {
                    if (row[rr] >= N) continue;
                    const float gv = fminf(acc[0][f][2 * rr + i2], clamp);
                    const float uv = fminf(fmaxf(acc[1][f][2 * rr + i2], -clamp), clamp);
                    o[row[rr]] = gv / (1.f + __expf(-gv)) * uv * rwp;
                }
            } else {
#pragma unroll
                for (int m = 0; m < 2; m++)
#pragma unroll
                    for (int rr = 0; rr < 2; rr++)
                        if (row[2 * m + rr] < N) o[row[2 * m + rr]] = acc[m][f][2 * rr + i2];
            }
        }
    }
}

#define EXPERTS_MMA_ARGS                                                                        \
    const unsigned char *w, const unsigned char *w2, long long stride_we, long long stride_wn,  \
        const u16 *x, long long sxt, long long sxk, const int *tiles, const int *pairs,         \
        const float *rw, float *out, long long stride_op, const u32 *grid64, int N, int K,      \
        int KB, float clamp
#define EXPERTS_MMA_PASS w, w2, stride_we, stride_wn, x, sxt, sxk, tiles, pairs, rw, out, stride_op, \
                         grid64, N, K, KB, clamp

extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) iq2xxs_swiglu_mma(EXPERTS_MMA_ARGS) {
    experts_mma<1, 1>(EXPERTS_MMA_PASS);
}
extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) iq2xxs_slots_mma(EXPERTS_MMA_ARGS) {
    experts_mma<1, 0>(EXPERTS_MMA_PASS);
}
extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) q2k_slots_mma(EXPERTS_MMA_ARGS) {
    experts_mma<0, 0>(EXPERTS_MMA_PASS);
}
