//! Zero-shot classification on any labelled image set, as CLIP practitioners report it
//! (OpenCLIP's `--imagenet-val`): each class's text feature is the normalised mean of its
//! prompts' normalised features (a template per prompt, OpenAI's 80 ImageNet templates
//! unless given others), each image gets the most similar class, and the scores are
//! top-1, top-5 and the mean per-class recall.
//!
//! The set is an image folder with one subfolder per class (`ROOT/CLASS/*.jpg|png|webp`,
//! torchvision's and ImageNet's layout), or WebDataset shards whose samples carry an
//! image and a `.cls` integer label (clip_benchmark's and img2dataset's convention), or a
//! CSV/TSV with an image-path column and a label column (an index or a class name).
//! Class names are a names file's lines (one per class: in the folders' sorted order, or
//! by label), or for a folder its subfolders' names, or, for 1000 folders named by
//! WordNet id (`n01440764`), the ImageNet-1k names.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::data::transform::{Crop, ImageTransform};
use crate::data::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::layers::l2_normalize;
use crate::model::{ClipConfig, TowerInput};

/// OpenAI's 80 ImageNet prompt templates (`data/zero-shot/`), `{}` for the class.
pub const OPENAI_IMAGENET_TEMPLATES: &str =
    include_str!("../../data/zero-shot/openai-imagenet-templates.txt");
/// The ImageNet-1k class names in class-index order (the sorted WordNet ids).
pub const IMAGENET_CLASSNAMES: &str =
    include_str!("../../data/zero-shot/imagenet-1k-classnames.txt");

/// The image files a folder set takes.
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Prompt templates, each with one `{}` where the class name goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Templates(pub Vec<String>);

impl Templates {
    /// OpenAI's 80 ImageNet templates: the default.
    pub fn openai_imagenet() -> Self {
        Self::parse(
            OPENAI_IMAGENET_TEMPLATES,
            Path::new("openai-imagenet-templates.txt"),
        )
        .expect("the built-in templates parse")
    }

    /// One template a line (blank lines and `#` comments skipped), from `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: path.to_path_buf(),
            message: format!("cannot read the prompt templates: {e}"),
        })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, origin: &Path) -> Result<Self> {
        let mut templates = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.matches("{}").count() != 1 {
                return Err(Error::File {
                    path: origin.to_path_buf(),
                    message: format!(
                        "line {}: `{line}` needs exactly one `{{}}` where the class name goes",
                        i + 1
                    ),
                });
            }
            templates.push(line.to_string());
        }
        if templates.is_empty() {
            return Err(Error::File {
                path: origin.to_path_buf(),
                message: "no prompt templates in the file".into(),
            });
        }
        Ok(Templates(templates))
    }

    /// Every template filled with `class`.
    pub fn prompts(&self, class: &str) -> Vec<String> {
        self.0.iter().map(|t| t.replace("{}", class)).collect()
    }
}

/// Class names from a file: one a line, blank lines skipped.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        message: format!("cannot read the class names: {e}"),
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Where one image's bytes are.
#[derive(Debug, Clone)]
pub enum ImageRef {
    File(PathBuf),
    /// A member of a WebDataset shard.
    Member {
        sample: crate::data::shards::ShardSample,
        member: crate::data::shards::Member,
    },
}

impl ImageRef {
    /// The image's bytes; an error naming the file, or the shard and the sample's key.
    fn read(&self) -> Result<Vec<u8>> {
        match self {
            ImageRef::File(path) => std::fs::read(path).map_err(|e| Error::File {
                path: path.clone(),
                message: format!("cannot read the image: {e}"),
            }),
            ImageRef::Member { sample, member } => sample.read(member).map_err(|e| Error::File {
                path: sample.shard.to_path_buf(),
                message: format!("sample `{}`: cannot read its image: {e}", sample.key),
            }),
        }
    }

    /// The image through `transform`: `[3, size, size]` pixels; an error naming where
    /// it came from when it cannot be read or decoded.
    pub fn pixels(&self, transform: &ImageTransform) -> Result<Vec<f32>> {
        let bytes = self.read()?;
        transform.apply(&bytes, 0).map_err(|e| self.undecodable(e))
    }

    /// The error for bytes that do not decode, naming where they came from.
    fn undecodable(&self, e: impl std::fmt::Display) -> Error {
        match self {
            ImageRef::File(path) => Error::File {
                path: path.clone(),
                message: format!("cannot decode the image: {e}"),
            },
            ImageRef::Member { sample, .. } => Error::File {
                path: sample.shard.to_path_buf(),
                message: format!("sample `{}`: cannot decode its image: {e}", sample.key),
            },
        }
    }
}

