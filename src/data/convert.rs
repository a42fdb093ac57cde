//! `mmpipe data`: write WebDataset shards from the synthetic set, Fashion-MNIST or a
//! CSV/TSV of image paths and captions, and inspect a shard.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::fashion_mnist::{FashionMnist, Split, SIDE};
use super::order::SkipCounts;
use super::shards::{scan, write_shard, SampleMembers, SkipCause, IMAGE_EXTENSIONS};
use super::synthetic::{Stream, SyntheticShapes};
use super::transform::{CLIP_MEAN, CLIP_STD};
use crate::error::{Error, Result};

/// Collects samples and writes a shard every `per_shard` of them: `OUT/000000.tar`, ...
pub struct ShardWriter {
    dir: PathBuf,
    per_shard: usize,
    pending: Vec<SampleMembers>,
    pub written: Vec<PathBuf>,
    pub samples: usize,
}

impl ShardWriter {
    pub fn new(dir: &Path, per_shard: usize) -> Result<Self> {
        if per_shard == 0 {
            return Err(Error::Msg("--per-shard must be at least 1".into()));
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            per_shard,
            pending: Vec::new(),
            written: Vec::new(),
            samples: 0,
        })
    }

    pub fn push(&mut self, key: String, members: Vec<(String, Vec<u8>)>) -> Result<()> {
        self.pending.push((key, members));
        self.samples += 1;
        if self.pending.len() == self.per_shard {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("{:06}.tar", self.written.len()));
        write_shard(&path, &self.pending)?;
        self.pending.clear();
        self.written.push(path);
        Ok(())
    }

    pub fn finish(mut self) -> Result<(Vec<PathBuf>, usize)> {
        self.flush()?;
        Ok((self.written, self.samples))
    }
}

/// PNG bytes of an RGB image.
pub fn png(width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| Error::Msg("pixel buffer does not match its size".into()))?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::Msg(format!("PNG encoding: {e}")))?;
    Ok(out)
}

