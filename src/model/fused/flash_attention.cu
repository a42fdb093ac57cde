// Flash attention on bf16 packed projections, heads of 64 values (FlashAttention-2's
// schedule): the scores and probabilities never leave the registers, forward keeps one
// log-sum-exp per query row for backward, and backward computes them again from it. Where
// the kept-probabilities path (softmax.cu with head_gemms.rs' GEMMs) keeps
// `n · heads · len²` probabilities a layer, this keeps `n · heads · len` floats.
//
// The packed projections are `[n, len, 3 · width]` (queries, keys, values, each `heads`
// blocks of FLASH_D), the output and its gradient `[n, len, width]`, the per-row
// statistics (log-sum-exp, and backward's rowsum(dO ∘ O)) `[n, heads, len]` f32. The
// mask, when there is one, as softmax.cu's: `len` f32 keys a row at
// mask + sample · mask_sample_stride + query · mask_query_stride.
//
// A block of FLASH_THREADS (4 warps) owns FLASH_TILE queries (forward, dq) or keys (dk,
// dv) of one (sample, head); each warp 16 of them, as the A operand of m16n8k16 tensor-core
// products (kernels.cuh) held in registers for the whole loop. The other side streams
// through shared memory FLASH_TILE rows at a time, row-major only, by cp.async into two
// buffers: the next tile lands while the block computes on this one. ldmatrix reads each
// tile into B registers straight or transposed, whichever the product needs, four 8×8
// matrices an instruction. No
// atomics: dq and (dk, dv) are separate kernels, each sum in a fixed order, so a run's
// bits repeat.

#define FLASH_D 64
#define FLASH_TILE 64
#define FLASH_THREADS 128
// A shared row's bf16s: 64, and 8 more, so that the 8 rows an ldmatrix phase reads (16
// bytes each, rows 36 words apart) fall on 32 different banks, and rows start on 16 bytes.
#define FLASH_PAD 72
#define POS_INFINITY __uint_as_float(0x7f800000u)

// Puts rows `first`.. of one head (`src` at its first value, rows `row_stride` apart,
// 16-byte aligned; rows from `len` on read as zero) in flight into the shared tile at
// `tile` (`rows[r][d]`, FLASH_PAD a row): sixteen bytes a thread a step by cp.async, a
// quarter-warp's 128 bytes one row, so each step's reads are whole sectors and its writes
// hit 32 different banks. The caller commits, waits and synchronises before reading. The
// products that need the tile along its other axis read it transposed
// (ldmatrix_x4_trans), so no transposed copy is stored.
__device__ void flash_fetch_tile(
    SharedAt tile,
    const unsigned short* src,
    long long row_stride,
    int first,
    int len)
{
    for (int i = threadIdx.x; i < FLASH_TILE * (FLASH_D / 8); i += FLASH_THREADS) {
        const int r = i / (FLASH_D / 8);
        const int c = i % (FLASH_D / 8);
        const int pos = first + r;
        const bool real = pos < len;
        cp_async16(tile + 2u * (r * FLASH_PAD + 8 * c),
                   src + (long long)(real ? pos : 0) * row_stride + 8 * c, real);
    }
}

// A shared tile's bytes: each kernel keeps two of each kind, the next in flight while it
// computes on the current.
#define FLASH_TILE_BYTES (2 * FLASH_TILE * FLASH_PAD)

// One of the two tensors a kernel streams through shared memory a tile at a time: its two
// shared buffers, and the head's rows in global memory.
struct FlashStream {
    SharedAt tiles;
    const unsigned short* src;
    long long row_stride;
};

// Both streams' rows `first`.. in flight into their buffers at byte offset `at`.
__device__ void flash_fetch(FlashStream a, FlashStream b, unsigned at, int first, int len) {
    flash_fetch_tile(a.tiles + at, a.src, a.row_stride, first, len);
    flash_fetch_tile(b.tiles + at, b.src, b.row_stride, first, len);
}

