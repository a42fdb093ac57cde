// A linear layer's bias add, alone or with the residual add after it, in one pass each
// way. With the residual add: the end of each transformer block's branch (the attention's
// output projection, the MLP's second layer). The branch `y` and its bias are f32 or bf16, the residual stream f32 (under
// mixed precision the stream stays f32). The plain ops made three passes forward (bias
// add, cast to f32, add) and a separate reduction over the rows for the bias gradient;
// the maths here is theirs, rounding included. Compiled at start-up by NVRTC after
// kernels.cuh (src/model/fused/cuda.rs).
//
//   bias_residual_fwd_{f32,bf16}: a thread per element: z = y + bias[column], rounded to
//     y's dtype; out = stream + z (f32).
//   bias_residual_bwd_partial_{f32,bf16}: a thread per column and chunk of rows: the
//     branch's gradient, the output's rounded to y's dtype, written (where `dy` is not
//     null: in f32 it is the output's own) and summed in f32 per chunk.
//   bias_add_fwd_{f32,bf16}: a thread per element: out = y + bias[column], in y's dtype
//     (a linear layer's bias where no residual add follows: the attention's packed
//     projections).
//   bias_grad_partial_{f32,bf16}: the same from a gradient in y's dtype (`dy` null: the
//     input's gradient is the output's own): Σ g in f32 per chunk (the plain ops'
//     reduction over the rows read a column per block, one row apart per thread).
//   bias_grad_{f32,bf16}: a thread per column: the chunks' sums in chunk order
//     (column_sums, kernels.cuh), for both ops.

// `v` rounded to T's precision, as f32.
__device__ __forceinline__ float rounded_to(const float*, float v) { return v; }

__device__ __forceinline__ float rounded_to(const unsigned short*, float v) {
    const unsigned short bits = bf16_bits(v);
    return load(&bits, 0);
}

// out[i] = (stream ? stream[i] : 0) + (y[i] + bias[column]) rounded to T, stored as O
// (f32 after the residual add, T alone).
template <typename T, typename O>
__device__ void bias_add_fwd(
    unsigned long long stream_at,
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
    const T* y = (const T*)y_at;
    const float z = rounded_to(y, load(y, i) + load((const T*)bias_at, i % width));
    const float* stream = (const float*)stream_at;
    store((O*)out_at, i, stream ? stream[i] + z : z);
}

// Grid: (column blocks, chunks); partial holds chunks × width floats. The gradient `g`
// (G: f32 from the residual stream, or the values' own dtype), rounded to T, written to
// `dy` where it is not null, and summed in f32 per chunk.
template <typename G, typename T>
__device__ void bias_grad_partial(
    unsigned long long g_at,
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
    const G* g = (const G*)g_at;
    T* dy = (T*)dy_at;
    const long long first = (long long)blockIdx.y * rows_per_chunk;
    const long long last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
    float sum = 0.0f;
    for (long long r = first; r < last; ++r) {
        const long long i = r * width + j;
        const float d = rounded_to((const T*)dy, load(g, i));
        if (dy) {
            store(dy, i, d);
        }
        sum += d;
    }
    ((float*)partial_at)[(long long)blockIdx.y * width + j] = sum;
}

#define BIAS_ENTRIES(NAME, T)                                                                \
    extern "C" __global__ void bias_residual_fwd_##NAME(                                     \
        unsigned long long stream, unsigned long long y, unsigned long long bias,            \
        unsigned long long out, long long n, int width)                                      \
    {                                                                                        \
        bias_add_fwd<T, float>(stream, y, bias, out, n, width);                              \
    }                                                                                        \
    extern "C" __global__ void bias_residual_bwd_partial_##NAME(                             \
        unsigned long long g, unsigned long long dy, unsigned long long partial,             \
        long long rows, int width, long long rows_per_chunk)                                 \
    {                                                                                        \
        bias_grad_partial<float, T>(g, dy, partial, rows, width, rows_per_chunk);            \
    }                                                                                        \
    extern "C" __global__ void bias_add_fwd_##NAME(                                          \
        unsigned long long y, unsigned long long bias, unsigned long long out, long long n,  \
        int width)                                                                           \
    {                                                                                        \
        bias_add_fwd<T, T>(0, y, bias, out, n, width);                                       \
    }                                                                                        \
    extern "C" __global__ void bias_grad_partial_##NAME(                                     \
        unsigned long long g, unsigned long long dy, unsigned long long partial,             \
        long long rows, int width, long long rows_per_chunk)                                 \
    {                                                                                        \
        bias_grad_partial<T, T>(g, dy, partial, rows, width, rows_per_chunk);                \
    }                                                                                        \
    extern "C" __global__ void bias_grad_##NAME(                                             \
        unsigned long long partial, unsigned long long dbias, int width, int chunks)         \
    {                                                                                        \
        column_sums<T>(partial, dbias, width, chunks);                                       \
    }

BIAS_ENTRIES(f32, float)
BIAS_ENTRIES(bf16, unsigned short)
