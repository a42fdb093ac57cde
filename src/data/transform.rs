//! CLIP's image preprocessing: decode, crop, resize to HWC bytes, normalise to CHW floats
//! (on the host, or on the device: `model::PixelNorm`).
//!
//! The centre crop takes the largest centred square and resizes it to `size × size` in
//! one pass: the same pixels as torchvision's "resize the shorter side, then centre crop",
//! with one resampling instead of a resample and a copy. Bicubic (Catmull-Rom), as
//! OpenCLIP's transform.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use rand::{Rng, SeedableRng};

use crate::model::PixelNorm;

/// OpenAI CLIP's per-channel mean and standard deviation (RGB, on [0, 1]).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Which part of the image becomes the square input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Crop {
    /// The largest centred square (evaluation, and training by default).
    Centre,
    /// torchvision's RandomResizedCrop: a random area fraction in `scale` and aspect
    /// ratio in `ratio` (log-uniform), ten tries, else the whole image's centre clamped
    /// to the ratio range, as torchvision falls back.
    RandomResized {
        scale: (f64, f64),
        ratio: (f64, f64),
    },
}

impl Crop {
    /// OpenCLIP's training augmentation.
    pub const OPENCLIP_TRAIN: Crop = Crop::RandomResized {
        scale: (0.9, 1.0),
        ratio: (3.0 / 4.0, 4.0 / 3.0),
    };
}

/// What one image may cost to decode: a file over either bound is skipped before it is
/// decoded (a crafted header can ask for gigabytes per worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Width × height, read from the header.
    pub max_pixels: u64,
    /// The encoded file's size.
    pub max_bytes: u64,
}

impl Default for ImageLimits {
    /// 40 Mpx (6,300², 120 MB as RGB) and 50 MiB: far above web-scale photos.
    fn default() -> Self {
        ImageLimits {
            max_pixels: 40_000_000,
            max_bytes: 50 << 20,
        }
    }
}

/// Why an image was not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Over [`ImageLimits`].
    TooLarge(String),
    /// Bytes that do not decode, or an empty image.
    Corrupt(String),
}

impl DecodeError {
    pub fn cause(&self) -> crate::data::shards::SkipCause {
        match self {
            DecodeError::TooLarge(_) => crate::data::shards::SkipCause::ImageTooLarge,
            DecodeError::Corrupt(_) => crate::data::shards::SkipCause::CorruptImage,
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooLarge(m) | DecodeError::Corrupt(m) => f.write_str(m),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageTransform {
    pub size: usize,
    pub crop: Crop,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub limits: ImageLimits,
}

impl ImageTransform {
    pub fn clip(size: usize, crop: Crop) -> Self {
        ImageTransform {
            size,
            crop,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            limits: ImageLimits::default(),
        }
    }

    pub fn with_limits(self, limits: ImageLimits) -> Self {
        ImageTransform { limits, ..self }
    }

    /// Decodes `bytes` as RGB, within [`Self::limits`]: the size first, then the header's
    /// dimensions, then the decode itself (bounded too, for formats that allocate more
    /// than the pixels).
    pub fn decode(&self, bytes: &[u8]) -> std::result::Result<image::RgbImage, DecodeError> {
        let l = self.limits;
        if bytes.len() as u64 > l.max_bytes {
            return Err(DecodeError::TooLarge(format!(
                "{} bytes, over the limit of {} (data.max_image_bytes)",
                bytes.len(),
                l.max_bytes
            )));
        }
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| DecodeError::Corrupt(e.to_string()))
        };
        let (w, h) = reader()?
            .into_dimensions()
            .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        if u64::from(w) * u64::from(h) > l.max_pixels {
            return Err(DecodeError::TooLarge(format!(
                "{w} × {h} pixels, over the limit of {} (data.max_image_pixels)",
                l.max_pixels
            )));
        }
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(w);
        limits.max_image_height = Some(h);
        // RGBA at 16 bits is the widest a decoder holds, twice for a conversion.
        limits.max_alloc = Some(l.max_pixels.saturating_mul(16));
        let mut r = reader()?;
        r.limits(limits);
        let decoded = r.decode().map_err(|e| match e {
            image::ImageError::Limits(e) => DecodeError::TooLarge(e.to_string()),
            e => DecodeError::Corrupt(e.to_string()),
        })?;
        Ok(decoded.to_rgb8())
    }

    /// The crop rectangle `(left, top, width, height)` in a `w × h` image; `seed` draws
    /// the random crop, so a replay gives the same one.
    pub fn crop_box(&self, w: u32, h: u32, seed: u64) -> (u32, u32, u32, u32) {
        let centre = || {
            let side = w.min(h);
            ((w - side) / 2, (h - side) / 2, side, side)
        };
        match self.crop {
            Crop::Centre => centre(),
            Crop::RandomResized { scale, ratio } => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let area = (w as f64) * (h as f64);
                let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
                for _ in 0..10 {
                    let target = area * rng.random_range(scale.0..=scale.1);
                    let aspect = rng.random_range(log_lo..=log_hi).exp();
                    let cw = (target * aspect).sqrt().round() as u32;
                    let ch = (target / aspect).sqrt().round() as u32;
                    if cw > 0 && ch > 0 && cw <= w && ch <= h {
                        let x = rng.random_range(0..=w - cw);
                        let y = rng.random_range(0..=h - ch);
                        return (x, y, cw, ch);
                    }
                }
                let aspect = w as f64 / h as f64;
                let (cw, ch) = if aspect < ratio.0 {
                    (w, ((w as f64 / ratio.0).round() as u32).min(h))
                } else if aspect > ratio.1 {
                    (((h as f64 * ratio.1).round() as u32).min(w), h)
                } else {
                    (w, h)
                };
                ((w - cw) / 2, (h - ch) / 2, cw, ch)
            }
        }
    }

