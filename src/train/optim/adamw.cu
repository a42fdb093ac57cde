// AdamW over many tensors in one launch: the moments, the f32 master weight and its bf16
// working copy updated in one pass over memory. Compiled at start-up by NVRTC
// (src/train/optim/cuda.rs); no headers, so it compiles wherever libnvrtc is.
//
// Each block takes CHUNK consecutive elements of one tensor. A tensor's descriptor is 8
// u64s: master, m, v, gradient (f32), working copy (bf16 bits, 0 for none), element
// count, first block, and 1 when it decays. A block finds its tensor by binary search over
// the first blocks.
//
// Every element goes through the CPU AdamW's operations in its order, with the scalars
// rounded to f32 on the host as the CPU path rounds them; compiled with --fmad=false
// (no fused multiply-adds) the two agree bit for bit.

#define CHUNK 4096

// Round to nearest even, as half::bf16::from_f32 (candle's CPU cast) and
// __float2bfloat16 do; a NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// The tensor that block `block` belongs to: a binary search over the descriptors' first
// blocks (field `first` of each descriptor's `fields` u64s), which rise with the index.
// grad_norm.cu, compiled after this file, finds its tensors the same way.
__device__ __forceinline__ int tensor_of_block(
    const unsigned long long* desc, int tensors, int fields, int first, unsigned long long block)
{
    int lo = 0;
    int hi = tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (desc[fields * mid + first] <= block) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

extern "C" __global__ void adamw_multi_tensor(
    const unsigned long long* __restrict__ desc,
    int tensors,
    float lr,
    float beta1,
    float rest1,
    float beta2,
    float rest2,
    float eps,
    float inv_bias1,
    float inv_bias2,
    float decay_factor)
{
    const unsigned long long block = blockIdx.x;
    const unsigned long long* d = desc + 8 * tensor_of_block(desc, tensors, 8, 6, block);
    float* w = (float*)d[0];
    float* m = (float*)d[1];
    float* v = (float*)d[2];
    const float* g = (const float*)d[3];
    unsigned short* copy = (unsigned short*)d[4];
    const unsigned long long n = d[5];
    const unsigned long long start = (block - d[6]) * CHUNK;
    const unsigned long long end = start + CHUNK < n ? start + CHUNK : n;
    const bool decays = d[7] != 0;
    for (unsigned long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gi = g[i];
        const float mi = m[i] * beta1 + gi * rest1;
        const float vi = v[i] * beta2 + (gi * gi) * rest2;
        m[i] = mi;
        v[i] = vi;
        const float update = (mi * inv_bias1) / (sqrtf(vi * inv_bias2) + eps);
        const float kept = decays ? w[i] * decay_factor : w[i];
        const float wi = kept - update * lr;
        w[i] = wi;
        if (copy) {
            copy[i] = bf16_bits(wi);
        }
    }
}
