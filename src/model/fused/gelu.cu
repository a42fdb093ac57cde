// GELU, optionally of y + bias (the MLP's first layer: the bias add and the activation in
// one pass), forward and backward, for f32 or bf16 values with a bias of the same dtype,
// computing in f32 (autocast's rule). Two activations: exact GELU, z Φ(z) (`gelu_*`), and
// OpenAI's quick GELU, z σ(1.702 z) (`quick_gelu_*`). Compiled at start-up by NVRTC after
// kernels.cuh (src/model/fused/cuda.rs).
//
//   {,quick_}gelu_fwd_{f32,bf16}: a thread per element: z = y + bias[column], out = act(z).
//   {,quick_}gelu_bwd_{f32,bf16}: a thread per element: dz = g act'(z), in y's dtype.
//   {,quick_}gelu_bias_partial_{f32,bf16}: a thread per column and chunk of rows: Σ dz in
//     f32 (from y, bias and g again, not from the rounded dz: as the CPU sums f32
//     gradients).
//   {,quick_}gelu_bias_grad_{f32,bf16}: a thread per column: the chunks' sums in chunk
//     order (column_sums, kernels.cuh).

#define ACT_ERF 0
#define ACT_QUICK 1

__device__ __forceinline__ float gelu_of(float z) {
    return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
}

__device__ __forceinline__ float gelu_grad_of(float z, float g) {
    const float cdf = 0.5f * (1.0f + erff(z * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * z * z);
    return g * (cdf + z * pdf);
}

// Quick GELU: z σ(1.702 z), and its derivative σ + 1.702 z σ (1 − σ).
__device__ __forceinline__ float quick_gelu_of(float z) {
    return z / (1.0f + expf(-1.702f * z));
}

__device__ __forceinline__ float quick_gelu_grad_of(float z, float g) {
    const float s = 1.0f / (1.0f + expf(-1.702f * z));
    return g * (s + 1.702f * z * s * (1.0f - s));
}

template <int ACT>
__device__ __forceinline__ float act_of(float z) {
    return ACT == ACT_QUICK ? quick_gelu_of(z) : gelu_of(z);
}

template <int ACT>
__device__ __forceinline__ float act_grad_of(float z, float g) {
    return ACT == ACT_QUICK ? quick_gelu_grad_of(z, g) : gelu_grad_of(z, g);
}

// y + bias at element i (bias 0: none).
template <typename T>
__device__ __forceinline__ float biased(const T* y, const T* bias, long long i, int width) {
    return load(y, i) + (bias ? load(bias, i % width) : 0.0f);
}

template <int ACT, typename T>
__device__ void gelu_fwd(
    unsigned long long y_at,
    unsigned long long bias_at,
    unsigned long long out_at,
    long long n,
    int width)
{
    const long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) {
        return;
    }
    store((T*)out_at, i, act_of<ACT>(biased((const T*)y_at, (const T*)bias_at, i, width)));
}

template <int ACT, typename T>
__device__ void gelu_bwd(
    unsigned long long y_at,
    unsigned long long bias_at,
    unsigned long long dy_at,
    unsigned long long dz_at,
    long long n,
    int width)
{
    const long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) {
        return;
    }
    const float z = biased((const T*)y_at, (const T*)bias_at, i, width);
    store((T*)dz_at, i, act_grad_of<ACT>(z, load((const T*)dy_at, i)));
}

// Grid: (column blocks, chunks); partial holds chunks × width floats.
template <int ACT, typename T>
__device__ void gelu_bias_partial(
    unsigned long long y_at,
    unsigned long long bias_at,
    unsigned long long dy_at,
    unsigned long long partial_at,
    long long rows,
    int width,
    long long rows_per_chunk)
{
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= width) {
        return;
    }
    const T* y = (const T*)y_at;
    const T* bias = (const T*)bias_at;
    const T* g = (const T*)dy_at;
    const long long first = (long long)blockIdx.y * rows_per_chunk;
    const long long last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
    float sum = 0.0f;
    for (long long r = first; r < last; ++r) {
        const long long i = r * width + j;
        sum += act_grad_of<ACT>(biased(y, bias, i, width), load(g, i));
    }
    ((float*)partial_at)[(long long)blockIdx.y * width + j] = sum;
}

#define GELU_ENTRIES(PREFIX, ACT, NAME, T)                                                  \
    extern "C" __global__ void PREFIX##_fwd_##NAME(                                          \
        unsigned long long y, unsigned long long bias, unsigned long long out,               \
        long long n, int width)                                                              \
    {                                                                                        \
        gelu_fwd<ACT, T>(y, bias, out, n, width);                                            \
    }                                                                                        \
    extern "C" __global__ void PREFIX##_bwd_##NAME(                                          \
        unsigned long long y, unsigned long long bias, unsigned long long dy,                \
        unsigned long long dz, long long n, int width)                                       \
    {                                                                                        \
        gelu_bwd<ACT, T>(y, bias, dy, dz, n, width);                                         \
    }                                                                                        \
    extern "C" __global__ void PREFIX##_bias_partial_##NAME(                                 \
        unsigned long long y, unsigned long long bias, unsigned long long dy,                \
        unsigned long long partial, long long rows, int width, long long rows_per_chunk)     \
    {                                                                                        \
        gelu_bias_partial<ACT, T>(y, bias, dy, partial, rows, width, rows_per_chunk);        \
    }                                                                                        \
    extern "C" __global__ void PREFIX##_bias_grad_##NAME(                                    \
        unsigned long long partial, unsigned long long dbias, int width, int chunks)         \
    {                                                                                        \
        column_sums<T>(partial, dbias, width, chunks);                                       \
    }

GELU_ENTRIES(gelu, ACT_ERF, f32, float)
GELU_ENTRIES(gelu, ACT_ERF, bf16, unsigned short)
GELU_ENTRIES(quick_gelu, ACT_QUICK, f32, float)
GELU_ENTRIES(quick_gelu, ACT_QUICK, bf16, unsigned short)