    /// Decodes `bytes` (JPEG, PNG or WebP; grey or alpha become RGB) and returns the
    /// normalised `[3, size, size]` pixels, row-major.
    pub fn apply(&self, bytes: &[u8], seed: u64) -> std::result::Result<Vec<f32>, DecodeError> {
        let rgb = self.decode(bytes)?;
        self.apply_rgb(rgb.width(), rgb.height(), rgb.into_raw(), seed)
            .map_err(DecodeError::Corrupt)
    }

    /// The largest centred square of `bytes`' image, resized to `side × side`, as RGB
    /// bytes: what the preprocessed cache stores (crops then apply on top).
    pub fn square(&self, bytes: &[u8], side: usize) -> std::result::Result<Vec<u8>, DecodeError> {
        let rgb = self.decode(bytes)?;
        let (w, h) = (rgb.width(), rgb.height());
        if w == 0 || h == 0 {
            return Err(DecodeError::Corrupt("empty image".into()));
        }
        let edge = w.min(h);
        let corrupt = |e: String| DecodeError::Corrupt(e);
        let src = Image::from_vec_u8(w, h, rgb.into_raw(), PixelType::U8x3)
            .map_err(|e| corrupt(e.to_string()))?;
        let mut dst = Image::new(side as u32, side as u32, PixelType::U8x3);
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
            .crop(
                ((w - edge) / 2) as f64,
                ((h - edge) / 2) as f64,
                edge as f64,
                edge as f64,
            );
        Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(dst.into_vec())
    }

    /// The transform on decoded RGB bytes (`w × h × 3`): normalised `[3, size, size]`.
    pub fn apply_rgb(
        &self,
        w: u32,
        h: u32,
        rgb: Vec<u8>,
        seed: u64,
    ) -> std::result::Result<Vec<f32>, String> {
        Ok(self.normalise(&self.crop_rgb(w, h, rgb, seed)?))
    }

    /// Decodes `bytes` and crops and resizes them: `[size, size, 3]` RGB bytes, not yet
    /// normalised (the batch goes to the device as bytes, or is normalised as it is
    /// stacked).
    pub fn apply_bytes(
        &self,
        bytes: &[u8],
        seed: u64,
    ) -> std::result::Result<Vec<u8>, DecodeError> {
        let rgb = self.decode(bytes)?;
        self.crop_rgb(rgb.width(), rgb.height(), rgb.into_raw(), seed)
            .map_err(DecodeError::Corrupt)
    }

    /// The crop and resize on decoded RGB bytes (`w × h × 3`): `[size, size, 3]` bytes.
    pub fn crop_rgb(
        &self,
        w: u32,
        h: u32,
        rgb: Vec<u8>,
        seed: u64,
    ) -> std::result::Result<Vec<u8>, String> {
        if w == 0 || h == 0 {
            return Err("empty image".into());
        }
        let (x, y, cw, ch) = self.crop_box(w, h, seed);
        let src = Image::from_vec_u8(w, h, rgb, PixelType::U8x3).map_err(|e| e.to_string())?;
        let side = self.size as u32;
        let mut dst = Image::new(side, side, PixelType::U8x3);
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
            .crop(x as f64, y as f64, cw as f64, ch as f64);
        Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| e.to_string())?;
        Ok(dst.into_vec())
    }

    /// The normalisation this transform ends with.
    pub fn norm(&self) -> PixelNorm {
        PixelNorm {
            mean: self.mean,
            std: self.std,
        }
    }

    /// `[h·w·3]` bytes → `[3, h, w]` floats, `(v/255 − mean)/std`.
    pub fn normalise(&self, hwc: &[u8]) -> Vec<f32> {
        let mut out = Vec::with_capacity(hwc.len());
        self.norm().extend_chw(hwc, &mut out);
        out
    }
}
