// Σ x² over many f32 tensors in one launch, for the gradients' joint norm (clipping, and
// whether every gradient is finite): on a GPU, where a sum per tensor and a read of each
// back to the host made a host synchronisation per parameter tensor (about 150 a tower).
// Compiled after adamw.cu, in one source, by NVRTC at start-up (src/train/optim/cuda.rs):
// it finds a block's tensor with adamw.cu's tensor_of_block.
//
// Each block takes NORM_CHUNK consecutive elements of one tensor and writes their sum of
// squares, in f32, to its own slot of `out` (every slot written); the host sums the slots
// in f64, in block order, as the CPU sums its blocks of 4096 (src/model/fused/mod.rs). A
// tensor's descriptor is 4 u64s: its address, its element count, its first block, 0.
// Inside a block the order is fixed (each thread's strided elements, then a tree over the
// threads), so the bits repeat. An infinite or NaN element makes its slot, and so the
// norm, infinite or NaN.

#define NORM_CHUNK 4096
#define NORM_THREADS 256

extern "C" __global__ void sum_of_squares_multi_tensor(
    const unsigned long long* __restrict__ desc,
    int tensors,
    unsigned long long out)
{
    const unsigned long long block = blockIdx.x;
    const unsigned long long* d = desc + 4 * tensor_of_block(desc, tensors, 4, 2, block);
    const float* x = (const float*)d[0];
    const unsigned long long n = d[1];
    const unsigned long long start = (block - d[2]) * NORM_CHUNK;
    const unsigned long long end = start + NORM_CHUNK < n ? start + NORM_CHUNK : n;
    float s = 0.0f;
    for (unsigned long long i = start + threadIdx.x; i < end; i += NORM_THREADS) {
        const float v = x[i];
        s += v * v;
    }
    __shared__ float partial[NORM_THREADS];
    partial[threadIdx.x] = s;
    __syncthreads();
    for (int half = NORM_THREADS / 2; half > 0; half >>= 1) {
        if ((int)threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        ((float*)out)[block] = partial[0];
    }
}
