//! The built-in image–caption set, generated in process: a coloured shape of some size at
//! some place on a noisy background, captioned with those factors ("a large red circle at
//! the top left"). Sample `i` of a stream is a pure function of (seed, stream, i), so any
//! rank can produce any slice of any batch without the others, and image ranks never
//! build captions (nor text ranks images).

use rand::{Rng, SeedableRng};

use super::transform::{CLIP_MEAN, CLIP_STD};

pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];
pub const COLOURS: [(&str, [f32; 3]); 6] = [
    ("red", [0.9, 0.1, 0.1]),
    ("green", [0.1, 0.8, 0.2]),
    ("blue", [0.15, 0.3, 0.95]),
    ("yellow", [0.95, 0.9, 0.1]),
    ("purple", [0.6, 0.15, 0.8]),
    ("white", [0.95, 0.95, 0.95]),
];
pub const SIZES: [&str; 2] = ["small", "large"];
pub const POSITIONS: [&str; 5] = [
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "centre",
];

/// Which independent sample stream: training batches, or held-out evaluation pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Train,
    Heldout,
}

/// The latent factors of one sample, and the per-sample jitter of its picture.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub shape: usize,
    pub colour: usize,
    pub size: usize,
    pub position: usize,
    jitter: (f32, f32),
    noise_seed: u64,
}

#[derive(Debug, Clone)]
pub struct SyntheticShapes {
    pub seed: u64,
    pub image_size: usize,
}

impl SyntheticShapes {
    pub fn new(seed: u64, image_size: usize) -> Self {
        SyntheticShapes { seed, image_size }
    }

    /// The number of distinct captions the generator can produce.
    pub fn num_captions() -> usize {
        SHAPES.len() * COLOURS.len() * SIZES.len() * POSITIONS.len()
    }

    pub fn sample(&self, stream: Stream, index: u64) -> Sample {
        let stream_tag: u64 = match stream {
            Stream::Train => 0x7472_6169_6e00_0000,
            Stream::Heldout => 0x6865_6c64_6f75_7400,
        };
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(splitmix(self.seed ^ stream_tag ^ splitmix(index)));
        Sample {
            shape: rng.random_range(0..SHAPES.len()),
            colour: rng.random_range(0..COLOURS.len()),
            size: rng.random_range(0..SIZES.len()),
            position: rng.random_range(0..POSITIONS.len()),
            jitter: (rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)),
            noise_seed: rng.random(),
        }
    }

    pub fn caption(s: &Sample) -> String {
        format!(
            "a {} {} {} at the {}",
            SIZES[s.size], COLOURS[s.colour].0, SHAPES[s.shape], POSITIONS[s.position]
        )
    }

    /// Renders `s` as CHW floats, normalised with CLIP's mean and std.
    pub fn render(&self, s: &Sample) -> Vec<f32> {
        let n = self.image_size;
        let nf = n as f32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(s.noise_seed);
        let background: f32 = rng.random_range(0.05..0.35);
        let (cx, cy) = match s.position {
            0 => (0.27, 0.27),
            1 => (0.73, 0.27),
            2 => (0.27, 0.73),
            3 => (0.73, 0.73),
            _ => (0.5, 0.5),
        };
        let cx = (cx + 0.05 * s.jitter.0) * nf;
        let cy = (cy + 0.05 * s.jitter.1) * nf;
        let radius = if s.size == 0 { 0.11 } else { 0.21 } * nf;
        let colour = COLOURS[s.colour].1;
        let mut img = vec![0f32; 3 * n * n];
        for y in 0..n {
            for x in 0..n {
                let dx = (x as f32 + 0.5 - cx) / radius;
                let dy = (y as f32 + 0.5 - cy) / radius;
                let inside = match s.shape {
                    0 => dx * dx + dy * dy <= 1.0,
                    1 => dx.abs() <= 0.85 && dy.abs() <= 0.85,
                    2 => (-0.9..=0.9).contains(&dy) && dx.abs() <= (dy + 0.9) / 1.8,
                    _ => {
                        (dx.abs() <= 1.0 && dy.abs() <= 0.3) || (dy.abs() <= 1.0 && dx.abs() <= 0.3)
                    }
                };
                for c in 0..3 {
                    let base = if inside { colour[c] } else { background };
                    let v = (base + rng.random_range(-0.08..0.08)).clamp(0.0, 1.0);
                    img[c * n * n + y * n + x] = (v - CLIP_MEAN[c]) / CLIP_STD[c];
                }
            }
        }
        img
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