/// Every sample of `shards`, in order; a shard that cannot be read, or is cut short, is
/// an error naming it (an evaluation set is scored whole or not at all).
pub fn every_sample(shards: &[PathBuf]) -> Result<Vec<crate::data::shards::ShardSample>> {
    let mut samples = Vec::new();
    for shard in shards {
        let scan = crate::data::shards::scan(shard);
        if let Some((cause, message)) = scan.stopped {
            return Err(Error::File {
                path: shard.clone(),
                message: format!("{}: {message}", cause.describe()),
            });
        }
        samples.extend(scan.samples);
    }
    Ok(samples)
}

/// A labelled image set: every image and its class.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// Where it was read from (named in its errors).
    pub root: PathBuf,
    /// Each image and its class index.
    pub images: Vec<(ImageRef, usize)>,
    pub classes: Vec<String>,
}

/// The rows of a CSV/TSV (`.tsv`: tab-separated) as (image file, resolved against the
/// file's folder; the `value` column), every image present and every value non-blank; an
/// error names the file and the line.
pub(super) fn csv_rows(path: &Path, image: &str, value: &str) -> Result<Vec<(PathBuf, String)>> {
    let columns = crate::data::convert::CsvColumns {
        image: image.to_string(),
        caption: value.to_string(),
        delimiter: None,
    };
    let rows = crate::data::convert::read_rows(path, &columns)?;
    for (row, (file, text)) in rows.iter().enumerate() {
        if text.is_empty() {
            return Err(csv_error(path, row, format!("blank `{value}`")));
        }
        if !file.is_file() {
            return Err(csv_error(
                path,
                row,
                format!("no image file {}", file.display()),
            ));
        }
    }
    Ok(rows)
}

/// An error at data row `row` of CSV `path` (line `row + 2`, after the header).
fn csv_error(path: &Path, row: usize, message: String) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message: format!("line {}: {message}", row + 2),
    }
}

/// Which columns of a zero-shot CSV/TSV hold the image path and the label.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvLabels {
    pub image: String,
    pub label: String,
}

impl Default for CsvLabels {
    /// OpenCLIP's image column name (`--csv-img-key`), and `label`.
    fn default() -> Self {
        CsvLabels {
            image: crate::data::CSV_IMAGE_COLUMN.into(),
            label: "label".into(),
        }
    }
}

/// Whether `name` is a WordNet id: `n` and eight digits.
fn is_wordnet_id(name: &str) -> bool {
    name.len() == 9 && name.starts_with('n') && name[1..].bytes().all(|b| b.is_ascii_digit())
}

