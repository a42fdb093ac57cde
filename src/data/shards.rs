//! WebDataset shards as img2dataset writes them: tar files whose members `KEY.EXT` group
//! into samples (`000123.jpg`, `000123.txt`, `000123.json`).
//!
//! A scan reads only the tar headers and records where each member's bytes lie; a rank
//! then reads the bytes of its own samples' members of its own modality, and nothing else
//! (text ranks never touch image bytes). Everything a scan decides (which samples exist,
//! which are complete, where a shard is cut short) comes from headers and the file's
//! length, so every rank, whatever its modality, sees the same samples in the same order.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Extensions that hold an image.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
/// The caption's extension.
pub const CAPTION_EXTENSION: &str = "txt";

/// Expands shell-style braces: numeric ranges `{000..099}` (zero-padded to the first
/// bound's width) and lists `{a,b,c}`, any number of them.
pub fn expand_braces(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(format!("`{pattern}`: `}}` without `{{`"));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| format!("`{pattern}`: `{{` without `}}`"))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let alternatives: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi) = match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
            _ => {
                return Err(format!(
                    "`{pattern}`: `{{{body}}}` is not a range of two increasing whole numbers"
                ))
            }
        };
        if hi - lo >= MAX_SHARD_NAMES as u64 {
            return Err(format!("`{pattern}`: `{{{body}}}` names too many shards"));
        }
        let width = a.len();
        (lo..=hi).map(|n| format!("{n:0width$}")).collect()
    } else {
        body.split(',').map(str::to_string).collect()
    };
    let rest = expand_braces(tail)?;
    // Ranges multiply: `{0..9999}{0..9999}` would be 10⁸ names.
    if alternatives.len().saturating_mul(rest.len()) > MAX_SHARD_NAMES {
        return Err(format!("`{pattern}` names too many shards"));
    }
    Ok(alternatives
        .iter()
        .flat_map(|alt| rest.iter().map(move |r| format!("{head}{alt}{r}")))
        .collect())
}

/// The most shard names one pattern may expand to.
const MAX_SHARD_NAMES: usize = 10_000_000;

/// Every shard named by `patterns` (relative paths are relative to `base`), in order.
/// A pattern that names no existing file is an error naming `origin` and `field`: found
/// at start-up, not hours into a run.
pub fn resolve(
    patterns: &[String],
    base: &Path,
    origin: &Path,
    field: &str,
) -> Result<Vec<PathBuf>> {
    let mut shards = Vec::new();
    for (i, pattern) in patterns.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let names = expand_braces(pattern).map_err(|m| Error::invalid(origin, &field, m))?;
        let mut missing = Vec::new();
        for name in names {
            let path = base.join(&name);
            if path.is_file() {
                shards.push(path);
            } else {
                missing.push(path);
            }
        }
        if !missing.is_empty() {
            let first = missing[0].display();
            return Err(Error::invalid(
                origin,
                field,
                format!(
                    "`{pattern}`: {} shard(s) not found, the first {first}",
                    missing.len()
                ),
            ));
        }
    }
    if shards.is_empty() {
        return Err(Error::invalid(origin, field, "no shards given"));
    }
    Ok(shards)
}

/// Where one member's bytes lie in its shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Lower-case extension: everything after the first dot of the file name.
    pub extension: String,
    pub offset: u64,
    pub size: u64,
}

/// One sample of a shard: its key and its members, not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSample {
    pub shard: Arc<PathBuf>,
    pub key: String,
    pub members: Vec<Member>,
}

/// Why a sample, or the rest of a shard, was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipCause {
    /// No image member, or an empty one.
    MissingImage,
    /// No caption member, or an empty one.
    MissingCaption,
    /// A caption that is not UTF-8 or is blank.
    EmptyCaption,
    /// Image bytes that do not decode.
    CorruptImage,
    /// A member whose bytes run past the end of the file, or a damaged header: the rest
    /// of the shard is skipped.
    TruncatedShard,
    /// A shard that cannot be opened or read.
    UnreadableShard,
    /// An image over the size limits (`data.max_image_pixels`, `data.max_image_bytes`).
    ImageTooLarge,
    /// Decoding the sample panicked (a bug in a decoder, met on this input): the worker
    /// goes on with the next.
    DecoderPanic,
}

