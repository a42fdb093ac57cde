//! Fashion-MNIST as real labelled images: 70,000 greyscale 28×28 photos of clothing in ten
//! classes, read from the IDX files Debian's `dataset-fashion-mnist` installs. Captions
//! come from the class names and CLIP-style prompt templates.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where Debian's package puts the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

pub const CLASSES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Prompt templates in the style of CLIP's zero-shot prompts; `{}` is the class name.
pub const TEMPLATES: [&str; 6] = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a grayscale image of a {}.",
    "a product photo of a {}.",
];

pub const SIDE: usize = 28;

/// Images in the test split: the held-out pairs of a Fashion-MNIST run.
pub const TEST_IMAGES: usize = 10_000;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// 60,000 images.
    Train,
    /// 10,000 images.
    Test,
}

pub struct FashionMnist {
    /// `n × 28 × 28` grey levels, row-major.
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

fn read_gz_or_plain(dir: &Path, stem: &str) -> Result<(PathBuf, Vec<u8>)> {
    let gz = dir.join(format!("{stem}.gz"));
    let plain = dir.join(stem);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    if gz.is_file() {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&gz).map_err(io(&gz))?)
            .read_to_end(&mut bytes)
            .map_err(io(&gz))?;
        Ok((gz, bytes))
    } else if plain.is_file() {
        Ok((plain.clone(), std::fs::read(&plain).map_err(io(&plain))?))
    } else {
        Err(Error::File {
            path: dir.to_path_buf(),
            message: format!(
                "no {stem}(.gz): install Debian's package `dataset-fashion-mnist` \
             (apt-get install -y dataset-fashion-mnist), or point `data.dir` at the IDX files"
            ),
        })
    }
}

/// An IDX file's payload after checking its magic number and dimensions.
fn idx(path: &Path, bytes: &[u8], magic: u32, dims: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bad = |message: String| Error::File {
        path: path.to_path_buf(),
        message,
    };
    let header = 4 + 4 * dims;
    if bytes.len() < header {
        return Err(bad("shorter than an IDX header".into()));
    }
    let word = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != magic {
        return Err(bad(format!("magic {:#x}, expected {magic:#x}", word(0))));
    }
    let shape: Vec<usize> = (0..dims).map(|d| word(4 + 4 * d) as usize).collect();
    // A damaged header can claim any dimensions: their product may overflow.
    let n = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(format!("a shape of {shape:?} is too large")))?;
    if Some(bytes.len()) != header.checked_add(n) {
        return Err(bad(format!(
            "{} data bytes for a shape of {shape:?} ({n} expected): truncated?",
            bytes.len() - header
        )));
    }
    Ok((shape, bytes[header..].to_vec()))
}

impl FashionMnist {
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
        };
        let (ipath, ibytes) = read_gz_or_plain(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let (lpath, lbytes) = read_gz_or_plain(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let (ishape, pixels) = idx(&ipath, &ibytes, 0x0803, 3)?;
        let (lshape, labels) = idx(&lpath, &lbytes, 0x0801, 1)?;
        if ishape[1..] != [SIDE, SIDE] || ishape[0] != lshape[0] {
            return Err(Error::File {
                path: dir.to_path_buf(),
                message: format!("images {ishape:?} and labels {lshape:?} do not match"),
            });
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= CLASSES.len()) {
            return Err(Error::File {
                path: lpath.to_path_buf(),
                message: format!("label {bad} out of range"),
            });
        }
        Ok(FashionMnist { pixels, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    /// Image `i` as RGB bytes (the grey level in all three channels), 28 × 28.
    pub fn rgb(&self, i: usize) -> Vec<u8> {
        self.pixels[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
            .iter()
            .flat_map(|&g| [g, g, g])
            .collect()
    }

    /// Image `i`'s caption from template `t`.
    pub fn caption(&self, i: usize, t: usize) -> String {
        TEMPLATES[t % TEMPLATES.len()].replace("{}", CLASSES[self.label(i)])
    }
}
