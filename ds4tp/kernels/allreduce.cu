// Sum all-reduce of a float32 tensor between the two ranks of one host, through each other's
// memory (CUDA IPC; NVLink or PCIe peer access), in one kernel launch. Host side and the
// protocol's proof sketch: ds4tp/kernels/cuda_allreduce.py. Twin: NCCL's all-reduce (the same
// sum: a + b is b + a in IEEE arithmetic, so both ranks and both paths give the same bits).
//
// Each rank's buffer (its own GPU's memory, mapped into the peer's address space) holds two
// receive slots of cap floats and two flag words; ctr (its own, never shared) counts the
// all-reduces this rank has made. All-reduce number e (1, 2, ...) uses slot e % 2:
//   1. push x into the PEER's slot (remote stores, posted over the link); after a block barrier
//      one thread stores e into the peer's flag word of that slot (release at system scope: the
//      barrier orders the block's stores before it, and the release publishes them with it);
//   2. one thread waits until its own flag word of the slot reads e (acquire), written by the
//      peer's step 1; then every thread adds its slot (L2 reads) to x, in place.
// The slot the peer writes at e was last read by this rank at e - 2, which finished before this
// rank stored e - 1 (stream order) and the peer waited for that e - 1 before reaching e: a slot is
// never overwritten while read. A flag word takes e only from all-reduce e, so a rank that got
// out of step waits instead of reading another all-reduce's numbers, and the wait ends in a trap
// after timeout_ns (a lost peer becomes an error, never a hang).
// One block; x 16-byte aligned, n a multiple of 4, n <= cap (host-checked).

#ifndef AR_TRIGGER_LATE
#define AR_TRIGGER_LATE 0       // 1: the next kernel launches only when this one ends (timed)
#endif
#ifndef AR_FENCE_ALL
#define AR_FENCE_ALL 0          // 1: every thread also fences its own stores before the barrier
#endif                          // (chained TP=2 decode 251.8 against 258.5 tok/s without, s27c)

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void store_release_sys(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ unsigned long long load_acquire_sys(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

extern "C" __global__ void __launch_bounds__(1024)
ar2_sum(float* x, long long n, float* peer_slots, const float* my_slots, long long cap,
        unsigned long long* peer_flags, const unsigned long long* my_flags,
        unsigned long long* ctr, unsigned long long timeout_ns) {
    __shared__ unsigned long long s_e;
#if !AR_TRIGGER_LATE
    pdl_trigger();                    // the next kernel may launch and run up to its own wait
#endif
    pdl_wait();                       // x is an earlier kernel's output
    if (threadIdx.x == 0) s_e = __ldcg(ctr) + 1;   // (ctr: this rank's all-reduces, in stream order)
    __syncthreads();
    const unsigned long long e = s_e;
    const long long slot = (long long)(e & 1ull) * cap;
    float4* dst = (float4*)(peer_slots + slot);
    const float4* src = (const float4*)(my_slots + slot);
    float4* x4 = (float4*)x;
    const long long n4 = n / 4;
    for (long long i = threadIdx.x; i < n4; i += blockDim.x) dst[i] = prior(x4 + i);
#if AR_FENCE_ALL
    __threadfence_system();
#endif
    __syncthreads();
    if (threadIdx.x == 0) {
        // the release at system scope after the barrier publishes the block's stores with the
        // flag (vLLM's custom all-reduce relies on the same)
        store_release_sys(peer_flags + (e & 1ull), e);
        const unsigned long long t0 = global_ns();
        while (load_acquire_sys(my_flags + (e & 1ull)) != e) {
            if (global_ns() - t0 > timeout_ns) __trap();   // the peer never came
        }
        *ctr = e;
    }
    __syncthreads();
    for (long long i = threadIdx.x; i < n4; i += blockDim.x) {
        const float4 a = prior(x4 + i), b = __ldcg(src + i);
        x4[i] = make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    }
}
