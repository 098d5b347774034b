// Routed experts of a decode step (few tokens) in CUDA C, compiled at run time by NVRTC (CuPy).
// Host side and dispatch: ds4tp/kernels/cuda_experts.py. Twins: ds4tp.ops.expert_swiglu_torch and
// expert_linear_torch(...).sum(1).
//
// Both kernels quantise their activation in the prologue exactly as numerics.q8_k_act does
// (bit-identical int8 values, float32 scales, int32 sums of 16), so no separate quantiser launch
// is needed. Every block sum is an exact integer (dp4a); the float32 scaling per super-block and
// the final warp sums are the only roundings, as in the Triton kernels they replace.
//
// Why CUDA C here: an IQ2_XXS super-block is 66 bytes, so its fields are only 2-byte aligned.
// These kernels read whole rows with 16-byte loads into shared memory (rows of 16 super-blocks
// are 1056 bytes, 16-byte aligned) and decode from there; the grid table lives in shared memory.
// Compiled with common.cuh in front (ds4tp.kernels.cuda_c): FULL, h2f, warp_sum.

#ifndef WARPS
#define WARPS 16                // warps per block; the host compiles and launches with the same
#endif
#define A_MAX_KB 16             // gate/up: at most 4096 inputs (16 super-blocks of 256)
#define A_ROW_MAX (A_MAX_KB * 66)
#define A_MAX_V 5               // 16-byte pieces per lane for a gate row plus an up row: ceil(2*66/32)
#define B_MAX_KB 8              // down: at most 2048 inputs per row
#define B_MAX_K 8               // slots per token
// down: shared-memory layout of the Q8_K activation, padded against bank conflicts. A lane of the
// down kernel reads 16 bytes at 128nh + 16h + 32j of its super-block sb; the 8 lanes of one
// 16-byte-load phase differ in (sb mod 2, nh, h). Unpadded (256-byte blocks) they all hit banks
// 0-7 (4 wavefronts where 1 would do); with the halves 160 bytes apart and blocks 320 bytes
// apart they hit 8 distinct 4-bank groups ((4sb + 2nh + h + 2j) mod 8). The sums of 16 are
// likewise 17 words apart per block (at most 2 lanes of a warp on one bank).
#define B_XB 320                // bytes per 256-block
#define B_XH 160                // bytes from its first half to its second
#define B_BS 17                 // int sums of 16 per block (16 used)

// Q8_K of one 256-block by one warp: lane l holds elements 8l..8l+7 in v. The scale comes from
// the signed element of largest magnitude (first on ties): iscale = -127/m, q = rint(clamp(
// iscale*x)), d = 1/iscale (both divisions correctly rounded). Writes lane l's 8 int8 at q8l
// (the caller's layout), the scale to *d (lane 0) and, when bs is given, the sums of 16 at
// bs[l/2] (even lanes).
__device__ __forceinline__ void q8k_block(const float* v, int lane, signed char* q8l, float* d, int* bs) {
    float am = -1.0f, mv = 0.0f;
    int ai = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float a = fabsf(v[i]);
        if (a > am) { am = a; ai = lane * 8 + i; mv = v[i]; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float oa = __shfl_xor_sync(FULL, am, o);
        int oi = __shfl_xor_sync(FULL, ai, o);
        float om = __shfl_xor_sync(FULL, mv, o);
        if (oa > am || (oa == am && oi < ai)) { am = oa; ai = oi; mv = om; }
    }
    float iscale = mv != 0.0f ? __fdiv_rn(-127.0f, mv) : 0.0f;
    unsigned lo = 0, hi = 0;
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int q = __float2int_rn(fminf(fmaxf(__fmul_rn(iscale, v[i]), -128.0f), 127.0f));
        s += q;
        if (i < 4) lo |= (unsigned)(q & 255) << (8 * i);
        else       hi |= (unsigned)(q & 255) << (8 * (i - 4));
    }
    *(uint2*)q8l = make_uint2(lo, hi);
    if (bs != 0) {
        s += __shfl_xor_sync(FULL, s, 1);
        if ((lane & 1) == 0) bs[lane >> 1] = s;
    }
    if (lane == 0) *d = mv != 0.0f ? __fdiv_rn(1.0f, iscale) : 0.0f;
}

__device__ __forceinline__ void load_act(const signed char* q, int (&xs)[8]) {
    const int4 a = *(const int4*)q, b = *(const int4*)(q + 16);
    xs[0] = a.x; xs[1] = a.y; xs[2] = a.z; xs[3] = a.w;
    xs[4] = b.x; xs[5] = b.y; xs[6] = b.z; xs[7] = b.w;
}

// 0xff in byte i of the result where bit 8i + 7 of v is set (PRMT's sign mode replicates each
// byte's top bit).
__device__ __forceinline__ unsigned byte_signs(unsigned v) {
    unsigned m;
    asm("prmt.b32 %0, %1, 0, 0xBA98;" : "=r"(m) : "r"(v));
    return m;
}

// The masks of a group's 7 sign bits s7: 0xff in byte e of the group's 8 where element e is
// negated (low word: elements 0-3, high word: 4-7). Signs: ksigns[i] = i | parity(i) << 7; bit e
// negates element e. s7 * 0x10204080 puts bit e (e < 4) at 8e + 7 and s7 * 0x20408 bit 4 + e
// (e < 3) at 8e + 7 (the shifted copies of s7 do not overlap, so no carry), the parity bit goes
// to bit 31 by popc << 31, and byte_signs (PRMT) spreads each top bit over its byte: 6
// instructions a group where taking the 8-bit pattern apart first took 9 (checked against
// ksigns for all 128 patterns).
__device__ __forceinline__ uint2 sign_masks(unsigned s7) {
    return make_uint2(byte_signs(s7 * 0x10204080u),
                      byte_signs(s7 * 0x20408u + ((unsigned)__popc(s7) << 31)));
}

