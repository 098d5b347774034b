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
