// What the fused ops' CUDA kernels share: bf16 as its bits (no headers, so the sources
// compile wherever libnvrtc is), and block-wide sums and maxima in a fixed order. The
// kernel files (layer_norm.cu, gelu.cu, softmax.cu) are compiled after this one, as one
// module (src/model/fused/cuda.rs; src/model/fused/plan.rs names the order).
//
// Every pointer argument of a kernel is a device address (u64): the host passes each
// tensor's first element, its layout's offset applied. Sums run in a fixed order, so the
// same inputs give the same bits, run after run (no atomics).

#define THREADS 256
#define WARPS (THREADS / 32)
#define NEG_INFINITY __uint_as_float(0xff800000u)

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }

__device__ __forceinline__ float load(const unsigned short* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}

// Round to nearest even, as half::bf16::from_f32 (candle's CPU cast) does; a NaN stays a
// (quiet) NaN.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }

__device__ __forceinline__ void store(unsigned short* p, long long i, float v) { p[i] = bf16_bits(v); }

// The sum of every thread's `v` over the block (THREADS threads), on every thread.
// `shared` holds WARPS + 1 floats; the call ends with a barrier, so it may be reused.
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, o);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        shared[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float w = lane < WARPS ? shared[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            w += __shfl_down_sync(0xffffffffu, w, o);
        }
        if (lane == 0) {
            shared[WARPS] = w;
        }
    }
    __syncthreads();
    const float total = shared[WARPS];
    __syncthreads();
    return total;
}

// The largest of every thread's `v` over the block, on every thread (as block_sum).
__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        shared[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        float w = lane < WARPS ? shared[lane] : NEG_INFINITY;
        for (int o = 16; o > 0; o >>= 1) {
            w = fmaxf(w, __shfl_down_sync(0xffffffffu, w, o));
        }
        if (lane == 0) {
            shared[WARPS] = w;
        }
    }
    __syncthreads();
    const float total = shared[WARPS];
    __syncthreads();
    return total;
}

// A column reduction's second stage, a thread per column: `chunks` rows of `width` f32
// partial sums (one row per chunk of the reduced rows) added in chunk order → `out` (T).
template <typename T>
__device__ void column_sums(
    unsigned long long partial_at,
    unsigned long long out_at,
    int width,
    int chunks)
{
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= width) {
        return;
    }
    const float* partial = (const float*)partial_at;
    float sum = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        sum += partial[(long long)c * width + j];
    }
    store((T*)out_at, j, sum);
}

// d += a·b on the warp's tensor cores (sm_80 and later): A 16×16 and B 16×8 in bf16, D
// 16×8 in f32, every lane of the warp calling with its own registers, laid out as the PTX
// ISA lays out m16n8k16 (`group` = lane / 4, `pair` = lane % 4; a register holds two
// bf16, the lower index in its low half):
//   a[0]: A[group][2 pair, +1]      a[1]: A[group + 8][2 pair, +1]
//   a[2]: A[group][8 + 2 pair, +1]  a[3]: A[group + 8][8 + 2 pair, +1]
//   b[0]: B[2 pair, +1][group]      b[1]: B[8 + 2 pair, +1][group]
//   d[0], d[1]: D[group][2 pair, +1]    d[2], d[3]: D[group + 8][2 pair, +1]
// So an accumulator's two 16×8 tiles side by side are, rounded to bf16 pairwise, the A
// registers of the next product over those 16 columns (flash attention's P·V).
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void mma_bf16_16x8x16(float* d, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
__device__ __forceinline__ void mma_bf16_16x8x16(float* d, const unsigned* a, const unsigned* b) {
    emulator::mma_bf16_16x8x16(d, a, b);
}
#endif

// Two values rounded to bf16 in one register, `lo` in the low half.
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)bf16_bits(lo) | ((unsigned)bf16_bits(hi) << 16);
}