// Where a sub-block's group l finds its grid row (8 bytes as two words) and its sign masks:
// IqCalc looks the row up in one 256-entry table and computes the masks (sign_masks); IqTab
// looks both up in the tables per bank pair (A_TAB, below).
struct IqCalc {
    const unsigned long long* grid;
    __device__ __forceinline__ uint2 row(unsigned aux0, int l) const {
        const unsigned long long g = grid[(aux0 >> (8 * l)) & 255u];
        return make_uint2((unsigned)g, (unsigned)(g >> 32));
    }
    __device__ __forceinline__ uint2 masks(unsigned aux1, int l) const {
        return sign_masks((aux1 >> (7 * l)) & 127u);
    }
};

// An IQ2_XXS sub-block (32 weights) held in registers, against 8 packed Q8_K words xs: returns
// (2s+1) * sum(grid * sign * q), an exact integer, whichever lookup (IqCalc, IqTab) gives the
// rows and masks. aux0: its 4 grid-row indices (bytes); aux1: its 4 x 7 sign bits and the 4-bit
// scale s. The signed sum is taken as sum(g q) - 2 sum(g q over the negated elements): one AND
// per word; fewer instructions than negating the bytes (H200: 21.4 vs 22.1 us at TP=1).
template <class Lookup>
__device__ __forceinline__ int iq2xxs_sub_held(unsigned aux0, unsigned aux1, const int (&xs)[8],
                                               const Lookup& look) {
    int sum = 0, neg = 0;
#pragma unroll
    for (int l = 0; l < 4; l++) {
        const uint2 g = look.row(aux0, l);
        const uint2 m = look.masks(aux1, l);
        sum = __dp4a((int)g.x, xs[2 * l], sum);
        sum = __dp4a((int)g.y, xs[2 * l + 1], sum);
        neg = __dp4a((int)(g.x & m.x), xs[2 * l], neg);
        neg = __dp4a((int)(g.y & m.y), xs[2 * l + 1], neg);
    }
    return (sum - 2 * neg) * (int)(2u * (aux1 >> 28) + 1u);
}

#ifndef A_TAB
#define A_TAB 0                 // gate/up in the decode order: grid and sign tables per bank pair
#endif
// The tables of A_TAB, in dynamic shared memory (the host passes A_TAB_BYTES), each entry held
// 16 times side by side: grid row i's copy c at byte 256 i + 8 c, the masks of sign pattern p
// (sign_masks, low word first; p < 128) at 256 p + 128 + 8 c (in the grid rows' gaps). Lane l
// reads copy l % 16, so the 16 lanes of a 64-bit load's half-warp phase always hit 16 different
// bank pairs: one wavefront a phase whatever the indices. From one table of 256 entries (2 KB),
// the random indices of a phase meet on bank pairs (Nsight Compute, s29a: 53% of the kernel's
// shared wavefronts were bank conflicts, mostly these lookups). A grid lookup's offset is one
// PRMT (the index byte above the lane's byte) and a sign lookup's one shift and one LOP3, where
// the masks' arithmetic took 8 instructions a group of 8 weights.
#define A_TAB_BYTES (256 * 256)

// The tables' lookup (tab: their base; lo = 8 (lane % 16), the lane's copy). The sign patterns'
// 128 is the load's constant offset: in the offset's OR, ptxas split it into a second LOP3.
struct IqTab {
    const unsigned char* tab;
    unsigned lo;
    __device__ __forceinline__ uint2 row(unsigned aux0, int l) const {
        return *(const uint2*)(tab + __byte_perm(aux0, lo, 0x5504u | (l << 4)));   // byte l of aux0, then lo
    }
    __device__ __forceinline__ uint2 masks(unsigned aux1, int l) const {
        return *(const uint2*)(tab + 128 + (((aux1 >> (7 * l)) & 127u) << 8 | lo));
    }
};

// The IQ2_XXS sub-block at byte offset off (even) of a row in shared memory (GGUF's order: 4
// grid-row indices, then the sign/scale word, 2-byte aligned): iq2xxs_sub_held of its words.
__device__ __forceinline__ int iq2xxs_sub(const unsigned char* row, int off, const int (&xs)[8],
                                          const unsigned long long* grid) {
    const unsigned* w = (const unsigned*)(row + (off & ~3));
    const unsigned w0 = w[0], w1 = w[1], w2 = w[2];  // (each read once)
    unsigned sh = (unsigned)(off & 3) * 8u;          // 0 or 16
    return iq2xxs_sub_held(__funnelshift_r(w0, w1, sh), __funnelshift_r(w1, w2, sh), xs, IqCalc{grid});
}

#ifndef A_DL
#define A_DL 0                  // gate/up rows in the decode order (qtensor.IQ2_DECODE; KB = 16)
#endif
// A row in the decode order (qtensor.iq2_decode_rows, re-ordered in place at load): the 16
// super-blocks' f16 scales first (32 bytes; lane group j = lane / 8 finds its four, of
// super-blocks j, j+4, j+8, j+12, at bytes 8j..8j+7), then the 128 sub-blocks of 8 bytes in two
// halves, lane l's sub-blocks l, l+32 at bytes 32 + 16l and l+64, l+96 at 544 + 16l: two 16-byte
// loads (each a warp's 512 contiguous bytes, whole sectors) and one 8-byte load a lane straight
// into registers, no staging in shared memory. (The first decode order put lane l's four at
// 32 + 32l: each 16-byte load of a warp spanned 1 KB and used half of every sector, 37% of the
// launch's sectors in excess by Nsight Compute, s32c; 4-5% slower alone, s32d.) The same integer
// sums and float32 products in the same order as from GGUF's order, so the same bits. Nsight
// Compute put the largest share of the GGUF-order kernel's stalls on shared-memory results
// (short scoreboard: 1.85 cycles of 7.5 an instruction at TP=2, s29a); this order was 13-14%
// faster a launch (bench/iq2_layout_probe.py, s29d: 10.99 against 12.69 us at TP=2's rows,
// 18.82 against 22.00 at TP=1's).
struct DlRow {
    uint4 q[2];
    uint2 d;
};