// Step `t` of `tiles` (step 0's rows were put in flight and committed before the loop):
// once every warp is done with step t − 1's buffers, step t + 1's rows go in flight into
// them; then it waits until step t's rows have landed, every thread's part of them.
// Returns the byte offset of step t's buffers.
__device__ unsigned flash_step(int t, int tiles, FlashStream a, FlashStream b, int len) {
    const unsigned at = (t & 1) * FLASH_TILE_BYTES;
    __syncthreads();
    if (t + 1 < tiles) {
        flash_fetch(a, b, FLASH_TILE_BYTES - at, (t + 1) * FLASH_TILE, len);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    return at;
}

// The A registers of 16 rows from `row0` (rows from `len` on zero) of one head in global
// memory, for each of the four k-steps over its 64 values.
__device__ void flash_a(
    unsigned a[4][4],
    const unsigned short* src,
    long long row_stride,
    int row0,
    int len,
    int group,
    int pair)
{
    for (int kk = 0; kk < 4; ++kk) {
        for (int half = 0; half < 2; ++half) {
            for (int hi = 0; hi < 2; ++hi) {
                const int row = row0 + group + 8 * half;
                const int col = kk * 16 + 8 * hi + 2 * pair;
                a[kk][half + 2 * hi] =
                    row < len ? *(const unsigned*)(src + (long long)row * row_stride + col) : 0u;
            }
        }
    }
}

// Where a lane's ldmatrix row starts in a shared tile (FLASH_PAD bf16s a row), in bytes
// from the tile, for the B registers of n-tiles nt, nt + 1 at k-step kk: matrix j = lane / 8
// holds n-tile nt + j / 2 and the k-step's half j % 2, its row lane % 8.
//   straight: the tile holds the reduced dimension k contiguous, element (k, n) at
//     tile[n · FLASH_PAD + k] (keys or queries as the rows of a score product);
//   transposed: it holds n contiguous, element (k, n) at tile[k · FLASH_PAD + n] (values,
//     keys or queries as the reduced side of a product with the probabilities or their
//     gradient), read by ldmatrix_x4_trans.
// Each is a lane's part (lane_row) plus a part the unrolled loops make constant.
__device__ __forceinline__ unsigned flash_lane_row(int lane, bool transposed) {
    const int j = lane >> 3;
    const int row = lane & 7;
    return 2u * (transposed ? (8 * (j & 1) + row) * FLASH_PAD + 8 * (j >> 1)
                            : (8 * (j >> 1) + row) * FLASH_PAD + 8 * (j & 1));
}
__device__ __forceinline__ unsigned flash_step(int nt, int kk, bool transposed) {
    return 2u * (transposed ? kk * 16 * FLASH_PAD + 8 * nt : 8 * nt * FLASH_PAD + kk * 16);
}

// The B registers of k-step `kk` for the 16 columns from `8 · nt` (two 8-column tiles,
// b[0] and b[1]), one ldmatrix from `at`: the tile's shared address plus the lane's
// flash_lane_row for the same `transposed`.
__device__ __forceinline__ void flash_b(
    unsigned b[2][2], SharedAt at, int nt, int kk, bool transposed)
{
    unsigned r[4];
    if (transposed) {
        ldmatrix_x4_trans(r, at + flash_step(nt, kk, true));
    } else {
        ldmatrix_x4(r, at + flash_step(nt, kk, false));
    }
    b[0][0] = r[0];
    b[0][1] = r[1];
    b[1][0] = r[2];
    b[1][1] = r[3];
}

// The A registers of k-step `kk` (16 columns) from an accumulator of 16 rows × 64 columns
// (eight 16×8 tiles), rounded to bf16.
__device__ __forceinline__ void flash_a_from(unsigned* a, const float acc[8][4], int kk) {
    a[0] = bf16_pair(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = bf16_pair(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = bf16_pair(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = bf16_pair(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

__device__ __forceinline__ void flash_zero(float acc[8][4]) {
    for (int t = 0; t < 8; ++t) {
        for (int i = 0; i < 4; ++i) {
            acc[t][i] = 0.0f;
        }
    }
}

// acc[nt] += a · B at k-step `kk` for all eight 8-column tiles of a 64-wide product, B
// read by flash_b from `at` (a tile's address plus the lane's row for `TRANS`).
template <bool TRANS>
__device__ __forceinline__ void flash_mma_row(float acc[8][4], const unsigned* a, SharedAt at, int kk)
{
    for (int nt = 0; nt < 8; nt += 2) {
        unsigned b[2][2];
        flash_b(b, at, nt, kk, TRANS);
        mma_bf16_16x8x16(acc[nt], a, b[0]);
        mma_bf16_16x8x16(acc[nt + 1], a, b[1]);
    }
}

// Backward's two products of a warp's 16 rows with a 64-row tile, over the 64-deep head:
// c = A · Bᵀ and d = E · Fᵀ, where A and E are the warp's A registers (four k-steps) and
// B and F shared tiles of 64 rows (element (n, k) at tile[n · FLASH_PAD + k]; `b`, `f`
// their addresses plus the lane's straight row). dq's kernel takes the scores and dO·Vᵀ,
// dk/dv's their transposes; interleaved, so each k-step's two products are in flight
// together.
__device__ __forceinline__ void flash_two_products(
    float c[8][4], const unsigned a[4][4], SharedAt b,
    float d[8][4], const unsigned e[4][4], SharedAt f)
{
    flash_zero(c);
    flash_zero(d);
    for (int kk = 0; kk < 4; ++kk) {
        for (int nt = 0; nt < 8; nt += 2) {
            unsigned regs[2][2];
            flash_b(regs, b, nt, kk, false);
            mma_bf16_16x8x16(c[nt], a[kk], regs[0]);
            mma_bf16_16x8x16(c[nt + 1], a[kk], regs[1]);
            flash_b(regs, f, nt, kk, false);
            mma_bf16_16x8x16(d[nt], e[kk], regs[0]);
            mma_bf16_16x8x16(d[nt + 1], e[kk], regs[1]);
        }
    }
}

// Where a block is: which (sample, head), which tile of its rows, and its warp's lanes.
struct FlashBlock {
    long long sample_head;
    long long sample;
    int head;
    int tile;
    int tiles;
    int width;
    long long row_stride;
    int lane;
    int warp;
    int group;
    int pair;
};

__device__ FlashBlock flash_block(int len, int heads) {
    FlashBlock f;
    f.tiles = (len + FLASH_TILE - 1) / FLASH_TILE;
    f.tile = (int)(blockIdx.x % (unsigned)f.tiles);
    f.sample_head = blockIdx.x / (unsigned)f.tiles;
    f.head = (int)(f.sample_head % heads);
    f.sample = f.sample_head / heads;
    f.width = heads * FLASH_D;
    f.row_stride = 3LL * f.width;
    f.lane = threadIdx.x & 31;
    f.warp = threadIdx.x >> 5;
    f.group = f.lane >> 2;
    f.pair = f.lane & 3;
    return f;
}

// Forward: `out` (bf16) = softmax(scale · q kᵀ + mask) v, and `lse` (f32) each query row's
// log Σ exp(scale · q kᵀ + mask) (+∞ for a row every key of which is masked; its output
// is zero).
extern "C" __global__ void flash_attention_fwd_bf16(
    unsigned long long qkv_at,
    unsigned long long mask_at,
    unsigned long long out_at,
    unsigned long long lse_at,
    int len,
    int heads,
    long long mask_sample_stride,
    int mask_query_stride,
    float scale)
{
    __shared__ Words4 keys_words[2 * FLASH_TILE * FLASH_PAD / 8];
    __shared__ Words4 values_words[2 * FLASH_TILE * FLASH_PAD / 8];
    // Two tiles each, [key][d]: step kt computes on tile kt % 2 while kt + 1 lands.
    const SharedAt keys = shared_at(keys_words);
    const SharedAt values = shared_at(values_words);
    const FlashBlock f = flash_block(len, heads);
    // This lane's ldmatrix rows: keys straight (S = q kᵀ), values transposed (P v).
    const SharedAt keys_at = keys + flash_lane_row(f.lane, false);
    const SharedAt values_at = values + flash_lane_row(f.lane, true);
    const unsigned short* q =
        (const unsigned short*)qkv_at + f.sample * len * f.row_stride + f.head * FLASH_D;
    const unsigned short* k = q + f.width;
    const unsigned short* v = q + 2 * f.width;
    const int row0 = f.tile * FLASH_TILE + f.warp * 16;
    const bool active = row0 < len;
    int query[2];
    const float* mask[2];
    for (int h = 0; h < 2; ++h) {
        query[h] = row0 + f.group + 8 * h;
        mask[h] = mask_at && query[h] < len
            ? (const float*)mask_at + f.sample * mask_sample_stride
                + (long long)query[h] * mask_query_stride
            : 0;
    }
    unsigned qa[4][4];
    flash_a(qa, q, f.row_stride, row0, len, f.group, f.pair);
    float o[8][4];
    flash_zero(o);
    float m[2] = {NEG_INFINITY, NEG_INFINITY};
    float l[2] = {0.0f, 0.0f};
    const FlashStream key_rows = {keys, k, f.row_stride};
    const FlashStream value_rows = {values, v, f.row_stride};
    flash_fetch(key_rows, value_rows, 0, 0, len);
    cp_async_commit();
    for (int kt = 0; kt < f.tiles; ++kt) {
        const int key0 = kt * FLASH_TILE;
        const unsigned tile_at = flash_step(kt, f.tiles, key_rows, value_rows, len);
        if (!active) {
            continue;
        }
        float s[8][4];
        flash_zero(s);
        for (int kk = 0; kk < 4; ++kk) {
            flash_mma_row<false>(s, qa[kk], keys_at + tile_at, kk);
        }
        float top[2] = {m[0], m[1]};
        for (int nt = 0; nt < 8; ++nt) {
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1;
                const int key = key0 + nt * 8 + 2 * f.pair + (i & 1);
                const float x = key < len ? s[nt][i] * scale + (mask[h] ? mask[h][key] : 0.0f)
                                          : NEG_INFINITY;
                s[nt][i] = x;
                top[h] = fmaxf(top[h], x);
            }
        }
        float base[2];
        for (int h = 0; h < 2; ++h) {
            // A row's four lanes hold its 64 columns between them.
            top[h] = fmaxf(top[h], __shfl_xor_sync(0xffffffffu, top[h], 1));
            top[h] = fmaxf(top[h], __shfl_xor_sync(0xffffffffu, top[h], 2));
            // Every key so far masked: exponentials from 0, all of them 0.
            base[h] = top[h] == NEG_INFINITY ? 0.0f : top[h];
            const float rescale = expf(m[h] - base[h]);
            m[h] = top[h];
            l[h] *= rescale;
            for (int nt = 0; nt < 8; ++nt) {
                o[nt][2 * h] *= rescale;
                o[nt][2 * h + 1] *= rescale;
            }
        }
        for (int nt = 0; nt < 8; ++nt) {
            for (int i = 0; i < 4; ++i) {
                const float p = expf(s[nt][i] - base[i >> 1]);
                s[nt][i] = p;
                l[i >> 1] += p;
            }
        }
        for (int kk = 0; kk < 4; ++kk) {
            unsigned pa[4];
            flash_a_from(pa, s, kk);
            flash_mma_row<true>(o, pa, values_at + tile_at, kk);
        }
    }
    if (!active) {
        return;
    }
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    for (int h = 0; h < 2; ++h) {
        if (query[h] >= len) {
            continue;
        }
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        unsigned short* out = (unsigned short*)out_at
            + (f.sample * len + query[h]) * f.width + f.head * FLASH_D;
        for (int nt = 0; nt < 8; ++nt) {
            *(unsigned*)(out + nt * 8 + 2 * f.pair) =
                bf16_pair(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
        }
        if (f.pair == 0) {
            ((float*)lse_at)[f.sample_head * len + query[h]] =
                l[h] > 0.0f ? m[h] + logf(l[h]) : POS_INFINITY;
        }
    }
}

// Backward, first: each query row's rowsum(dO ∘ O) (`delta`, f32), a warp a row (THREADS a
// block), rows in (sample, head, query) order.
extern "C" __global__ void flash_attention_delta_bf16(
    unsigned long long out_at,
    unsigned long long g_at,
    unsigned long long delta_at,
    long long rows,
    int len,
    int heads)
{
    const long long row = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (row >= rows) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const long long query = row % len;
    const long long sample_head = row / len;
    const long long head = sample_head % heads;
    const long long sample = sample_head / heads;
    const long long at = (sample * len + query) * heads * FLASH_D + head * FLASH_D + 2 * lane;
    const unsigned short* o = (const unsigned short*)out_at + at;
    const unsigned short* g = (const unsigned short*)g_at + at;
    float d = load(o, 0) * load(g, 0) + load(o, 1) * load(g, 1);
    for (int off = 16; off > 0; off >>= 1) {
        d += __shfl_xor_sync(0xffffffffu, d, off);
    }
    if (lane == 0) {
        ((float*)delta_at)[row] = d;
    }
}

// Backward, the queries' gradient: per query tile, over every key tile, the probabilities
// from `lse`, dP = dO vᵀ, dS = P ∘ (dP − delta), dq = scale · dS k, written (bf16) into the
// packed gradient's query part.
extern "C" __global__ void flash_attention_dq_bf16(
    unsigned long long qkv_at,
    unsigned long long mask_at,
    unsigned long long g_at,
    unsigned long long lse_at,
    unsigned long long delta_at,
    unsigned long long dqkv_at,
    int len,
    int heads,
    long long mask_sample_stride,
    int mask_query_stride,
    float scale)
{
    __shared__ Words4 keys_words[2 * FLASH_TILE * FLASH_PAD / 8];
    __shared__ Words4 values_words[2 * FLASH_TILE * FLASH_PAD / 8];
    // Two tiles each, [key][d]: step kt computes on tile kt % 2 while kt + 1 lands.
    const SharedAt keys = shared_at(keys_words);
    const SharedAt values = shared_at(values_words);
    const FlashBlock f = flash_block(len, heads);
    // This lane's ldmatrix rows: keys and values straight (S = q kᵀ, dP = dO vᵀ), keys
    // transposed (dq = dS k).
    const SharedAt keys_at = keys + flash_lane_row(f.lane, false);
    const SharedAt values_at = values + flash_lane_row(f.lane, false);
    const SharedAt keys_t_at = keys + flash_lane_row(f.lane, true);
    const unsigned short* q =
        (const unsigned short*)qkv_at + f.sample * len * f.row_stride + f.head * FLASH_D;
    const unsigned short* k = q + f.width;
    const unsigned short* v = q + 2 * f.width;
    const unsigned short* g =
        (const unsigned short*)g_at + f.sample * len * f.width + f.head * FLASH_D;
    const int row0 = f.tile * FLASH_TILE + f.warp * 16;
    const bool active = row0 < len;
    int query[2];
    const float* mask[2];
    float lse[2], delta[2];
    for (int h = 0; h < 2; ++h) {
        query[h] = row0 + f.group + 8 * h;
        const bool real = query[h] < len;
        mask[h] = mask_at && real
            ? (const float*)mask_at + f.sample * mask_sample_stride
                + (long long)query[h] * mask_query_stride
            : 0;
        lse[h] = real ? ((const float*)lse_at)[f.sample_head * len + query[h]] : POS_INFINITY;
        delta[h] = real ? ((const float*)delta_at)[f.sample_head * len + query[h]] : 0.0f;
    }
    unsigned qa[4][4], ga[4][4];
    flash_a(qa, q, f.row_stride, row0, len, f.group, f.pair);
    flash_a(ga, g, f.width, row0, len, f.group, f.pair);
    float dq[8][4];
    flash_zero(dq);
    const FlashStream key_rows = {keys, k, f.row_stride};
    const FlashStream value_rows = {values, v, f.row_stride};
    flash_fetch(key_rows, value_rows, 0, 0, len);
    cp_async_commit();
    for (int kt = 0; kt < f.tiles; ++kt) {
        const int key0 = kt * FLASH_TILE;
        const unsigned tile_at = flash_step(kt, f.tiles, key_rows, value_rows, len);
        if (!active) {
            continue;
        }
        float s[8][4], dp[8][4];
        flash_two_products(s, qa, keys_at + tile_at, dp, ga, values_at + tile_at);
        for (int nt = 0; nt < 8; ++nt) {
            for (int i = 0; i < 4; ++i) {
                const int h = i >> 1;
                const int key = key0 + nt * 8 + 2 * f.pair + (i & 1);
                const float p = key < len
                    ? expf(s[nt][i] * scale + (mask[h] ? mask[h][key] : 0.0f) - lse[h])
                    : 0.0f;
                s[nt][i] = p * (dp[nt][i] - delta[h]);
            }
        }
        for (int kk = 0; kk < 4; ++kk) {
            unsigned da[4];
            flash_a_from(da, s, kk);
            flash_mma_row<true>(dq, da, keys_t_at + tile_at, kk);
        }
    }
    if (!active) {
        return;
    }
    for (int h = 0; h < 2; ++h) {
        if (query[h] >= len) {
            continue;
        }
        unsigned short* out = (unsigned short*)dqkv_at
            + (f.sample * len + query[h]) * f.row_stride + f.head * FLASH_D;
        for (int nt = 0; nt < 8; ++nt) {
            *(unsigned*)(out + nt * 8 + 2 * f.pair) =
                bf16_pair(dq[nt][2 * h] * scale, dq[nt][2 * h + 1] * scale);
        }
    }
}

// Backward, the keys' and values' gradients: per key tile (a warp's 16 keys as the A
// operand), over every query tile, Pᵀ from `lse`, dv += Pᵀ dO, dPᵀ = v dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ −
// delta), dk += scale · dSᵀ q, written (bf16) into the packed gradient's key and value
// parts.
extern "C" __global__ void flash_attention_dkv_bf16(
    unsigned long long qkv_at,
    unsigned long long mask_at,
    unsigned long long g_at,
    unsigned long long lse_at,
    unsigned long long delta_at,
    unsigned long long dqkv_at,
    int len,
    int heads,
    long long mask_sample_stride,
    int mask_query_stride,
    float scale)
{
    __shared__ Words4 queries_words[2 * FLASH_TILE * FLASH_PAD / 8];
    __shared__ Words4 grads_words[2 * FLASH_TILE * FLASH_PAD / 8];
    __shared__ float lse_s[2][FLASH_TILE];
    __shared__ float delta_s[2][FLASH_TILE];
    // Two tiles each, [query][d], and two tiles' row statistics: step qt computes on
    // tile qt % 2 while qt + 1 lands.
    const SharedAt queries = shared_at(queries_words);
    const SharedAt grads = shared_at(grads_words);
    const FlashBlock f = flash_block(len, heads);
    // This lane's ldmatrix rows: queries and gradients straight (Pᵀ = k qᵀ, dPᵀ = v dOᵀ),
    // and transposed (dv = Pᵀ dO, dk = dSᵀ q).
    const SharedAt queries_at = queries + flash_lane_row(f.lane, false);
    const SharedAt grads_at = grads + flash_lane_row(f.lane, false);
    const SharedAt queries_t_at = queries + flash_lane_row(f.lane, true);
    const SharedAt grads_t_at = grads + flash_lane_row(f.lane, true);
    const unsigned short* q =
        (const unsigned short*)qkv_at + f.sample * len * f.row_stride + f.head * FLASH_D;
    const unsigned short* k = q + f.width;
    const unsigned short* v = q + 2 * f.width;
    const unsigned short* g =
        (const unsigned short*)g_at + f.sample * len * f.width + f.head * FLASH_D;
    const float* mask = mask_at ? (const float*)mask_at + f.sample * mask_sample_stride : 0;
    const float* lse = (const float*)lse_at + f.sample_head * len;
    const float* delta = (const float*)delta_at + f.sample_head * len;
    const int row0 = f.tile * FLASH_TILE + f.warp * 16;
    const bool active = row0 < len;
    int key[2];
    for (int h = 0; h < 2; ++h) {
        key[h] = row0 + f.group + 8 * h;
    }
    unsigned ka[4][4], va[4][4];
    flash_a(ka, k, f.row_stride, row0, len, f.group, f.pair);
    flash_a(va, v, f.row_stride, row0, len, f.group, f.pair);
    float dk[8][4], dv[8][4];
    flash_zero(dk);
    flash_zero(dv);
    // Query tile `t`'s row statistics into buffer `b` (plain stores, seen after step t's
    // barriers; buffer b was last read at step t − 2, done before step t − 1's first).
    auto store_stats = [&](int t, int b) {
        const int first = t * FLASH_TILE;
        for (int i = threadIdx.x; i < FLASH_TILE; i += FLASH_THREADS) {
            const bool real = first + i < len;
            lse_s[b][i] = real ? lse[first + i] : POS_INFINITY;
            delta_s[b][i] = real ? delta[first + i] : 0.0f;
        }
    };
    const FlashStream query_rows = {queries, q, f.row_stride};
    const FlashStream grad_rows = {grads, g, f.width};
    flash_fetch(query_rows, grad_rows, 0, 0, len);
    cp_async_commit();
    store_stats(0, 0);
    for (int qt = 0; qt < f.tiles; ++qt) {
        const int q0 = qt * FLASH_TILE;
        const int buf = qt & 1;
        const unsigned tile_at = flash_step(qt, f.tiles, query_rows, grad_rows, len);
        if (qt + 1 < f.tiles) {
            store_stats(qt + 1, 1 - buf);
        }
        if (!active) {
            continue;
        }
        const float* lse_t = lse_s[buf];
        const float* delta_t = delta_s[buf];
        float p[8][4], ds[8][4];
        flash_two_products(p, ka, queries_at + tile_at, ds, va, grads_at + tile_at);
        for (int nt = 0; nt < 8; ++nt) {
            for (int i = 0; i < 4; ++i) {
                const int at = key[i >> 1];
                const int qi = nt * 8 + 2 * f.pair + (i & 1);
                const int pos = q0 + qi;
                const float pt = at < len && pos < len
                    ? expf(p[nt][i] * scale
                          + (mask ? mask[(long long)pos * mask_query_stride + at] : 0.0f)
                          - lse_t[qi])
                    : 0.0f;
                p[nt][i] = pt;
                ds[nt][i] = pt * (ds[nt][i] - delta_t[qi]);
            }
        }
        for (int kk = 0; kk < 4; ++kk) {
            unsigned pa[4], da[4];
            flash_a_from(pa, p, kk);
            flash_a_from(da, ds, kk);
            flash_mma_row<true>(dv, pa, grads_t_at + tile_at, kk);
            flash_mma_row<true>(dk, da, queries_t_at + tile_at, kk);
        }
    }
    if (!active) {
        return;
    }
    for (int h = 0; h < 2; ++h) {
        if (key[h] >= len) {
            continue;
        }
        unsigned short* out = (unsigned short*)dqkv_at
            + (f.sample * len + key[h]) * f.row_stride + f.head * FLASH_D;
        for (int nt = 0; nt < 8; ++nt) {
            *(unsigned*)(out + f.width + nt * 8 + 2 * f.pair) =
                bf16_pair(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale);
            *(unsigned*)(out + 2 * f.width + nt * 8 + 2 * f.pair) =
                bf16_pair(dv[nt][2 * h], dv[nt][2 * h + 1]);
        }
    }
}
