// A CPU emulator of the CUDA our kernels use, so that their sources (src/model/fused/*.cu,
// compiled for the GPU by NVRTC) compile with g++ and run on any machine: each block's
// threads are coroutines (ucontext), `__syncthreads` a barrier across them, a warp shuffle
// (and the warp-wide mma and ldmatrix) a barrier across the warp's 32 threads around a
// shared exchange slot, `__shared__` a static (blocks run one at a time). Each warp runs
// ahead of the others up to its next `__syncthreads`, so a missing one shows. What this checks: indexing, reductions, their order,
// the bf16 rounding, and the host's launch sequence (tests/suite/kernels.rs); with the
// sanitizers the suite builds it with, bounds; with its two schedules (`reversed`), races
// between barriers. What it cannot: speed, and what only a GPU's memory model or a
// partial warp would show.
//
// Only what the kernels call is here; a kernel using more fails to compile, loudly.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict

struct dim3 {
    unsigned int x = 0, y = 0, z = 0;
};

// The running emulated thread's indices (set before it resumes).
inline dim3 threadIdx;
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emulator {

// What an emulated thread waits for.
enum class Wait { None, Block, Warp, Done };

// A block's threads as coroutines on this one OS thread: each runs until it reaches a
// barrier (or returns), and a barrier releases its threads once every live thread of its
// block (`__syncthreads`) or warp (a shuffle) has reached it. Cheaper by far than an OS
// thread per CUDA thread, and deterministic.
struct Block {
    unsigned threads = 0;
    std::vector<ucontext_t> contexts;
    // One allocation for every thread's stack, left uninitialised (touched as used).
    std::unique_ptr<char[]> stacks;
    std::vector<Wait> waits;
    std::vector<unsigned long long> slots;
    // Each thread's operand registers of a warp's matrix multiply-accumulate (mma).
    std::vector<unsigned> fragments;
    // Each thread's asynchronous copies (cp.async) not yet performed, and the number of
    // groups it has committed.
    struct AsyncCopy {
        void* dst;
        const void* src;
        bool valid;
        unsigned group;
    };
    std::vector<std::vector<AsyncCopy>> copies;
    std::vector<unsigned> groups;
    ucontext_t scheduler;
    unsigned current = 0;
    const std::function<void()>* kernel = nullptr;
};

inline Block* block = nullptr;

inline void yield(Wait w) {
    Block& b = *block;
    b.waits[b.current] = w;
    swapcontext(&b.contexts[b.current], &b.scheduler);
}

inline void entry() {
    (*block->kernel)();
    yield(Wait::Done);
}

constexpr std::size_t STACK = 64 * 1024;

// A thread's operand registers in one m16n8k16 mma: A's four, then B's two.
constexpr unsigned FRAGMENT_WORDS = 6;

// The order the emulator runs blocks in, and a block's threads in between barriers:
// forward (index order) or reversed. No kernel's result may depend on it: a thread that
// reads what another wrote with no barrier between, or a block that reads another
// block's output, sees different bytes in the two orders (tests/suite/kernels.rs runs
// every job in both and compares them bit for bit, its race check).
inline bool reversed = false;

// Runs `kernel` on a grid of `grid` blocks of `threads` threads, one block at a time.
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    Block b;
    b.threads = threads;
    b.contexts.resize(threads);
    b.stacks.reset(new char[STACK * threads]);
    b.waits.assign(threads, Wait::None);
    b.slots.assign(threads, 0);
    b.fragments.assign(threads * FRAGMENT_WORDS, 0);
    b.copies.assign(threads, {});
    b.groups.assign(threads, 0);
    b.kernel = &kernel;
    block = &b;
    for (unsigned yi = 0; yi < grid.y; ++yi) {
        for (unsigned xi = 0; xi < grid.x; ++xi) {
            const unsigned by = reversed ? grid.y - 1 - yi : yi;
            const unsigned bx = reversed ? grid.x - 1 - xi : xi;
            blockIdx = dim3{bx, by, 0};
            for (unsigned t = 0; t < threads; ++t) {
                getcontext(&b.contexts[t]);
                b.contexts[t].uc_stack.ss_sp = b.stacks.get() + STACK * t;
                b.contexts[t].uc_stack.ss_size = STACK;
                b.contexts[t].uc_link = nullptr;
                makecontext(&b.contexts[t], entry, 0);
                b.waits[t] = Wait::None;
                b.copies[t].clear();
                b.groups[t] = 0;
            }
            std::vector<bool> runnable(threads, true);
            // Releases warp w's threads if all of them (the live ones) wait at a warp
            // barrier (a shuffle, an mma, an ldmatrix).
            auto release_warp = [&](unsigned w) {
                bool any = false, all = true;
                for (unsigned t = 32 * w; t < threads && t < 32 * w + 32; ++t) {
                    if (b.waits[t] == Wait::Warp) any = true;
                    else if (b.waits[t] != Wait::Done) all = false;
                }
                if (!(any && all)) return false;
                for (unsigned t = 32 * w; t < threads && t < 32 * w + 32; ++t) {
                    if (b.waits[t] == Wait::Warp) {
                        b.waits[t] = Wait::None;
                        runnable[t] = true;
                    }
                }
                return true;
            };
            const unsigned warps = (threads + 31) / 32;
            for (;;) {
                // Each warp in turn runs as far as it can, through its warp barriers, up to
                // a __syncthreads (or its end) before the next warp starts: warps get ahead
                // of one another between block barriers, as on a GPU they may, so a warp
                // reading shared memory that another has yet to write (a missing
                // __syncthreads) reads stale bytes in one of the two schedules.
                for (unsigned wi = 0; wi < warps; ++wi) {
                    const unsigned w = reversed ? warps - 1 - wi : wi;
                    const unsigned lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
                    do {
                        for (unsigned i = 0; i < lanes; ++i) {
                            const unsigned t = 32 * w + (reversed ? lanes - 1 - i : i);
                            if (!runnable[t]) continue;
                            runnable[t] = false;
                            b.current = t;
                            threadIdx = dim3{t, 0, 0};
                            swapcontext(&b.scheduler, &b.contexts[t]);
                        }
                    } while (release_warp(w));
                }
                // Every thread is at a block barrier or done, unless a warp's lanes wait at
                // different barriers.
                bool live = false, all_at_block = true;
                for (unsigned t = 0; t < threads; ++t) {
                    if (b.waits[t] != Wait::Done) live = true;
                    if (b.waits[t] == Wait::Warp) all_at_block = false;
                }
                if (!live) break;
                if (!all_at_block) {
                    std::fprintf(stderr, "emulator: deadlock in block (%u, %u): threads wait at different barriers\n", bx, by);
                    std::exit(3);
                }
                for (unsigned t = 0; t < threads; ++t) {
                    if (b.waits[t] == Wait::Block) {
                        b.waits[t] = Wait::None;
                        runnable[t] = true;
                    }
                }
            }
        }
    }
    block = nullptr;
}