__device__ __forceinline__ void dl_load(DlRow& r, const unsigned char* row, int lane) {
    r.q[0] = wld((const uint4*)(row + 32 + 16 * lane));
    r.q[1] = wld((const uint4*)(row + 544 + 16 * lane));
    r.d = wld((const uint2*)(row + 8 * (lane >> 3)));
}

// sub-block i (< 4) of a DlRow: its two words and its super-block's scale
__device__ __forceinline__ unsigned dl_w0(const DlRow& r, int i) {
    return (i & 1) ? r.q[i >> 1].z : r.q[i >> 1].x;
}
__device__ __forceinline__ unsigned dl_w1(const DlRow& r, int i) {
    return (i & 1) ? r.q[i >> 1].w : r.q[i >> 1].y;
}
__device__ __forceinline__ float dl_d(const DlRow& r, int i) {
    return h2f((unsigned short)(((i < 2) ? r.d.x : r.d.y) >> (16 * (i & 1))));
}

// A gate row and an up row at byte offset off (nv 16-byte pieces each) into the warp's registers:
// piece i of the pair (gate first) goes to lane i % 32, slot i / 32.
__device__ __forceinline__ void load_rows(uint4 (&buf)[A_MAX_V], const unsigned char* wg,
                                          const unsigned char* wu, long long off, int lane, int nv) {
    const uint4* pg = (const uint4*)(wg + off);
    const uint4* pu = (const uint4*)(wu + off);
#pragma unroll
    for (int v = 0; v < A_MAX_V; v++) {
        const int i = lane + 32 * v;
        if (i < 2 * nv) buf[v] = wld(i < nv ? pg + i : pu + (i - nv));
    }
}

// The shared expert's rows ride in the routed launches (one token): a Q8_0 row r of K = 512 * cpr
// inputs in the split layout (int8 quants q [rows, K], f16 scales d [rows, K/32]) against the
// block's Q8_0 activation (s_q, s_d: q8_0_prologue), by one warp. Lane l takes 16-byte pieces
// l, l+32, ... (q8_0_piece), CH pieces' loads issued before they are used; the same products and
// summation order as matvec.cu's q8_0_rows, so the result is bit-identical to the Q8_0 matvec's.
// Returns the warp's sum in every lane.
// cpr <= CPR_MAX, a multiple of CH.
template <int CPR_MAX, int CH>
__device__ __forceinline__ float q8_0_row_dot(const signed char* __restrict__ q,
                                              const unsigned short* __restrict__ d, long long r,
                                              int cpr, const signed char* s_q, const float* s_d,
                                              int lane) {
    const int K = 512 * cpr;
    float acc = 0.0f;
#pragma unroll
    for (int c0 = 0; c0 < CPR_MAX; c0 += CH) {
        if (c0 < cpr) {
            int4 v[CH];
            unsigned short dh[CH];
#pragma unroll
            for (int u = 0; u < CH; u++) {
                v[u] = wld((const int4*)(q + r * K) + 32 * (c0 + u) + lane);
                dh[u] = wld(d + r * (K / 32) + 16 * (c0 + u) + (lane >> 1));
            }
#pragma unroll
            for (int u = 0; u < CH; u++) acc += q8_0_piece(v[u], dh[u], s_q, s_d, c0 + u, lane);
        }
    }
    return warp_sum(acc);
}

// One such row's pieces held in registers (lane l: pieces c = 0 .. cpr-1, cpr <= CPR_MAX), so that
// its loads can go out early: before the PDL wait (weights only) or with the next routed rows.
template <int CPR_MAX>
struct Q8Row {
    int4 v[CPR_MAX];
    unsigned short dh[CPR_MAX];
};

template <int CPR_MAX>
__device__ __forceinline__ void q8_0_row_load(Q8Row<CPR_MAX>& h, const signed char* __restrict__ q,
                                              const unsigned short* __restrict__ d, long long r,
                                              int cpr, int lane) {
    const int K = 512 * cpr;
#pragma unroll
    for (int c = 0; c < CPR_MAX; c++) {
        if (c < cpr) {
            h.v[c] = wld((const int4*)(q + r * K) + 32 * c + lane);
            h.dh[c] = wld(d + r * (K / 32) + 16 * c + (lane >> 1));
        }
    }
}

// q8_0_row_dot of a held row: the same products in the same order, so the same bits.
template <int CPR_MAX>
__device__ __forceinline__ float q8_0_row_held(const Q8Row<CPR_MAX>& h, int cpr, const signed char* s_q,
                                               const float* s_d, int lane) {
    float acc = 0.0f;
#pragma unroll
    for (int c = 0; c < CPR_MAX; c++)
        if (c < cpr) acc += q8_0_piece(h.v[c], h.dh[c], s_q, s_d, c, lane);
    return warp_sum(acc);
}

// Rows r0, r0 + WARPS, ... (< r0 + nrows) of such a Q8_0 weight (K = 512 * cpr) into L2, each
// lane its pieces: issued before the PDL wait (weights only), so that the shared rows arrive
// while the kernel ahead finishes instead of after the routed work that precedes their sums.
__device__ __forceinline__ void q8_0_rows_to_l2(const signed char* q, const unsigned short* d,
                                                long long r0, int nrows, int cpr, int lane) {
#pragma unroll 1
    for (int j = 0; j < nrows; j += WARPS) {
        const long long r = r0 + j;
#pragma unroll 1
        for (int c = 0; c < cpr; c++) l2_prefetch_warp(q + r * 512 * cpr + 512 * c, lane);
        if (lane == 0) l2_prefetch_one(d + r * 16 * cpr);
    }
}

#ifndef A_ROUTE
#define A_ROUTE 0               // gate/up compiled with the expert choice (route mode; the host's
#endif                          // cuda_experts.swiglu_routed): 128 registers where 101 do without
#define R_MAX_E 256             // experts the in-kernel choice holds (8 per lane)

// A float's bits mapped so that unsigned order is float order (-0 counted as +0 by the caller).
__device__ __forceinline__ unsigned ordered(float f) {
    const unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned warp_max_u32(unsigned v) {
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(FULL, v);
#else
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL, v, o));
    return v;
