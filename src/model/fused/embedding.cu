// Row lookup in an embedding table and its backward, for f32 or bf16 tables (the
// gradient in the table's dtype, summed in f32), u32 ids. Compiled at start-up by NVRTC
// after kernels.cuh (src/model/fused/cuda.rs).
//
//   embedding_fwd_{f32,bf16}: a thread per output element: out[p, j] = table[ids[p], j];
//     an id past the table gives a row of NaN (the step's finiteness check then names it)
//     where reading it would be out of bounds.
//   embedding_bwd_{f32,bf16}: a block per (tile of EMBEDDING_TILE table rows, block of
//     columns), a thread per column: every id in token order, the rows of dy whose id is in
//     the tile added into the thread's column of those rows, then the tile written whole
//     (untouched rows are zero). No atomics: the sums run in token order, as the CPU's
//     scatter does, so they are the CPU's bits in f32.

#define EMBEDDING_TILE 32

template <typename T>
__device__ void embedding_fwd(
    unsigned long long table_at,
    unsigned long long ids_at,
    unsigned long long out_at,
    long long n,
    int width,
    int rows)
{
    const long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= n) {
        return;
    }
    const long long p = i / width;
    const int j = (int)(i % width);
    const unsigned int id = ((const unsigned int*)ids_at)[p];
    const float v = id < (unsigned int)rows
        ? load((const T*)table_at, (long long)id * width + j)
        : __uint_as_float(0x7fc00000u);
    store((T*)out_at, i, v);
}

template <typename T>
__device__ void embedding_bwd(
    unsigned long long ids_at,
    unsigned long long dy_at,
    unsigned long long grad_at,
    long long ids,
    int width,
    int rows)
{
    __shared__ float acc[EMBEDDING_TILE * THREADS];
    const int first = blockIdx.x * EMBEDDING_TILE;
    const int j = blockIdx.y * THREADS + threadIdx.x;
    for (int t = 0; t < EMBEDDING_TILE; ++t) {
        acc[t * THREADS + threadIdx.x] = 0.0f;
    }
    const unsigned int* id = (const unsigned int*)ids_at;
    const T* dy = (const T*)dy_at;
    if (j < width) {
        for (long long p = 0; p < ids; ++p) {
            const unsigned int t = id[p] - (unsigned int)first;
            if (t < EMBEDDING_TILE) {
                acc[t * THREADS + threadIdx.x] += load(dy, p * width + j);
            }
        }
        for (int t = 0; t < EMBEDDING_TILE && first + t < rows; ++t) {
            store((T*)grad_at, (long long)(first + t) * width + j, acc[t * THREADS + threadIdx.x]);
        }
    }
}

#define EMBEDDING_ENTRIES(NAME, T)                                                           \
    extern "C" __global__ void embedding_fwd_##NAME(                                         \
        unsigned long long table, unsigned long long ids, unsigned long long out,            \
        long long n, int width, int rows)                                                    \
    {                                                                                        \
        embedding_fwd<T>(table, ids, out, n, width, rows);                                   \
    }                                                                                        \
    extern "C" __global__ void embedding_bwd_##NAME(                                         \
        unsigned long long ids, unsigned long long dy, unsigned long long grad,              \
        long long n_ids, int width, int rows)                                                \
    {                                                                                        \
        embedding_bwd<T>(ids, dy, grad, n_ids, width, rows);                                 \
    }

EMBEDDING_ENTRIES(f32, float)
EMBEDDING_ENTRIES(bf16, unsigned short)