impl SkipCause {
    pub const ALL: [SkipCause; 8] = [
        SkipCause::MissingImage,
        SkipCause::MissingCaption,
        SkipCause::EmptyCaption,
        SkipCause::CorruptImage,
        SkipCause::TruncatedShard,
        SkipCause::UnreadableShard,
        SkipCause::ImageTooLarge,
        SkipCause::DecoderPanic,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            SkipCause::MissingImage => "missing or empty image",
            SkipCause::MissingCaption => "missing or empty caption",
            SkipCause::EmptyCaption => "blank or non-UTF-8 caption",
            SkipCause::CorruptImage => "image that does not decode",
            SkipCause::TruncatedShard => "truncated or damaged shard (rest skipped)",
            SkipCause::UnreadableShard => "unreadable shard",
            SkipCause::ImageTooLarge => {
                "image over the size limits (data.max_image_pixels, data.max_image_bytes)"
            }
            SkipCause::DecoderPanic => "sample whose decoding panicked",
        }
    }
}

impl ShardSample {
    pub fn member(&self, extensions: &[&str]) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| extensions.contains(&m.extension.as_str()) && m.size > 0)
    }

    pub fn image(&self) -> Option<&Member> {
        self.member(&IMAGE_EXTENSIONS)
    }

    pub fn caption(&self) -> Option<&Member> {
        self.member(&[CAPTION_EXTENSION])
    }

    /// What every rank can tell from the headers alone: a pair needs a non-empty image
    /// and a non-empty caption.
    pub fn structural_problem(&self) -> Option<SkipCause> {
        if self.image().is_none() {
            Some(SkipCause::MissingImage)
        } else if self.caption().is_none() {
            Some(SkipCause::MissingCaption)
        } else {
            None
        }
    }

    /// Reads one member's bytes.
    pub fn read(&self, member: &Member) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let file = File::open(self.shard.as_path())?;
        let mut bytes = vec![0u8; member.size as usize];
        file.read_exact_at(&mut bytes, member.offset)?;
        Ok(bytes)
    }
}

/// `(key, extension)` of a member path: the key is the path up to the first dot of its
/// file name, as WebDataset splits it.
fn split_member_name(path: &str) -> Option<(String, String)> {
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    let dot = file.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((
        format!("{dir}{}", &file[..dot]),
        file[dot + 1..].to_ascii_lowercase(),
    ))
}

/// What a scan found: the samples in order, and why it stopped early, if it did.
pub struct Scan {
    pub samples: Vec<ShardSample>,
    /// Set when the shard could not be opened or was cut short; `String` says where.
    pub stopped: Option<(SkipCause, String)>,
}

/// Reads `path`'s tar headers and groups consecutive members by key. A member whose
/// bytes run past the end of the file, or a header that does not parse, ends the scan;
/// the samples before it are kept and the one it belongs to is dropped.
pub fn scan(path: &Path) -> Scan {
    let shard = Arc::new(path.to_path_buf());
    let mut samples: Vec<ShardSample> = Vec::new();
    let stop = |samples, cause, message: String| Scan {
        samples,
        stopped: Some((cause, message)),
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return stop(samples, SkipCause::UnreadableShard, e.to_string()),
    };
    let len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return stop(samples, SkipCause::UnreadableShard, e.to_string()),
    };
    let mut archive = tar::Archive::new(file);
    let entries = match archive.entries_with_seek() {
        Ok(e) => e,
        Err(e) => return stop(samples, SkipCause::UnreadableShard, e.to_string()),
    };
    let mut pending: Option<ShardSample> = None;
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                return stop(
                    samples,
                    SkipCause::TruncatedShard,
                    format!("damaged header: {e}"),
                )
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                return stop(
                    samples,
                    SkipCause::TruncatedShard,
                    format!("bad member name: {e}"),
                )
            }
        };
        let (offset, size) = (entry.raw_file_position(), entry.size());
        if offset.saturating_add(size) > len {
            return stop(
                samples,
                SkipCause::TruncatedShard,
                format!("member {name} runs past the end of the file"),
            );
        }
        let Some((key, extension)) = split_member_name(&name) else {
            continue;
        };
        let member = Member {
            extension,
            offset,
            size,
        };
        match &mut pending {
            Some(p) if p.key == key => p.members.push(member),
            _ => {
                if let Some(done) = pending.take() {
                    samples.push(done);
                }
                pending = Some(ShardSample {
                    shard: shard.clone(),
                    key,
                    members: vec![member],
                });
            }
        }
    }
    samples.extend(pending);
    Scan {
        samples,
        stopped: None,
    }
}

/// A sample to write: its key and its members as `(extension, bytes)`.
pub type SampleMembers = (String, Vec<(String, Vec<u8>)>);

/// Writes samples as one tar shard, members in key order: what `mmpipe data synth` and
/// `convert` produce, and what tests build fixtures with.
pub fn write_shard(path: &Path, samples: &[SampleMembers]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tar.partial");
    let file = File::create(&tmp).map_err(io)?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    for (key, members) in samples {
        for (extension, bytes) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("{key}.{extension}"), bytes.as_slice())
                .map_err(io)?;
        }
    }
    builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