template <typename T>
inline T shuffle(T v, int source_lane) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "a shuffled value fits a slot");
    const unsigned t = threadIdx.x;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    block->slots[t] = bits;
    yield(Wait::Warp);
    T out;
    bits = block->slots[t / 32 * 32 + (unsigned)source_lane];
    std::memcpy(&out, &bits, sizeof(T));
    // No lane writes its next value before every lane has read this one.
    yield(Wait::Warp);
    return out;
}

inline float bf16_value(unsigned bits) {
    const unsigned u = bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, d += a·b over the warp, each
// lane's registers as the PTX ISA lays the fragments out (`group` = lane / 4, `pair` =
// lane % 4; a register holds two bf16, the lower column or row in its low half):
//   a[0]: A[group][2 pair, +1]      a[1]: A[group + 8][2 pair, +1]
//   a[2]: A[group][8 + 2 pair, +1]  a[3]: A[group + 8][8 + 2 pair, +1]
//   b[0]: B[2 pair, +1][group]      b[1]: B[8 + 2 pair, +1][group]
//   d[0..2]: D[group][2 pair, +1]   d[2..4]: D[group + 8][2 pair, +1]
// Every lane deposits its registers, and each computes its own four sums once all have
// (products of bf16 are exact in f32; the sums here run in k order, a tensor core's in
// its own: equal to rounding).
inline void mma_bf16_16x8x16(float* d, const unsigned* a, const unsigned* b) {
    Block& blk = *block;
    const unsigned t = threadIdx.x;
    unsigned* mine = &blk.fragments[t * FRAGMENT_WORDS];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
    yield(Wait::Warp);
    const unsigned base = t / 32 * 32, lane = t % 32, group = lane / 4, pair = lane % 4;
    auto half = [](unsigned word, unsigned high) { return bf16_value(high ? word >> 16 : word & 0xffffu); };
    auto a_at = [&](unsigned row, unsigned col) {
        const unsigned reg = (row >= 8 ? 1u : 0u) + (col >= 8 ? 2u : 0u);
        const unsigned owner = base + (row % 8) * 4 + (col % 8) / 2;
        return half(blk.fragments[owner * FRAGMENT_WORDS + reg], col % 2);
    };
    auto b_at = [&](unsigned k, unsigned col) {
        const unsigned reg = k >= 8 ? 1u : 0u;
        const unsigned owner = base + col * 4 + (k % 8) / 2;
        return half(blk.fragments[owner * FRAGMENT_WORDS + 4 + reg], k % 2);
    };
    float out[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = group + (i >= 2 ? 8 : 0), col = 2 * pair + (i & 1);
        float acc = d[i];
        for (unsigned k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);
        out[i] = acc;
    }
    // No lane deposits its next registers before every lane has read these.
    yield(Wait::Warp);
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// A GPU faults on a vector access, or an ldmatrix row, that is not aligned to its size:
// so does the emulator, naming it.
inline void check_aligned(const void* p, std::size_t bytes, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % bytes != 0) {
        std::fprintf(stderr, "emulator: %s at %p, not %zu-byte aligned (thread %u of block (%u, %u))\n",
                     what, p, bytes, threadIdx.x, blockIdx.x, blockIdx.y);
        std::exit(4);
    }
}

// `ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16` over the warp: lane l deposits the
// address of row l % 8 of matrix l / 8; once every lane has, each takes for matrix i the
// register of (row l / 4, columns 2 (l % 4), +1), or transposed (rows 2 (l % 4), +1,
// column l / 4), the lower index in the low half. Each row is read whole (16 bytes), so
// the sanitizers check all of it, as the instruction reads it.
inline void ldmatrix_x4(unsigned* r, const unsigned short* row, bool trans) {
    Block& blk = *block;
    const unsigned t = threadIdx.x;
    check_aligned(row, 16, "an ldmatrix row");
    blk.slots[t] = reinterpret_cast<std::uintptr_t>(row);
    yield(Wait::Warp);
    const unsigned base = t / 32 * 32, lane = t % 32;
    auto element = [&](unsigned matrix, unsigned i, unsigned j) {
        unsigned short values[8];
        std::memcpy(values, reinterpret_cast<const void*>(blk.slots[base + 8 * matrix + i]), sizeof values);
        return (unsigned)values[j];
    };
    unsigned out[4];
    for (unsigned m = 0; m < 4; ++m) {
        const unsigned a = lane / 4, b = 2 * (lane % 4);
        out[m] = trans ? element(m, b, a) | (element(m, b + 1, a) << 16)
                       : element(m, a, b) | (element(m, a, b + 1) << 16);
    }
    // No lane deposits its next address before every lane has read these.
    yield(Wait::Warp);
    for (int i = 0; i < 4; ++i) r[i] = out[i];
}

// cp.async's 16-byte copies. In the forward schedule each lands at once, as early as a
// GPU could make it land; in the reversed one at the last moment, the wait that must see
// it. So a read before its wait, or a copy issued into a buffer another warp still reads
// (a barrier missing before the issue), gives different bytes in the two schedules, which
// the race check compares.
inline void perform(const Block::AsyncCopy& c) {
    if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
    } else {
        std::memset(c.dst, 0, 16);
    }
}

