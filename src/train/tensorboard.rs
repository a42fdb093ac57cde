//! TensorBoard event files beside the metrics JSONL (`--tensorboard DIR`): every number of
//! every metrics line as a scalar, under its path in the line (`loss`, `lr`,
//! `rank0/phases/forward_ms`, `rank1/grad_norm/text`, `eval/recall/image_to_text_r1`…;
//! a list of ranks is keyed by rank), at the line's step.
//!
//! The format is TensorFlow's: a file of records (a little-endian u64 length, its masked
//! CRC-32C, the bytes, their masked CRC-32C), each an `Event` protocol buffer: the first
//! names the file version, the others carry a `Summary` of `simple_value`s. Four fields of
//! two messages are all a scalar needs, so they are encoded here; the CRC is the `crc32c`
//! crate's.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl EventWriter {
    /// A new event file in `dir` (created if need be), named as TensorBoard looks for
    /// them (`events.out.tfevents.TIME.HOST`), its version record written.
    pub fn create(dir: &Path) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.mmpipe",
            now.as_secs(),
            std::process::id()
        ));
        let file = std::fs::File::create(&path).map_err(io(&path))?;
        let mut writer = EventWriter {
            path,
            out: std::io::BufWriter::new(file),
        };
        let mut event = event_header(now.as_secs_f64(), 0);
        field_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` with every `(tag, value)` as a scalar.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            field_bytes(&mut v, 1, tag.as_bytes());
            // simple_value: field 2, a 32-bit float.
            v.push(2 << 3 | 5);
            v.extend_from_slice(&value.to_le_bytes());
            field_bytes(&mut summary, 1, &v);
        }
        let mut event = event_header(wall, step);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)?;
        self.out.flush().map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Every number of a metrics line, at its `step`.
    pub fn line(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = line.get("step").and_then(serde_json::Value::as_i64) else {
            return Ok(());
        };
        let mut values = Vec::new();
        flatten("", line, &mut values);
        self.scalars(step, &values)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut bytes = Vec::with_capacity(data.len() + 16);
        bytes.extend_from_slice(&len);
        bytes.extend_from_slice(&masked_crc(&len).to_le_bytes());
        bytes.extend_from_slice(data);
        bytes.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.out.write_all(&bytes).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })
    }
}

/// TensorFlow's masked CRC-32C of a record's parts.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// An `Event` with `wall_time` (field 1, a double) and `step` (field 2, a varint).
fn event_header(wall: f64, step: i64) -> Vec<u8> {
    let mut e = vec![1 << 3 | 1];
    e.extend_from_slice(&wall.to_le_bytes());
    e.push(2 << 3);
    varint(&mut e, step as u64);
    e
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2): a string or a message.
fn field_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Every number under `value` as `(path, value)`, the path's parts joined by `/`; arrays
/// of objects with a `rank` are keyed `rankN`, other arrays by index; the top-level
/// `step` is the events' step, not a scalar.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, f32)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}/{key}")
        }
    };
    match value {
        serde_json::Value::Number(n) => {
            if let Some(v) = n.as_f64() {
                out.push((prefix.to_string(), v as f32));
            }
        }
        serde_json::Value::Object(map) => {
            // A rank's own number names its entry already (`rankN/…`).
            let keyed_by_rank = prefix
                .rsplit('/')
                .next()
                .is_some_and(|p| p.starts_with("rank"));
            for (key, v) in map {
                if (prefix.is_empty() && key == "step") || (keyed_by_rank && key == "rank") {
                    continue;
                }
                flatten(&join(key), v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                // `ranks: [{rank: 0, …}]` reads `rank0/…`: the rank in place of the list.
                let path = match v.get("rank").and_then(serde_json::Value::as_u64) {
                    Some(r) => match prefix.rsplit_once('/') {
                        Some((parent, _)) => format!("{parent}/rank{r}"),
                        None => format!("rank{r}"),
                    },
                    None => join(&i.to_string()),
                };
                flatten(&path, v, out);
            }
        }
        _ => {}
    }
}
