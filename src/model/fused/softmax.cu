// Softmax over the last dimension on the GPU, forward and backward, for rows of f32 or bf16
// values, computing in f32 and returning the input's dtype (autocast's rule). Compiled at
// start-up by NVRTC after kernels.cuh (src/model/fused/cuda.rs).
//
//   softmax_fwd_{f32,bf16}: one block per row: the row's maximum, Σ exp(x − max), then
//     y = exp(x − max) / Σ. A row of −∞ only gives NaNs, as the CPU's softmax does.
//   softmax_bwd_{f32,bf16}: one block per row: dx = y ⊙ (g − Σ y ⊙ g), from the forward's
//     output y.

template <typename T>
__device__ void softmax_fwd(unsigned long long x_at, unsigned long long y_at, int width)
{
    __shared__ float shared[WARPS + 1];
    const long long row = blockIdx.x;
    const T* x = (const T*)x_at + row * width;
    T* y = (T*)y_at + row * width;
    float m = NEG_INFINITY;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        m = fmaxf(m, load(x, i));
    }
    m = block_max(m, shared);
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        s += expf(load(x, i) - m);
    }
    const float inv = 1.0f / block_sum(s, shared);
    for (int i = threadIdx.x; i < width; i += THREADS) {
        store(y, i, expf(load(x, i) - m) * inv);
    }
}

template <typename T>
__device__ void softmax_bwd(
    unsigned long long y_at,
    unsigned long long g_at,
    unsigned long long dx_at,
    int width)
{
    __shared__ float shared[WARPS + 1];
    const long long row = blockIdx.x;
    const T* y = (const T*)y_at + row * width;
    const T* g = (const T*)g_at + row * width;
    T* dx = (T*)dx_at + row * width;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        dot += load(y, i) * load(g, i);
    }
    dot = block_sum(dot, shared);
    for (int i = threadIdx.x; i < width; i += THREADS) {
        store(dx, i, load(y, i) * (load(g, i) - dot));
    }
}

#define SOFTMAX_ENTRIES(NAME, T)                                                             \
    extern "C" __global__ void softmax_fwd_##NAME(                                           \
        unsigned long long x, unsigned long long y, int width)                               \
    {                                                                                        \
        softmax_fwd<T>(x, y, width);                                                         \
    }                                                                                        \
    extern "C" __global__ void softmax_bwd_##NAME(                                           \
        unsigned long long y, unsigned long long g, unsigned long long dx, int width)        \
    {                                                                                        \
        softmax_bwd<T>(y, g, dx, width);                                                     \
    }

SOFTMAX_ENTRIES(f32, float)
SOFTMAX_ENTRIES(bf16, unsigned short)