impl LabelledImages {
    /// `root/CLASS/*.{jpg,jpeg,png,webp}`, classes in sorted folder order. Names: `names`'
    /// lines if given (as many as folders), else the ImageNet-1k names for 1000 WordNet-id
    /// folders, else the folder names.
    pub fn from_folder(root: &Path, names: Option<&Path>) -> Result<Self> {
        let err = |path: &Path, message: String| Error::File {
            path: path.to_path_buf(),
            message,
        };
        let entries = std::fs::read_dir(root)
            .map_err(|e| err(root, format!("cannot read the image folder: {e}")))?;
        let mut folders: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        folders.sort();
        if folders.is_empty() {
            return Err(err(
                root,
                "no class folders: a zero-shot set is ROOT/CLASS/*.jpg (one subfolder per class)"
                    .into(),
            ));
        }
        let mut images = Vec::new();
        for (class, folder) in folders.iter().enumerate() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
                .map_err(|e| err(folder, format!("cannot read the class folder: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            if files.is_empty() {
                return Err(err(
                    folder,
                    format!(
                        "the class folder holds no images ({})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
            files.sort();
            images.extend(files.into_iter().map(|f| (ImageRef::File(f), class)));
        }
        let folder_names: Vec<String> = folders
            .iter()
            .map(|f| {
                f.file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned())
            })
            .collect();
        let classes = match names {
            Some(path) => {
                let names = read_class_names(path)?;
                if names.len() != folders.len() {
                    return Err(err(
                        path,
                        format!(
                            "{} class names for the {} class folders of {}",
                            names.len(),
                            folders.len(),
                            root.display()
                        ),
                    ));
                }
                names
            }
            None if folders.len() == 1000 && folder_names.iter().all(|n| is_wordnet_id(n)) => {
                IMAGENET_CLASSNAMES.lines().map(str::to_string).collect()
            }
            None => folder_names,
        };
        Ok(LabelledImages {
            root: root.to_path_buf(),
            images,
            classes,
        })
    }

    /// The samples of `shards` that carry an image and a `.cls` label (an integer, the
    /// class's line in `names`), in shard order. A sample without one of them, a label
    /// that is not an integer or is past the names, or a shard that cannot be read is an
    /// error naming the shard and the sample.
    pub fn from_shards(shards: &[PathBuf], names: &Path) -> Result<Self> {
        let classes = read_class_names(names)?;
        if classes.is_empty() {
            return Err(Error::File {
                path: names.to_path_buf(),
                message: "no class names in the file".into(),
            });
        }
        let mut images = Vec::new();
        for sample in every_sample(shards)? {
            let shard = sample.shard.as_ref();
            let bad = |message: String| Error::File {
                path: shard.clone(),
                message: format!("sample `{}`: {message}", sample.key),
            };
            let image = sample
                .image()
                .cloned()
                .ok_or_else(|| bad("no image member".into()))?;
            let cls = sample
                .member(&["cls"])
                .ok_or_else(|| bad("no `.cls` label member".into()))?;
            let text = sample
                .read(cls)
                .map_err(|e| bad(format!("cannot read its label: {e}")))?;
            let text = String::from_utf8_lossy(&text);
            let label: usize = text
                .trim()
                .parse()
                .map_err(|_| bad(format!("label `{}` is not a class index", text.trim())))?;
            if label >= classes.len() {
                return Err(bad(format!(
                    "label {label} is past the {} class names of {}",
                    classes.len(),
                    names.display()
                )));
            }
            images.push((
                ImageRef::Member {
                    sample: sample.clone(),
                    member: image,
                },
                label,
            ));
        }
        if images.is_empty() {
            return Err(Error::File {
                path: shards[0].clone(),
                message: "the shards hold no samples".into(),
            });
        }
        Ok(LabelledImages {
            root: shards[0].clone(),
            images,
            classes,
        })
    }

    /// The rows of a CSV/TSV (`.tsv`: tab-separated) naming an image (a path relative to
    /// the file) and its label, in file order. A label is a class index (a line of
    /// `names`) or a class name: one of `names`' lines, or, without `names`, any name (the
    /// classes are then the distinct names, sorted). A missing image, a blank label, or a
    /// label that is no class is an error naming the file and the line.
    pub fn from_csv(path: &Path, columns: &CsvLabels, names: Option<&Path>) -> Result<Self> {
        let rows = csv_rows(path, &columns.image, &columns.label)?;
        let at = |row: usize, message: String| csv_error(path, row, message);
        if rows.is_empty() {
            return Err(Error::File {
                path: path.to_path_buf(),
                message: "the file has no rows".into(),
            });
        }
        let named = match names {
            Some(p) => Some((p, read_class_names(p)?)),
            None => None,
        };
        let classes: Vec<String> = match &named {
            Some((_, names)) => names.clone(),
            None => {
                if let Some(row) = rows.iter().position(|(_, l)| l.parse::<usize>().is_ok()) {
                    return Err(at(
                        row,
                        format!(
                            "label `{}` is a class index: name the classes with a class-names \
                             file (one name a line, by index)",
                            rows[row].1
                        ),
                    ));
                }
                let mut distinct: Vec<String> = rows.iter().map(|(_, l)| l.clone()).collect();
                distinct.sort();
                distinct.dedup();
                distinct
            }
        };
        let mut images = Vec::with_capacity(rows.len());
        for (row, (file, label)) in rows.into_iter().enumerate() {
            let class = match label.parse::<usize>() {
                Ok(index) if index < classes.len() => index,
                Ok(index) => {
                    return Err(at(
                        row,
                        format!(
                            "label {index} is past the {} class names of {}",
                            classes.len(),
                            named
                                .as_ref()
                                .map_or(String::new(), |(p, _)| p.display().to_string())
                        ),
                    ))
                }
                Err(_) => classes.iter().position(|c| *c == label).ok_or_else(|| {
                    at(
                        row,
                        format!(
                            "label `{label}` is not one of the {} class names of {}",
                            classes.len(),
                            named
                                .as_ref()
                                .map_or(String::new(), |(p, _)| p.display().to_string())
                        ),
                    )
                })?,
            };
            images.push((ImageRef::File(file), class));
        }
        Ok(LabelledImages {
            root: path.to_path_buf(),
            images,
            classes,
        })
    }

    pub fn labels(&self) -> Vec<usize> {
        self.images.iter().map(|(_, c)| *c).collect()
    }

    /// The pixels of images `range` through `transform`, decoded in parallel, as a
    /// `[n, 3, size, size]` tensor; a file that cannot be read or decoded is an error
    /// naming it.
    pub fn pixels(
        &self,
        range: std::ops::Range<usize>,
        transform: &ImageTransform,
    ) -> Result<Tensor> {
        let refs: Vec<&ImageRef> = self.images[range].iter().map(|(image, _)| image).collect();
        decode_batch(&refs, transform)
    }
}

/// `images` through `transform`, decoded in parallel, as a `[n, 3, size, size]` tensor;
/// an image that cannot be read or decoded is an error naming it.
pub fn decode_batch(images: &[&ImageRef], transform: &ImageTransform) -> Result<Tensor> {
    let side = transform.size;
    let decoded: Vec<Vec<f32>> = images
        .par_iter()
        .map(|image| image.pixels(transform))
        .collect::<Result<_>>()?;
    Ok(Tensor::from_vec(
        decoded.concat(),
        (images.len(), 3, side, side),
        &candle_core::Device::Cpu,
    )?)
}

/// Each class's text feature: its prompts encoded by `encode_text` (normalised features,
/// `[prompts, D]`), averaged, and normalised again. `[classes, D]`.
pub fn class_features(
    classes: &[String],
    templates: &Templates,
    encode_text: &dyn Fn(&[String]) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(classes.len());
    for class in classes {
        rows.push(encode_text(&templates.prompts(class))?.mean_keepdim(0)?);
    }
    l2_normalize(&Tensor::cat(&rows, 0)?)
}

/// What zero-shot classification scored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ZeroShotScores {
    pub images: usize,
    pub classes: usize,
    pub top1: f64,
    pub top5: f64,
    /// The mean over classes of the share of a class's images classified as it (classes
    /// without images left out): balanced accuracy, what an unbalanced set should report.
    pub mean_per_class_recall: f64,
}

impl ZeroShotScores {
    pub fn summary(&self) -> String {
        format!(
            "top-1 {:.2}%, top-5 {:.2}%, mean per-class recall {:.2}% ({} images, {} classes)",
            100.0 * self.top1,
            100.0 * self.top5,
            100.0 * self.mean_per_class_recall,
            self.images,
            self.classes
        )
    }
}

/// Top-1, top-5 and the mean per-class recall of images `[n, D]` against class features
/// `[C, D]` (both normalised), `labels` the images' classes. Ties rank the lower class
/// first.
pub fn zero_shot_scores(
    image: &Tensor,
    classes: &Tensor,
    labels: &[usize],
) -> Result<ZeroShotScores> {
    let (n, c) = (image.dim(0)?, classes.dim(0)?);
    if labels.len() != n {
        return Err(Error::Msg(format!(
            "{} labels for {n} images",
            labels.len()
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= c) {
        return Err(Error::Msg(format!("label {bad} of {c} classes")));
    }
    let logits: Vec<Vec<f32>> = image
        .matmul(&classes.t()?)?
        .to_dtype(DType::F32)?
        .to_vec2()?;
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut per_class = vec![(0usize, 0usize); c];
    for (row, &label) in logits.iter().zip(labels) {
        // The label's rank: classes scoring above it, or equal and before it.
        let score = row[label];
        let rank = row
            .iter()
            .enumerate()
            .filter(|&(j, &s)| s > score || (s == score && j < label))
            .count();
        top1 += usize::from(rank == 0);
        top5 += usize::from(rank < 5);
        per_class[label].0 += usize::from(rank == 0);
        per_class[label].1 += 1;
    }
    let present: Vec<f64> = per_class
        .iter()
        .filter(|(_, total)| *total > 0)
        .map(|&(hit, total)| hit as f64 / total as f64)
        .collect();
    let share = |k: usize| k as f64 / n.max(1) as f64;
    Ok(ZeroShotScores {
        images: n,
        classes: c,
        top1: share(top1),
        top5: share(top5),
        mean_per_class_recall: present.iter().sum::<f64>() / present.len().max(1) as f64,
    })
}

/// A labelled image set ready to score at every evaluation of a run: its images, its
/// prompts, and the model's input shapes.
pub struct ZeroShotSet {
    pub name: String,
    pub images: LabelledImages,
    pub templates: Templates,
    transform: ImageTransform,
    tokenizer: TextTokenizer,
    context: usize,
}

impl ZeroShotSet {
    /// `images` prompted with `templates` (a file, or OpenAI's 80), shaped for `model`.
    pub fn new(
        name: &str,
        images: LabelledImages,
        templates: Option<&Path>,
        model: &ClipConfig,
    ) -> Result<Self> {
        Ok(ZeroShotSet {
            name: name.to_string(),
            images,
            templates: match templates {
                Some(path) => Templates::from_file(path)?,
                None => Templates::openai_imagenet(),
            },
            transform: ImageTransform::clip(model.image_size(), Crop::Centre),
            tokenizer: crate::data::tokenizer::caption_tokenizer(model)?,
            context: model.context_length(),
        })
    }

    /// Images `range` as the image tower's input.
    pub fn image_input(&self, range: std::ops::Range<usize>) -> Result<TowerInput> {
        Ok(TowerInput::Images(
            self.images.pixels(range, &self.transform)?,
        ))
    }

    /// Prompts as the text tower's input.
    pub fn text_input(&self, prompts: &[String]) -> Result<TowerInput> {
        self.tokenizer
            .caption_input(prompts, self.context, &candle_core::Device::Cpu)
    }
}