#endif
}

__device__ __forceinline__ unsigned warp_min_u32(unsigned v) {
    return ~warp_max_u32(~v);         // (complement reverses unsigned order)
}

// One token's expert choice (ds4tp.model.route_select) from the router logits z [NE] (an earlier
// kernel's output), in two parts. route_scores, by the whole block, one expert a thread: p =
// sqrt(softplus(z)) into s_p, and p + bias as a key (its bits in unsigned order) into s_key.
// route_pick, by one warp after the block's barrier: the K largest keys, descending, ties to the
// lower expert id (two warp reductions a pick), or with tid2eid the ids of the token's row of
// that table; weights = p of the chosen ids / max(their sum in slot order, floor) * scale. Lane
// r < K returns slot r's id and weight. NE <= R_MAX_E.
// The arithmetic is the choice's own launch's (kernels/triton_route.py) op for op, so that the
// weights are bit-identical to its: exp as Triton lowers it (ex2.approx of z * log2(e) rounded),
// log1p(y) = log(1 + y) * y / ((1 + y) - 1) (Kahan) with logf (libdevice's, as Triton's tl.log),
// correctly rounded sqrt, division and products. With expf and log1pf instead the weights
// differed in the last bit or two, and a 4-layer model's logits by ~1% after one step, as much
// as every weight one ulp up moves them (bench/route_probe.py; rounding steps such as the KV
// rows' FP8 can turn a last-bit change into a step of their grid).
// (One warp scoring all NE experts, eight a lane, before picking cost ~7 us a layer more than a
// fixed choice and made the step slower than the choice's own launch, s25g; scored by the block,
// the step is 2.9% / 1.7% faster than with that launch at TP=2 / TP=1, s26c, and within 1.8% of
// a fixed choice, s25h.)

__device__ __forceinline__ void route_scores(const float* z, const float* __restrict__ bias, int NE,
                                             float* s_p, unsigned* s_key) {
    for (int e = threadIdx.x; e < NE; e += WARPS * 32) {
        const float v = prior(z + e);
        const float y = ex2_approx(__fmul_rn(v, __int_as_float(0x3FB8AA3B)));     // exp(v)
        const float u = __fadd_rn(1.0f, y);
        const float l1p = u == 1.0f ? y : __fmul_rn(logf(u), __fdiv_rn(y, __fsub_rn(u, 1.0f)));
        const float sp = v > 20.0f ? v : (v < -20.0f ? y : l1p);
        const float p = __fsqrt_rn(sp);
        const float sc = bias != 0 ? __fadd_rn(p, __ldg(bias + e)) : p;
        s_p[e] = p;
        s_key[e] = ordered(__fadd_rn(sc, 0.0f));        // (-0 + 0 = +0: one key for zero)
    }
}

__device__ __forceinline__ void route_pick(const float* s_p, const unsigned* s_key,
                                           const long long* __restrict__ tid2eid,
                                           const long long* tok, int K, int NE, float floor_,
                                           float scale, int lane,
                                           long long& my_id, float& my_w) {
    unsigned kj[R_MAX_E / 32];        // keys; 0 for none or taken (below every score)
#pragma unroll
    for (int j = 0; j < R_MAX_E / 32; j++) {
        const int e = lane + 32 * j;
        kj[j] = e < NE ? s_key[e] : 0u;
    }
    const long long row = tid2eid != 0 ? prior(tok) : 0;
    long long id_r = 0;
    float p_r = 0.0f, tot = 0.0f;
    for (int r = 0; r < K; r++) {
        int bi;
        if (tid2eid != 0) {
            bi = (int)__ldg(tid2eid + row * K + r);
        } else {
            unsigned bk = 0u;
#pragma unroll
            for (int j = 0; j < R_MAX_E / 32; j++) bk = max(bk, kj[j]);
            const unsigned top = warp_max_u32(bk);
            unsigned mine = 0xffffffffu;               // this lane's lowest id holding it
#pragma unroll
            for (int j = R_MAX_E / 32 - 1; j >= 0; j--) if (kj[j] == top) mine = lane + 32 * j;
            bi = (int)warp_min_u32(mine);
            if ((bi & 31) == lane) {
#pragma unroll
                for (int j = 0; j < R_MAX_E / 32; j++) if ((bi >> 5) == j) kj[j] = 0u;   // taken
            }
        }
        const float ps = (bi >= 0 && bi < NE) ? s_p[bi] : 0.0f;   // (a hash id out of range: 0)
        tot = __fadd_rn(tot, ps);                       // (slot order, as triton_route)
        if (lane == r) { id_r = bi; p_r = ps; }
    }
    tot = fmaxf(tot, floor_);
    my_id = id_r;
    my_w = __fmul_rn(__fdiv_rn(p_r, tot), scale);
}

