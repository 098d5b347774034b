// Helpers shared by the CUDA C kernels (experts.cu, matvec.cu); ds4tp.kernels.cuda_c compiles
// every .cu file with this text in front of it. No headers: NVRTC sees only built-in types and
// intrinsics.
#define FULL 0xffffffffu

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
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

// A load of an earlier kernel's output (after pdl_wait()), cached in L2 only (ld.global.cg).
// Such pointers are never `const __restrict__`: with that the compiler may read them through the
// non-coherent read-only path (ld.global.nc), which is only valid for data that no one writes
// during this kernel's lifetime. Under PDL this kernel is resident before the kernel ahead has
// written its output, and a read-only-path load returned stale bytes: q2k_down_sum read expert
// ids that were not this step's and faulted (graph replays, sessions 18-22; cuda-gdb, s22d).
// Weights and tables are read-only for the whole step and keep __ldg. tests/test_ptx_loads.py
// checks every kernel's PTX for read-only-path loads from anything but its weight parameters.
template <typename T>
__device__ __forceinline__ T prior(const T* p) { return __ldcg(p); }
