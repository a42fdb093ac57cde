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

// Sixteen bytes: the unit of cp.async and of ldmatrix's rows. Shared tiles declared as
// arrays of it start on a 16-byte boundary, as both need.
struct alignas(16) Words4 {
    unsigned w[4];
};

// Four 8×8 matrices of 16-bit values from shared memory, one register of each per lane
// (`ldmatrix.sync.aligned.m8n8.x4.shared.b16`, the whole warp calling): lane l gives the
// address of row l % 8 of matrix l / 8 (8 contiguous values, 16-byte aligned), and receives
// in r[i] matrix i's (row l / 4, columns 2 (l % 4), +1), the lower column in the low half:
// the layout of mma_bf16_16x8x16's operand registers. `_trans` gives each lane the
// transposed matrix's instead: (rows 2 (l % 4), +1, column l / 4), so a tile stored
// row-major along the product's n yields B registers that run along k.
//
// The address is a `SharedAt`: a shared-space byte address, converted from a pointer once
// (`shared_at`) and offset by plain integer adds, which the compiler folds into the
// instruction's immediate offset. Converting each pointer inside the asm instead hid the
// offsets from it: flash attention's dq kernel kept every (k-step, n-tile) address live
// across its loop, 239 registers where 164 do.
#ifdef __CUDA_ARCH__
typedef unsigned SharedAt;
__device__ __forceinline__ SharedAt shared_at(const void* p) {
    unsigned a;
    asm("{ .reg .u64 u; cvta.to.shared.u64 u, %1; cvt.u32.u64 %0, u; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, SharedAt at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, SharedAt at) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(at));
}
#else
// The emulator's shared memory is host memory: the address is the pointer itself.
typedef unsigned long long SharedAt;
__device__ __forceinline__ SharedAt shared_at(const void* p) {
    return (SharedAt)p;
}
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, SharedAt at) {
    emulator::ldmatrix_x4(r, (const unsigned short*)at, false);
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned* r, SharedAt at) {
    emulator::ldmatrix_x4(r, (const unsigned short*)at, true);
}
#endif

// Sixteen bytes from global into shared memory without passing through registers
// (`cp.async.cg.shared.global`, sm_80 on), in groups: cp_async_commit closes the group of
// this thread's copies issued since the last, and cp_async_wait<N> returns once at most N
// of its groups are still in flight. `valid` false writes 16 zero bytes and reads nothing
// (a source size of 0; `src` must still be an address of the tensor). Another thread sees
// the bytes only after its own wait and a __syncthreads. Both addresses 16-byte aligned.
#ifdef __CUDA_ARCH__
__device__ __forceinline__ void cp_async16(SharedAt dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#else
__device__ __forceinline__ void cp_async16(SharedAt dst, const void* src, bool valid) {
    emulator::cp_async16((void*)dst, src, valid);
}
__device__ __forceinline__ void cp_async_commit() {
    emulator::cp_async_commit();
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    emulator::cp_async_wait(N);
}
#endif

// Two values rounded to bf16 in one register, `lo` in the low half.
__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return (unsigned)bf16_bits(lo) | ((unsigned)bf16_bits(hi) << 16);
}