// mid[t, k, n] = swiglu_clamped(gate_e . x_t, up_e . x_t) * rw[t, k], e = ids[t, k]; zeros for
// e < 0. Grid (cdiv(N, rpc), T); block = WARPS warps. The block quantises x_t, then its warps
// take the (slot, row) items of rows n0 .. n0+rpc-1, slot-major: warp w items w, w+WARPS, ...
// Each item's gate and up rows (2 * KB * 66 bytes) are read with 16-byte loads into the warp's
// shared buffer; the next item's loads are issued before the current item is computed (the next
// two items' in flight, 128 registers, made the step 1.6% slower at TP=2 and TP=1, s23g).
// Lane l decodes sub-blocks l, l+32, ... (super-block g/8, sub-block g%8).
// With nsh > 0 (one token), the block also takes rows blockIdx.x*rps .. +rps-1 (< nsh) of the
// shared expert's gate|up, a Q8_0 weight [nsh, 256*KB] in the split layout (sq, sd), into
// ysh: the same numbers as the Q8_0 matvec of x (q8_0_row_dot), before its routed items (after
// them, the step was 0.9% slower at TP=2, s23i). Each warp's first shared row is loaded into
// registers before the PDL wait, later ones into L2; x's Q8_0 comes from the same loads of x as
// its Q8_K.
// With logits (route mode), the block chooses token t's experts itself from its router logits
// [T, NE] (route_scores by the block, then route_pick by the last warp while the others quantise
// x; rbias, tid2eid with the token ids tok as model.route_select takes them) instead of reading
// ids and rw, and block (0, t) writes the choice to ids_out and rw_out [T, K] for the down
// kernel: the choice's own launch goes. The first item's loads then wait for the prologue (every
// warp picking for itself and loading its first rows before quantising x was no faster, s26g).
// Requires (host-checked): KB % 8 == 0, KB <= A_MAX_KB, weights, x and their strides 16-byte
// aligned; in route mode K <= B_MAX_K and NE <= R_MAX_E.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
iq2xxs_swiglu(const unsigned char* __restrict__ wg, const unsigned char* __restrict__ wu,
              long long stride_e, long long stride_n,
              const float* x, long long stride_xt,
              const long long* ids, const float* rw,
              float* __restrict__ out, const unsigned long long* __restrict__ grid_g,
              int N, int KB, int K, int rpc, float clamp,
              const signed char* __restrict__ sq, const unsigned short* __restrict__ sd,
              float* __restrict__ ysh, int nsh, int rps,
              const float* logits, const float* __restrict__ rbias,
              const long long* __restrict__ tid2eid, const long long* tok, long long* ids_out,
              float* rw_out, int NE, float rfloor, float rscale) {
#if A_TAB && !A_DL
#error "A_TAB: the tables serve the decode order's loop (A_DL)"
#endif
#if !A_TAB
    __shared__ unsigned long long s_grid[256];
#endif
    __shared__ long long s_ids[B_MAX_K];     // route mode: this token's choice
    __shared__ float s_rw[B_MAX_K];
#if A_ROUTE
    __shared__ float s_rp[R_MAX_E];          // route mode: the experts' scores and keys
    __shared__ unsigned s_rk[R_MAX_E];
#else
    float* s_rp = 0;
    unsigned* s_rk = 0;
#endif
    __shared__ __align__(16) signed char s_xq[A_MAX_KB * 256];
    __shared__ float s_xd[A_MAX_KB];
#if !A_DL
    __shared__ __align__(16) unsigned char s_row[WARPS][2 * A_ROW_MAX + 16];
#endif
    __shared__ __align__(16) signed char s_q8[A_MAX_KB * 256];     // the shared rows' Q8_0 input
    __shared__ float s_d8[A_MAX_KB * 8];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.y;
    const int n0 = blockIdx.x * rpc;
    const int rows = min(rpc, N - n0);
    const int items = K * rows;
    const int rowb = KB * 66, nv = rowb / 16;        // bytes and 16-byte pieces per row

    if (A_DL && KB != A_MAX_KB) __trap();      // (the decode order: rows of 16 super-blocks)
    pdl_trigger();                    // all blocks resident: the next kernel may launch
#if A_TAB
    extern __shared__ __align__(16) unsigned long long s_tab[];     // A_TAB_BYTES
#pragma unroll
    for (int i = threadIdx.x; i < 256 * 16; i += WARPS * 32) s_tab[32 * (i >> 4) + (i & 15)] = __ldg(grid_g + (i >> 4));
#pragma unroll
    for (int i = threadIdx.x; i < 128 * 16; i += WARPS * 32) {
        const uint2 m = sign_masks((unsigned)(i >> 4));
        s_tab[32 * (i >> 4) + 16 + (i & 15)] = (unsigned long long)m.y << 32 | m.x;
    }
    const IqTab look{(const unsigned char*)s_tab, 8u * (lane & 15)};
#else
    for (int i = threadIdx.x; i < 256; i += WARPS * 32) s_grid[i] = grid_g[i];
    const IqCalc look{s_grid};
#endif
    const int sh0 = blockIdx.x * rps, nsh_b = (nsh > 0 && t == 0) ? max(0, min(rps, nsh - sh0)) : 0;
    Q8Row<A_MAX_KB / 2> shr;          // this warp's first shared row
    if (warp < nsh_b) q8_0_row_load(shr, sq, sd, sh0 + warp, KB / 2, lane);
    if (warp + WARPS < nsh_b) q8_0_rows_to_l2(sq, sd, sh0 + warp + WARPS, nsh_b - warp - WARPS, KB / 2, lane);
    pdl_wait();                       // ids, rw (or logits) and x are earlier kernels' outputs
    const bool choose = A_ROUTE && logits != 0;
    if (choose) {                     // (uniform over the block)
        route_scores(logits + (long long)t * NE, rbias, NE, s_rp, s_rk);
        __syncthreads();
    }
    if (choose && warp == WARPS - 1) {
        long long id;
        float wt;
        route_pick(s_rp, s_rk, tid2eid, tok + t, K, NE, rfloor, rscale, lane, id, wt);
        if (lane < K) {
            if (id >= NE) id = -1;    // (a hash id out of range: no expert, where it would fault)
            s_ids[lane] = id;
            s_rw[lane] = wt;
            if (blockIdx.x == 0) {
                ids_out[t * K + lane] = id;
                rw_out[t * K + lane] = wt;
            }
        }
    }

    // first item's loads go out before the prologue (in route mode, after it)
    // (each item reads its slot's id and router weight from L2: faster than reading them once per
    // warp and shuffling them, which made the step 3.1% / 2.5% slower at TP=2 / TP=1, s22h)
#if A_DL
    DlRow bg[2], bu[2];               // gate and up rows: this item's in one set, the next's loading
#define LOAD_ROWS(h, off) { dl_load(bg[h], wg + (off), lane); dl_load(bu[h], wu + (off), lane); }
#else
    uint4 buf[A_MAX_V];
#define LOAD_ROWS(h, off) load_rows(buf, wg, wu, (off), lane, nv)
#endif
    int item = warp;
    long long e = -1;
    int n = n0;
    // the next item's slot and row (item / rows, item % rows), stepped by WARPS without a
    // division per item
    const int dk = rows > 0 ? WARPS / rows : 0, dr = rows > 0 ? WARPS % rows : 0;
    int kx = rows > 0 ? item / rows : 0, rx = rows > 0 ? item % rows : 0;
    if (!choose) {
        e = item < items ? prior(ids + t * K + kx) : -1;
        n = n0 + (item < items ? rx : 0);
        if (e >= 0) LOAD_ROWS(0, e * stride_e + (long long)n * stride_n);
    }

    // x by two 16-byte loads per lane (prior): with eight 4-byte loads from L2 (.cg, as prior
    // was then), each asked L2 for the lane's 32 bytes again and the step was 1.4% / 2.0% slower
    // at TP=2 / TP=1 (s22h)
    for (int b = warp; b < KB; b += WARPS) {
        const float4* xb = (const float4*)(x + (long long)t * stride_xt + b * 256 + lane * 8);
        const float4 x0 = prior(xb), x1 = prior(xb + 1);
        const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        q8k_block(v, lane, s_xq + b * 256 + 8 * lane, s_xd + b, 0);
        if (nsh_b > 0) q8_0_eight(v, 32 * b + lane, s_q8, s_d8);   // (the same in the whole block)
    }
    __syncthreads();
    if (choose) {
        e = item < items ? s_ids[kx] : -1;
        n = n0 + (item < items ? rx : 0);
        if (e >= 0) LOAD_ROWS(0, e * stride_e + (long long)n * stride_n);
    }
    if (warp < nsh_b) {
        const float y = q8_0_row_held(shr, KB / 2, s_q8, s_d8, lane);
        if (lane == 0) ysh[sh0 + warp] = y;
    }
    for (int j = warp + WARPS; j < nsh_b; j += WARPS) {
        const float y = q8_0_row_dot<A_MAX_KB / 2, 4>(sq, sd, sh0 + j, KB / 2, s_q8, s_d8, lane);
        if (lane == 0) ysh[sh0 + j] = y;
    }

    // the activation of this lane's sub-blocks, the same for every item, in registers (6% faster
    // than reading it from shared memory per item on an H200: 22.5 vs 23.9 us at TP=1; reading
    // it per item with two blocks per SM made the step 1.3% / 2.3% slower at TP=2 / TP=1, s23f)
    int xs_r[A_MAX_KB / 4][8];
    float xd_r[A_MAX_KB / 4];
#pragma unroll
    for (int i = 0; i < A_MAX_KB / 4; i++) {
        if (i < KB / 4) {
            load_act(s_xq + (lane + 32 * i) * 32, xs_r[i]);
            xd_r[i] = s_xd[(lane + 32 * i) >> 3];
        }
    }
#if !A_DL
    unsigned char* sg = s_row[warp];
    unsigned char* su = sg + rowb;
#endif
    // two items a pass (h = 0, 1): in the decode order this item's rows are register set h and
    // the next item's load into set 1 - h, so no registers are copied between items
    while (item < items) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
    if (item < items) {
        const int k = kx;
#if A_DL
        const DlRow& cg = bg[h];                           // this item's rows, in registers
        const DlRow& cu = bu[h];
#else
        if (e >= 0) {
#pragma unroll
            for (int v = 0; v < A_MAX_V; v++) {
                int i = lane + 32 * v;
                if (i < 2 * nv) ((uint4*)sg)[i] = buf[v];   // gate then up, contiguous
            }
        }
        __syncwarp();
#endif
        const long long ecur = e;
        const int ncur = n;
        const int nxt = item + WARPS;
        kx += dk;
        rx += dr;
        if (rx >= rows) { rx -= rows; kx++; }
        e = nxt >= items ? -1 : choose ? s_ids[kx] : prior(ids + t * K + kx);
        n = n0 + (nxt < items ? rx : 0);
        if (e >= 0) LOAD_ROWS(1 - h, e * stride_e + (long long)n * stride_n);
        float mid = 0.0f;
        if (ecur >= 0) {
            float ag = 0.0f, au = 0.0f;
#pragma unroll
            for (int i = 0; i < A_MAX_KB / 4; i++) {
                if (A_DL || i < KB / 4) {                  // (the decode order: KB = A_MAX_KB)
                    const float dx = xd_r[i];
                    const int (&xs)[8] = xs_r[i];
#if A_DL
                    const int ig = iq2xxs_sub_held(dl_w0(cg, i), dl_w1(cg, i), xs, look);
                    const int iu = iq2xxs_sub_held(dl_w0(cu, i), dl_w1(cu, i), xs, look);
                    ag += (float)ig * (dl_d(cg, i) * dx);
                    au += (float)iu * (dl_d(cu, i) * dx);
#else
                    const int g = lane + 32 * i, sb = g >> 3, off = sb * 66 + 2 + 8 * (g & 7);
                    const int ig = iq2xxs_sub(sg, off, xs, s_grid);
                    const int iu = iq2xxs_sub(su, off, xs, s_grid);
                    ag += (float)ig * (h2f(*(const unsigned short*)(sg + sb * 66)) * dx);
                    au += (float)iu * (h2f(*(const unsigned short*)(su + sb * 66)) * dx);
#endif
                }
            }
            const float gsum = warp_sum(ag) * 0.125f;
            const float usum = warp_sum(au) * 0.125f;
            const float gc = fminf(gsum, clamp);
            const float uc = fminf(fmaxf(usum, -clamp), clamp);
            mid = gc / (1.0f + expf(-gc)) * uc * (choose ? s_rw[k] : prior(rw + t * K + k));
        }
        if (lane == 0) out[((long long)t * K + k) * N + ncur] = mid;
#if !A_DL
        __syncwarp();                                      // (before the next item's staging)
#endif
        item = nxt;
    }
    }
    }
