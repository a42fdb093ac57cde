// A gradient added into its running f32 sum in place, widened from bf16 on the way
// (src/model/fused/accumulate.rs: micro-batches' gradients). Compiled at start-up by NVRTC
// after kernels.cuh (src/model/fused/cuda.rs).
//
//   accumulate_{f32,bf16}: a thread per element: sum[i] += g[i].

template <typename T>
__device__ void accumulate(unsigned long long sum_at, unsigned long long g_at, long long n) {
    const long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) {
        return;
    }
    float* sum = (float*)sum_at;
    sum[i] = sum[i] + load((const T*)g_at, i);
}

extern "C" __global__ void accumulate_f32(unsigned long long sum, unsigned long long g, long long n) {
    accumulate<float>(sum, g, n);
}

extern "C" __global__ void accumulate_bf16(unsigned long long sum, unsigned long long g, long long n) {
    accumulate<unsigned short>(sum, g, n);
}
