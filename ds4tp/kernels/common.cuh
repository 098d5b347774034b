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
