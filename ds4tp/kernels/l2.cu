// Weight bytes a later launch of the decode step reads, asked into L2 ahead of it (host side and
// the reasons: ds4tp/kernels/l2.py). Compiled by NVRTC with common.cuh in front.
//
// Up to six byte ranges [p_r, p_r + n_r), each 16-byte aligned with n_r a multiple of 16, cut
// into `chunk`-byte pieces; piece i of a range goes to thread (i mod threads) counted block-minor,
// so consecutive pieces land on different SMs (each SM's copy engine issues its own pieces).
// Nothing is read into registers and nothing is written: results never depend on this kernel.

#ifndef L2_MODE
#define L2_MODE 0    // 0: bulk prefetch (sm_90+), 1: one prefetch.global.L2 per 128-byte line,
#endif               // 2: 16-byte loads whose values are dropped (bench/l2_probe.py times all three)

__device__ __forceinline__ unsigned l2_range(const char* p, long long n, long long chunk, long long t,
                                             long long threads) {
    unsigned acc = 0;
    for (long long off = t * chunk; off < n; off += threads * chunk) {
        const long long left = n - off;
        const unsigned size = (unsigned)(left < chunk ? left : chunk);
#if L2_MODE == 0 && __CUDA_ARCH__ >= 900
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p + off), "r"(size) : "memory");
#elif L2_MODE == 2
        for (unsigned b = 0; b < size; b += 16) acc ^= __ldcg((const uint4*)(p + off + b)).x;
#else
        for (unsigned b = 0; b < size; b += 128) asm volatile("prefetch.global.L2 [%0];" :: "l"(p + off + b));
#endif
    }
    return acc;
}

extern "C" __global__ void __launch_bounds__(128)
l2_prefetch(const char* p0, long long n0, const char* p1, long long n1, const char* p2, long long n2,
            const char* p3, long long n3, const char* p4, long long n4, const char* p5, long long n5,
            long long chunk) {
    pdl_trigger();
    const long long threads = (long long)gridDim.x * blockDim.x;
    const long long t = (long long)threadIdx.x * gridDim.x + blockIdx.x;
    unsigned acc = l2_range(p0, n0, chunk, t, threads);
    acc ^= l2_range(p1, n1, chunk, t, threads);
    acc ^= l2_range(p2, n2, chunk, t, threads);
    acc ^= l2_range(p3, n3, chunk, t, threads);
    acc ^= l2_range(p4, n4, chunk, t, threads);
    acc ^= l2_range(p5, n5, chunk, t, threads);
    if (chunk < 0) *(unsigned*)p0 = acc;     // never (chunk > 0): keeps mode 2's loads alive
    // A PDL kernel that finished before the kernel ahead would let the next one's wait return
    // early: waiting here keeps "the kernel ahead has finished" transitive along the stream.
    pdl_wait();
}
