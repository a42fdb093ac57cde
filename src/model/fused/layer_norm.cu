// Layer norm over the last dimension on the GPU, forward and backward, for rows of f32 or
// bf16 inputs with f32 weights, bias, output and statistics (autocast's rule: a norm
// computes and returns f32). Compiled at start-up by NVRTC after kernels.cuh
// (src/model/fused/cuda.rs).
//
// The weight gradients reduce rows in chunks whose partial sums are added in chunk order.
//
//   layer_norm_fwd_{f32,bf16}: one block per row: the row's mean, then its variance about
//     the mean (two passes: exact for values far from 0), y = (x − mean)·rstd·w + b, and
//     the row's (mean, rstd) kept for backward.
//   layer_norm_fwd_{f32,bf16}_to_bf16: the same, y rounded to bf16 as it is written: what
//     the f32 output cast to bf16 would be, bit for bit, for a norm whose only reader is a
//     bf16 matrix product (the f32 output and the cast's pass are never made).
//   layer_norm_bwd_dx_{f32,bf16}: one block per row: dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)),
//     in x's dtype.
//   layer_norm_bwd_partial_{f32,bf16}: a thread per column and chunk of rows: Σ g·x̂ and Σ g.
//   ..._from_bf16: the same two from a bf16 output gradient (a norm that wrote bf16), read
//     and widened as it is used: no f32 copy of it first.
//   layer_norm_bwd_dw: a thread per column: the chunks' partial sums, in chunk order.

template <typename T, typename O>
__device__ void ln_fwd(
    unsigned long long x_at,
    unsigned long long w_at,
    unsigned long long b_at,
    unsigned long long y_at,
    unsigned long long stats_at,
    int width,
    float eps)
{
    __shared__ float shared[WARPS + 1];
    const long long row = blockIdx.x;
    const T* x = (const T*)x_at + row * width;
    const float* w = (const float*)w_at;
    const float* b = (const float*)b_at;
    O* y = (O*)y_at + row * width;
    float s = 0.0f;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        s += load(x, i);
    }
    const float mean = block_sum(s, shared) / (float)width;
    float q = 0.0f;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        const float d = load(x, i) - mean;
        q += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(q, shared) / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += THREADS) {
        store(y, i, (load(x, i) - mean) * rstd * w[i] + b[i]);
    }
    if (threadIdx.x == 0) {
        float* stats = (float*)stats_at;
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

template <typename T, typename G>
__device__ void ln_bwd_dx(
    unsigned long long x_at,
    unsigned long long w_at,
    unsigned long long dy_at,
    unsigned long long stats_at,
    unsigned long long dx_at,
    int width)
{
    __shared__ float shared[WARPS + 1];
    const long long row = blockIdx.x;
    const T* x = (const T*)x_at + row * width;
    const float* w = (const float*)w_at;
    const G* g = (const G*)dy_at + row * width;
    T* dx = (T*)dx_at + row * width;
    const float* stats = (const float*)stats_at;
    const float mean = stats[2 * row];
    const float rstd = stats[2 * row + 1];
    float sum_gw = 0.0f;
    float sum_gw_xhat = 0.0f;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        const float gw = load(g, i) * w[i];
        sum_gw += gw;
        sum_gw_xhat += gw * ((load(x, i) - mean) * rstd);
    }
    const float mean_gw = block_sum(sum_gw, shared) / (float)width;
    const float mean_gw_xhat = block_sum(sum_gw_xhat, shared) / (float)width;
    for (int i = threadIdx.x; i < width; i += THREADS) {
        const float h = (load(x, i) - mean) * rstd;
        store(dx, i, rstd * (load(g, i) * w[i] - mean_gw - h * mean_gw_xhat));
    }
}

