// Decoded RGB bytes normalised into the image tower's input in one pass
// (model::PixelNorm::on_device on a GPU, src/model/fused/cuda.rs): `[n, h, w, 3]` u8 (HWC,
// as the decoders write them) → `[n, 3, h, w]` f32 (CHW), `v · scale[c] − shift[c]`.
// Compiled at start-up by NVRTC after kernels.cuh.
//
// The product and the difference are rounded one at a time (`__fmul_rn`, `__fsub_rn`:
// never contracted into an FMA), as the host's f32 formula (`PixelNorm::extend_chw`)
// rounds them: the device's floats are the host's, bit for bit.
//
//   pixel_normalise: a thread per output element, writes coalesced; each warp reads the
//   bytes of 32 neighbouring pixels of one channel (96 bytes, one or two sectors).

extern "C" __global__ void pixel_normalise(unsigned long long bytes_at, unsigned long long out_at,
                                           long long plane, long long n, float scale_r,
                                           float scale_g, float scale_b, float shift_r,
                                           float shift_g, float shift_b) {
    const long long o = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (o >= n) {
        return;
    }
    // o = (image · 3 + c) · plane + pixel, pixel = y · w + x.
    const long long pixel = o % plane;
    const long long image_channel = o / plane;
    const int c = (int)(image_channel % 3);
    const long long image = image_channel / 3;
    const unsigned char* bytes = (const unsigned char*)bytes_at;
    const float v = (float)bytes[(image * plane + pixel) * 3 + c];
    const float scale = c == 0 ? scale_r : (c == 1 ? scale_g : scale_b);
    const float shift = c == 0 ? shift_r : (c == 1 ? shift_g : shift_b);
    ((float*)out_at)[o] = __fsub_rn(__fmul_rn(v, scale), shift);
}