inline void cp_async16(void* dst, const void* src, bool valid) {
    check_aligned(dst, 16, "a cp.async destination");
    check_aligned(src, 16, "a cp.async source");
    Block& b = *block;
    const unsigned t = threadIdx.x;
    const Block::AsyncCopy c{dst, src, valid, b.groups[t]};
    if (reversed) {
        b.copies[t].push_back(c);
    } else {
        perform(c);
    }
}

inline void cp_async_commit() { ++block->groups[threadIdx.x]; }

// Performs, in the order issued, every copy of this thread's groups but the newest `n`.
inline void cp_async_wait(unsigned n) {
    Block& b = *block;
    const unsigned t = threadIdx.x;
    const unsigned done = b.groups[t] > n ? b.groups[t] - n : 0;
    std::vector<Block::AsyncCopy> left;
    for (const auto& c : b.copies[t]) {
        if (c.group < done) {
            perform(c);
        } else {
            left.push_back(c);
        }
    }
    b.copies[t] = std::move(left);
}

}  // namespace emulator

inline void __syncthreads() { emulator::yield(emulator::Wait::Block); }

// The full-warp shuffles (every kernel here passes the full mask).
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    const int lane = (int)(threadIdx.x & 31);
    const int source = lane + (int)delta < 32 ? lane + (int)delta : lane;
    return emulator::shuffle(v, source);
}

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return emulator::shuffle(v, (int)(threadIdx.x & 31) ^ mask);
}

template <typename T>
inline T __shfl_sync(unsigned, T v, int lane) {
    return emulator::shuffle(v, lane & 31);
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
// Rounded once each, never contracted (the build passes -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