// Grid: (column blocks, chunks). partial holds 2 × chunks × width floats: Σ g·x̂ of each
// chunk, then Σ g.
template <typename T, typename G>
__device__ void ln_bwd_partial(
    unsigned long long x_at,
    unsigned long long dy_at,
    unsigned long long stats_at,
    unsigned long long partial_at,
    long long rows,
    int width,
    long long rows_per_chunk)
{
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= width) {
        return;
    }
    const T* x = (const T*)x_at;
    const G* g = (const G*)dy_at;
    const float* stats = (const float*)stats_at;
    float* partial = (float*)partial_at;
    const long long chunk = blockIdx.y;
    const long long chunks = gridDim.y;
    const long long first = chunk * rows_per_chunk;
    const long long last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
    float dw = 0.0f;
    float db = 0.0f;
    for (long long r = first; r < last; ++r) {
        const float gi = load(g, r * width + j);
        dw += gi * ((load(x, r * width + j) - stats[2 * r]) * stats[2 * r + 1]);
        db += gi;
    }
    partial[chunk * width + j] = dw;
    partial[(chunks + chunk) * width + j] = db;
}

extern "C" __global__ void layer_norm_bwd_dw(
    unsigned long long partial_at,
    unsigned long long dw_at,
    unsigned long long db_at,
    int width,
    int chunks)
{
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= width) {
        return;
    }
    const float* partial = (const float*)partial_at;
    float dw = 0.0f;
    float db = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        dw += partial[(long long)c * width + j];
        db += partial[(long long)(chunks + c) * width + j];
    }
    ((float*)dw_at)[j] = dw;
    ((float*)db_at)[j] = db;
}

#define LAYER_NORM_ENTRIES(NAME, T)                                                                     \
    extern "C" __global__ void layer_norm_fwd_##NAME(                                        \
        unsigned long long x, unsigned long long w, unsigned long long b,                    \
        unsigned long long y, unsigned long long stats, int width, float eps)                \
    {                                                                                        \
        ln_fwd<T, float>(x, w, b, y, stats, width, eps);                                        \
    }                                                                                        \
    extern "C" __global__ void layer_norm_fwd_##NAME##_to_bf16(                              \
        unsigned long long x, unsigned long long w, unsigned long long b,                    \
        unsigned long long y, unsigned long long stats, int width, float eps)                \
    {                                                                                        \
        ln_fwd<T, unsigned short>(x, w, b, y, stats, width, eps);                               \
    }                                                                                        \
    extern "C" __global__ void layer_norm_bwd_dx_##NAME(                                     \
        unsigned long long x, unsigned long long w, unsigned long long dy,                   \
        unsigned long long stats, unsigned long long dx, int width)                          \
    {                                                                                        \
        ln_bwd_dx<T, float>(x, w, dy, stats, dx, width);                                        \
    }                                                                                        \
    extern "C" __global__ void layer_norm_bwd_dx_##NAME##_from_bf16(                         \
        unsigned long long x, unsigned long long w, unsigned long long dy,                   \
        unsigned long long stats, unsigned long long dx, int width)                          \
    {                                                                                        \
        ln_bwd_dx<T, unsigned short>(x, w, dy, stats, dx, width);                               \
    }                                                                                        \
    extern "C" __global__ void layer_norm_bwd_partial_##NAME(                                \
        unsigned long long x, unsigned long long dy, unsigned long long stats,               \
        unsigned long long partial, long long rows, int width, long long rows_per_chunk)     \
    {                                                                                        \
        ln_bwd_partial<T, float>(x, dy, stats, partial, rows, width, rows_per_chunk);           \
    }                                                                                        \
    extern "C" __global__ void layer_norm_bwd_partial_##NAME##_from_bf16(                    \
        unsigned long long x, unsigned long long dy, unsigned long long stats,               \
        unsigned long long partial, long long rows, int width, long long rows_per_chunk)     \
    {                                                                                        \
        ln_bwd_partial<T, unsigned short>(x, dy, stats, partial, rows, width, rows_per_chunk);  \
    }

LAYER_NORM_ENTRIES(f32, float)
LAYER_NORM_ENTRIES(bf16, unsigned short)