#undef LOAD_ROWS
}

// Q8_K of the K slot rows x[t, k, :] into shared memory (int8, scales, sums of 16), two blocks
// per warp at a time (their 16-byte loads issued together); rows of slots without an expert are
// quantised too and never read.
__device__ __forceinline__ void b_prologue(const float* x, long long stride_xt, long long stride_xk,
                                           int t, int K, int KB, int lane, int warp,
                                           signed char* s_xq, float* s_xd, int* s_bs) {
    const int q8_off = 8 * (lane & 15) + (lane >> 4) * B_XH;     // elements 8l..8l+7 (B_XB layout)
    for (int b = warp; b < K * KB; b += 2 * WARPS) {
        const int b2 = b + WARPS;
        const bool two = b2 < K * KB;
        const float4* p1 = (const float4*)(x + (long long)t * stride_xt + (long long)(b / KB) * stride_xk
                                           + (b % KB) * 256 + lane * 8);
        const float4* p2 = (const float4*)(x + (long long)t * stride_xt + (long long)(b2 / KB) * stride_xk
                                           + (b2 % KB) * 256 + lane * 8);
        const float4 a0 = prior(p1), a1 = prior(p1 + 1);
        float4 c0 = make_float4(0.f, 0.f, 0.f, 0.f), c1 = c0;
        if (two) { c0 = prior(p2); c1 = prior(p2 + 1); }
        const float v1[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        q8k_block(v1, lane, s_xq + b * B_XB + q8_off, s_xd + b, s_bs + b * B_BS);
        if (two) {
            const float v2[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
            q8k_block(v2, lane, s_xq + b2 * B_XB + q8_off, s_xd + b2, s_bs + b2 * B_BS);
        }
    }
}

// One (slot, super-block, quarter) unit of a Q2_K row: scale words sc0/sc1 (bytes 8nh..8nh+7),
// qs words q0..q3, d|dmin word dd, against the slot's Q8_K block xq (at 128nh + 16h) and sums bs
// (at 8nh + h); returns d_x * (d * A - dmin * B).
__device__ __forceinline__ float q2k_unit(unsigned sc0, unsigned sc1, unsigned q0, unsigned q1,
                                          unsigned q2, unsigned q3, unsigned dd, int h,
                                          const signed char* xq, const int* bs, float dx) {
    int A = 0, B = 0;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int4 xa = *(const int4*)(xq + 32 * j);
        int dot = __dp4a((int)((q0 >> (2 * j)) & 0x03030303u), xa.x, 0);
        dot = __dp4a((int)((q1 >> (2 * j)) & 0x03030303u), xa.y, dot);
        dot = __dp4a((int)((q2 >> (2 * j)) & 0x03030303u), xa.z, dot);
        dot = __dp4a((int)((q3 >> (2 * j)) & 0x03030303u), xa.w, dot);
        const unsigned scb = ((j < 2 ? sc0 : sc1) >> (8 * (h + 2 * (j & 1)))) & 255u;
        A += dot * (int)(scb & 15u);
        B += (int)(scb >> 4) * bs[2 * j];
    }
    const float d = h2f((unsigned short)(dd & 0xffffu));
    const float dmin = h2f((unsigned short)(dd >> 16));
    return dx * (d * (float)A - dmin * (float)B);
}

// out[t, n] = sum_k down_e . x_{t,k}, e = ids[t, k] (slots with e < 0 add nothing): the routed
// Q2_K down projection summed over the slots. Grid (cdiv(N, rpc), T); block = WARPS warps. The
// block quantises the K slot activations x[t, k, :], then warp w takes rows n0+w, n0+w+WARPS, ...
// Per row the lanes cover (slot, super-block, quarter) units: a quarter (nh, h) of super-block
// sb is qs words 8nh+4h .. +3, whose byte bits 2j hold elements 128nh + 32j + 16h + 4w + 0..3
// (16-block s = 8nh + 2j + h); 4*KB units per slot, spp = 32/(4*KB) slots per pass, B_NP passes.
// A warp's first row is loaded (every slot) before the prologue; each pass's registers then take
// that pass of the warp's next row once summed (two rows loaded at once, with 125 registers, made
// the step 0.6% slower at TP=2, s24a).
// With csh > 0 (one token), each row also adds the shared expert's down row n: a Q8_0 weight
// [N, 512*csh] in the split layout (sq, sd) against swiglu_clamped(gu[:F], gu[F:], clamp), F =
// 512*csh, quantised to Q8_0 in the prologue; out = routed sum + shared dot, each summed as
// its own launch sums it (bit-identical to their sum). A row's shared pieces are held in
// registers, loaded with its routed rows; the first row's before the PDL wait (weights), the
// block's later rows are prefetched into L2 then. gu is loaded with the slot activations.
// Compile-time (the host's defines): B_NP >= cdiv(K, spp) passes, B_SH_MAX >= csh.
// Requires (host-checked): KB in {1, 2, 4, 8}, K <= B_MAX_K, weights and strides 4-byte aligned,
// x and its strides 16-byte aligned; csh in {1, 2, 4}, gu 16-byte aligned.
#define B_SH_CPR 4              // shared down inputs <= 2048
#ifndef B_NP
#define B_NP B_MAX_K            // passes over a row's slots
#endif
#ifndef B_SH_MAX
#define B_SH_MAX B_SH_CPR       // the shared down's pieces per lane per row, at most
#endif
__device__ __forceinline__ void
q2k_down_body(const unsigned char* __restrict__ w, long long stride_e, long long stride_n,
              const float* x, long long stride_xt, long long stride_xk,
              const long long* ids, float* __restrict__ out, long long stride_ot,
              int N, int KB, int K, int rpc,
              const signed char* __restrict__ sq, const unsigned short* __restrict__ sd,
              const float* gu, int csh, float clamp, int bx) {
    __shared__ __align__(16) signed char s_xq[B_MAX_K * B_MAX_KB * B_XB];
    __shared__ int s_bs[B_MAX_K * B_MAX_KB * B_BS];
    __shared__ float s_xd[B_MAX_K * B_MAX_KB];
    __shared__ __align__(16) signed char s_q8[B_SH_MAX * 512];      // the shared down's Q8_0 input
    __shared__ float s_d8[B_SH_MAX * 16];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.y;
    const int n0 = bx * rpc;
    const int nend = min(n0 + rpc, N);
    const int units = 4 * KB, spp = 32 / units;
    const int ks = lane / units, u = lane % units;
    const int sb = u >> 2, nh = (u >> 1) & 1, h = u & 1;
    const bool sh = csh > 0 && t == 0;
    const int F = 512 * csh;
    if (B_NP * spp < K || csh > B_SH_MAX || F / 8 > WARPS * 32) __trap();   // compiled for other shapes

    pdl_trigger();                    // all blocks resident: the next kernel may launch
    Q8Row<B_SH_MAX> shr;              // the shared pieces of the warp's current row
    if (sh && n0 + warp < nend) {
        q8_0_row_load(shr, sq, sd, n0 + warp, csh, lane);
        if (n0 + warp + WARPS < nend) q8_0_rows_to_l2(sq, sd, n0 + warp + WARPS, nend - n0 - warp - WARPS, csh, lane);
    }
    pdl_wait();                       // ids, x and gu are earlier kernels' outputs
    int e[B_NP];
#pragma unroll
    for (int p = 0; p < B_NP; p++) {
        const int k = p * spp + ks;
        e[p] = (k < K) ? (int)prior(ids + t * K + k) : -1;
    }
    // gu's 8 gate and 8 up values of this thread's Q8_0 quarter-block, loaded with the slot rows
    const int gi = threadIdx.x;
    const bool gq = sh && gi < F / 8;
    float4 ga = make_float4(0.f, 0.f, 0.f, 0.f), gc = ga, ua = ga, uc = ga;
    if (gq) {
        ga = prior((const float4*)(gu + 8 * gi)); gc = prior((const float4*)(gu + 8 * gi + 4));
        ua = prior((const float4*)(gu + F + 8 * gi)); uc = prior((const float4*)(gu + F + 8 * gi + 4));
    }
    unsigned qw[B_NP][4], sc[B_NP][2], dd[B_NP];
    // pass p of a row into its registers (slots without an expert load nothing)
#define B_LOAD(p, row)                                                                        \
    if (p * spp < K && e[p] >= 0) {                                                           \
        const unsigned* b32 = (const unsigned*)(w + (long long)e[p] * stride_e                \
                                                + (long long)(row) * stride_n + sb * 84);     \
        sc[p][0] = wld(b32 + 2 * nh);                                                         \
        sc[p][1] = wld(b32 + 2 * nh + 1);                                                     \
        _Pragma("unroll") for (int i = 0; i < 4; i++) qw[p][i] = wld(b32 + 4 + 8 * nh + 4 * h + i); \
        dd[p] = wld(b32 + 20);                                                                \
    }
    int n = n0 + warp;
    if (n < nend) {
#pragma unroll
        for (int p = 0; p < B_NP; p++) { B_LOAD(p, n) }
    }

    b_prologue(x, stride_xt, stride_xk, t, K, KB, lane, warp, s_xq, s_xd, s_bs);
    if (gq) {                         // (F/8 is a multiple of 64: whole warps)
        float v[8] = {ga.x, ga.y, ga.z, ga.w, gc.x, gc.y, gc.z, gc.w};
        swiglu8(v, ua, uc, clamp);
        q8_0_eight(v, gi, s_q8, s_d8);
    }
    __syncthreads();

    // Each pass's registers take the same pass of the warp's next row as soon as they are summed,
    // so the next row's loads go out while this one is summed.
    for (; n < nend; n += WARPS) {
        const int nrow = n + WARPS;
        float acc = 0.0f;
#pragma unroll
        for (int p = 0; p < B_NP; p++) {
            const int k = p * spp + ks;
            if (p * spp < K && e[p] >= 0) {
                const int blk = k * KB + sb;
                acc += q2k_unit(sc[p][0], sc[p][1], qw[p][0], qw[p][1], qw[p][2], qw[p][3], dd[p], h,
                                s_xq + blk * B_XB + B_XH * nh + 16 * h, s_bs + blk * B_BS + 8 * nh + h,
                                s_xd[blk]);
            }
            if (nrow < nend) { B_LOAD(p, nrow) }
        }
        acc = warp_sum(acc);
        if (sh) {
            acc += q8_0_row_held(shr, csh, s_q8, s_d8, lane);
            if (nrow < nend) q8_0_row_load(shr, sq, sd, nrow, csh, lane);
        }
        if (lane == 0) out[(long long)t * stride_ot + n] = acc;
    }
#undef B_LOAD
}
extern "C" __global__ void __launch_bounds__(WARPS * 32)
q2k_down_sum(const unsigned char* __restrict__ w, long long stride_e, long long stride_n,
             const float* x, long long stride_xt, long long stride_xk,
             const long long* ids, float* __restrict__ out, long long stride_ot,
             int N, int KB, int K, int rpc,
             const signed char* __restrict__ sq, const unsigned short* __restrict__ sd,
             const float* gu, int csh, float clamp) {
    q2k_down_body(w, stride_e, stride_n, x, stride_xt, stride_xk, ids, out, stride_ot, N, KB, K, rpc,
                  sq, sd, gu, csh, clamp, blockIdx.x);
}

// q2k_down_sum with the next HC update's Sinkhorn as one more block (one token; the grid is one
// block wider): as matvec.cu q8_0_matvec_mix.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
q2k_down_sum_mix(const unsigned char* __restrict__ w, long long stride_e, long long stride_n,
                 const float* x, long long stride_xt, long long stride_xk,
                 const long long* ids, float* __restrict__ out, long long stride_ot,
                 int N, int KB, int K, int rpc,
                 const signed char* __restrict__ sq, const unsigned short* __restrict__ sd,
                 const float* gu, int csh, float clamp,
                 const float* mz, const float* __restrict__ ms, const float* __restrict__ mb,
                 float* mpost, float* mm, float meps, int miters) {
    if (hc_sinkhorn_block(mz, ms, mb, mpost, mm, meps, miters)) return;
    q2k_down_body(w, stride_e, stride_n, x, stride_xt, stride_xk, ids, out, stride_ot, N, KB, K, rpc,
                  sq, sd, gu, csh, clamp, blockIdx.x - MIX_FIRST);
}