/// The synthetic shapes as PNG + caption shards.
pub fn synth(
    out: &Path,
    samples: usize,
    per_shard: usize,
    size: usize,
    seed: u64,
) -> Result<(Vec<PathBuf>, usize)> {
    let shapes = SyntheticShapes::new(seed, size);
    let mut w = ShardWriter::new(out, per_shard)?;
    for i in 0..samples as u64 {
        let s = shapes.sample(Stream::Train, i);
        let chw = shapes.render(&s);
        let plane = size * size;
        let mut rgb = vec![0u8; 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                let v = chw[c * plane + p] * CLIP_STD[c] + CLIP_MEAN[c];
                rgb[3 * p + c] = (v * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
        w.push(
            format!("{i:08}"),
            vec![
                ("png".into(), png(size as u32, size as u32, rgb)?),
                ("txt".into(), SyntheticShapes::caption(&s).into_bytes()),
            ],
        )?;
    }
    w.finish()
}

/// Fashion-MNIST as PNG shards, each image with its first template's caption and its
/// label in `KEY.cls`.
pub fn fashion_mnist(
    dir: &Path,
    split: Split,
    out: &Path,
    per_shard: usize,
    limit: Option<usize>,
) -> Result<(Vec<PathBuf>, usize)> {
    let set = FashionMnist::load(dir, split)?;
    let n = limit.map_or(set.len(), |l| l.min(set.len()));
    let mut w = ShardWriter::new(out, per_shard)?;
    for i in 0..n {
        w.push(
            format!("{i:06}"),
            vec![
                ("png".into(), png(SIDE as u32, SIDE as u32, set.rgb(i))?),
                ("txt".into(), set.caption(i, 0).into_bytes()),
                ("cls".into(), set.label(i).to_string().into_bytes()),
            ],
        )?;
    }
    w.finish()
}

/// Which columns of a CSV/TSV hold the image path and the caption.
#[derive(Debug, Clone)]
pub struct CsvColumns {
    pub image: String,
    pub caption: String,
    /// `b','` or `b'\t'`; by default from the extension (`.tsv` → tab).
    pub delimiter: Option<u8>,
}

/// A CSV/TSV of image paths (relative to the file) and captions as shards: the image
/// bytes as they are, under their own extension. Rows whose image is missing, unreadable
/// or of another format, or whose caption is blank, are skipped and counted.
pub fn csv(
    path: &Path,
    columns: &CsvColumns,
    out: &Path,
    per_shard: usize,
) -> Result<(Vec<PathBuf>, usize, SkipCounts)> {
    let rows = read_rows(path, columns)?;
    let mut w = ShardWriter::new(out, per_shard)?;
    let mut skipped = SkipCounts::default();
    for (row, (file, caption)) in rows.iter().enumerate() {
        let line = row + 2;
        if caption.is_empty() {
            tracing::warn!("{}:{line}: blank caption, row skipped", path.display());
            skipped.add(SkipCause::EmptyCaption, 1);
            continue;
        }
        let extension = file
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let bytes = match std::fs::read(file) {
            Ok(b) if IMAGE_EXTENSIONS.contains(&extension.as_str()) && !b.is_empty() => b,
            _ => {
                tracing::warn!(
                    "{}:{line}: image {} missing, empty or not jpg/png/webp; row skipped",
                    path.display(),
                    file.display()
                );
                skipped.add(SkipCause::MissingImage, 1);
                continue;
            }
        };
        if image::load_from_memory(&bytes).is_err() {
            tracing::warn!(
                "{}:{line}: image {} does not decode; row skipped",
                path.display(),
                file.display()
            );
            skipped.add(SkipCause::CorruptImage, 1);
            continue;
        }
        w.push(
            format!("{:08}", w.samples),
            vec![
                (extension, bytes),
                ("txt".into(), caption.as_bytes().to_vec()),
            ],
        )?;
    }
    let (written, samples) = w.finish()?;
    Ok((written, samples, skipped))
}

/// A CSV/TSV's rows as (image path resolved against the file's folder, trimmed caption).
pub fn read_rows(path: &Path, columns: &CsvColumns) -> Result<Vec<(PathBuf, String)>> {
    let delimiter = columns.delimiter.unwrap_or_else(|| {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("tsv"))
        {
            b'\t'
        } else {
            b','
        }
    });
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .from_path(path)
        .map_err(|e| Error::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let headers = reader
        .headers()
        .map_err(|e| Error::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .clone();
    let column = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            Error::invalid(
                path,
                name,
                format!(
                    "no such column; the header has: {}",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let (image_col, caption_col) = (column(&columns.image)?, column(&columns.caption)?);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut rows = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record =
            record.map_err(|e| Error::Msg(format!("{}:{}: {e}", path.display(), row + 2)))?;
        rows.push((
            base.join(record.get(image_col).unwrap_or("").trim()),
            record.get(caption_col).unwrap_or("").trim().to_string(),
        ));
    }
    Ok(rows)
}

/// What a shard holds.
#[derive(Debug, Clone)]
pub struct ShardReport {
    pub samples: usize,
    pub complete: usize,
    pub by_extension: BTreeMap<String, usize>,
    pub problems: SkipCounts,
    /// Where the scan stopped early, if it did.
    pub stopped: Option<String>,
    /// The first samples: key, caption, and the image's size or why it does not decode.
    pub first: Vec<(String, String, String)>,
}

pub fn inspect(path: &Path, show: usize) -> ShardReport {
    let s = scan(path);
    let mut by_extension = BTreeMap::new();
    let mut problems = SkipCounts::default();
    let mut complete = 0;
    for sample in &s.samples {
        for m in &sample.members {
            *by_extension.entry(m.extension.clone()).or_insert(0) += 1;
        }
        match sample.structural_problem() {
            Some(cause) => problems.add(cause, 1),
            None => complete += 1,
        }
    }
    if let Some((cause, _)) = &s.stopped {
        problems.add(*cause, 1);
    }
    let first = s
        .samples
        .iter()
        .take(show)
        .map(|sample| {
            let caption = sample
                .caption()
                .and_then(|m| sample.read(m).ok())
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .unwrap_or_else(|| "(no caption)".into());
            let image = match sample.image().map(|m| sample.read(m)) {
                Some(Ok(bytes)) => match image::load_from_memory(&bytes) {
                    Ok(img) => format!(
                        "{}x{} {}",
                        img.width(),
                        img.height(),
                        sample.image().map_or("", |m| m.extension.as_str())
                    ),
                    Err(e) => format!("does not decode: {e}"),
                },
                Some(Err(e)) => format!("unreadable: {e}"),
                None => "(no image)".into(),
            };
            (sample.key.clone(), caption, image)
        })
        .collect();
    ShardReport {
        samples: s.samples.len(),
        complete,
        by_extension,
        problems,
        stopped: s.stopped.map(|(c, m)| format!("{}: {m}", c.describe())),
        first,
    }
}
