// Softmax over the last dimension on the GPU, forward and backward, for rows of f32 or bf16
// values, computing in f32 and returning the input's dtype (autocast's rule). Compiled at
// start-up by NVRTC after kernels.cuh (src/model/fused/cuda.rs).
//
//   softmax_fwd_{f32,bf16}: one block per row: the row's maximum, Σ exp(x − max), then
//     y = exp(x − max) / Σ. A row of −∞ only gives NaNs, as the CPU's softmax does.
//   softmax_bwd_{f32,bf16}: one block per row: dx = y ⊙ (g − Σ y ⊙ g), from the forward's
//     output y.
//   attention_softmax_fwd_f32: attention's probabilities from the raw scores q·kᵀ, one
//     block per (sample, head, query) row of `len` keys: p = softmax(scale·s + mask), the
//     additive mask (optional) broadcast over the heads and, through its strides, over
//     samples or queries. The scale and the mask cost no pass of their own.
//   attention_softmax_bwd_{f32,bf16}: ds = scale · p ⊙ (g − Σ p ⊙ g), the raw scores'
//     gradient; p and ds f32, or both bf16 (g f32).

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

// Rows are (sample, head, query) in that order; the mask's row for one is at
// mask + sample·mask_sample_stride + query·mask_query_stride (strides 0 where it
// broadcasts), `len` keys long.
extern "C" __global__ void attention_softmax_fwd_f32(
    unsigned long long scores_at,
    unsigned long long mask_at,
    unsigned long long probs_at,
    int len,
    int heads,
    long long mask_sample_stride,
    int mask_query_stride,
    float scale)
{
    __shared__ float shared[WARPS + 1];
    const long long row = blockIdx.x;
    const float* s = (const float*)scores_at + row * len;
    float* p = (float*)probs_at + row * len;
    const long long query = row % len;
    const long long sample = row / ((long long)len * heads);
    const float* mask = mask_at
        ? (const float*)mask_at + sample * mask_sample_stride + query * mask_query_stride
        : 0;
    float m = NEG_INFINITY;
    for (int i = threadIdx.x; i < len; i += THREADS) {
        m = fmaxf(m, s[i] * scale + (mask ? mask[i] : 0.0f));
    }
    m = block_max(m, shared);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < len; i += THREADS) {
        sum += expf(s[i] * scale + (mask ? mask[i] : 0.0f) - m);
    }
    const float inv = 1.0f / block_sum(sum, shared);
    for (int i = threadIdx.x; i < len; i += THREADS) {
        p[i] = expf(s[i] * scale + (mask ? mask[i] : 0.0f) - m) * inv;
    }
}

// The probabilities and the scores' gradient in T (f32, or bf16 where attention keeps its
// probabilities rounded for its GEMMs), the probabilities' gradient in f32.
template <typename T>
__device__ void attention_softmax_bwd(
    unsigned long long probs_at,
    unsigned long long g_at,
    unsigned long long ds_at,
    int len,
    float scale)
{
    __shared__ float shared[WARPS + 1];
    const long long row = blockIdx.x;
    const T* p = (const T*)probs_at + row * len;
    const float* g = (const float*)g_at + row * len;
    T* ds = (T*)ds_at + row * len;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < len; i += THREADS) {
        dot += load(p, i) * g[i];
    }
    dot = block_sum(dot, shared);
    for (int i = threadIdx.x; i < len; i += THREADS) {
        store(ds, i, scale * load(p, i) * (g[i] - dot));
    }
}

extern "C" __global__ void attention_softmax_bwd_f32(
    unsigned long long probs, unsigned long long g, unsigned long long ds, int len, float scale)
{
    attention_softmax_bwd<float>(probs, g, ds, len, scale);
}

extern "C" __global__ void attention_softmax_bwd_bf16(
    unsigned long long probs, unsigned long long g, unsigned long long ds, int len, float scale)
{
    attention_softmax_bwd<unsigned short>(probs, g, ds, len, scale);
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
