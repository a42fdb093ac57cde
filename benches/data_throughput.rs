//! Image preprocessing speed on real photos, one thread: mmpipe's transform (decode,
//! centre crop, bicubic resize to 224, normalise) against OpenCLIP's eval transform in
//! Python (torchvision on Pillow) on the same files; then the same with several worker
//! threads through the rank pipeline. Writes `docs/data-throughput.md`.
//!
//! ```text
//! cargo bench --bench data_throughput
//! PYTHON=/path/to/venv/bin/python cargo bench --bench data_throughput   # with Pillow
//! ```
//!
//! The files are the JPEGs (and, separately, the PNGs) of
//! `../shared/data/real-photos/shard-000000.tar`. Not criterion: the Python anchor runs in
//! its own process, and both sides are timed the same way (a loop of whole passes over
//! the files for a few seconds).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mmpipe::data::cache::ImageCache;
use mmpipe::data::order::{GlobalStream, OrderConfig};
use mmpipe::data::pipeline::{
    Assembler, Materialiser, PipelineConfig, RankData, SampleOrder, SampleRef,
};
use mmpipe::data::shards::scan;
use mmpipe::data::transform::{Crop, ImageTransform};
use mmpipe::data::TextTokenizer;
use mmpipe::topology::Tower;

const SIZE: usize = 224;
const SECONDS: f64 = 4.0;

/// Images per second of `transform` over `blobs`, one thread.
fn ours(blobs: &[Vec<u8>]) -> f64 {
    let t = ImageTransform::clip(SIZE, Crop::Centre);
    let (mut done, start) = (0usize, Instant::now());
    loop {
        for b in blobs {
            std::hint::black_box(t.apply(b, 0).expect("decodes"));
            done += 1;
        }
        if start.elapsed().as_secs_f64() >= SECONDS {
            return done as f64 / start.elapsed().as_secs_f64();
        }
    }
}

/// "W×H to W×H": the smallest and largest images by area.
fn dimensions(blobs: &[Vec<u8>]) -> String {
    let mut dims: Vec<(u32, u32)> = blobs
        .iter()
        .filter_map(|b| image::load_from_memory(b).ok())
        .map(|i| (i.width(), i.height()))
        .collect();
    dims.sort_by_key(|(w, h)| w * h);
    match (dims.first(), dims.last()) {
        (Some(a), Some(b)) => format!("{}×{} to {}×{}", a.0, a.1, b.0, b.1),
        _ => "-".into(),
    }
}

/// The Python anchor's images per second and what ran, or why it did not.
fn anchor(files: &[PathBuf]) -> Result<(f64, String), String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg("scripts/bench/pillow_preprocess.py")
        .arg(SECONDS.to_string())
        .arg(SIZE.to_string())
        .args(files)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{python} could not run the anchor (needs Pillow and numpy; torchvision if present): {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|e| e.to_string())?;
    Ok((
        v["images_per_second"].as_f64().unwrap_or(f64::NAN),
        v["implementation"].as_str().unwrap_or("?").to_string(),
    ))
}

/// Images per second of the shard images materialiser, one thread: uncached, then with a
/// cache (its first pass fills it, the later passes read it).
fn cached(shard: &Path) -> (f64, f64, f64) {
    let samples: Vec<SampleRef> = scan(shard)
        .samples
        .into_iter()
        .map(SampleRef::Shard)
        .collect();
    let rate = |m: &Materialiser, passes: Option<usize>| {
        let (start, mut done) = (Instant::now(), 0usize);
        loop {
            for s in &samples {
                let _ =
                    std::hint::black_box(m.item(s, 0).map_err(|c| c.describe()).expect("decodes"));
                done += 1;
            }
            let t = start.elapsed().as_secs_f64();
            if passes.is_some_and(|p| done >= p * samples.len())
                || (passes.is_none() && t >= SECONDS)
            {
                return done as f64 / t;
            }
        }
    };
    let t = ImageTransform::clip(SIZE, Crop::Centre);
    let plain = rate(&Materialiser::ShardImages(t, None), None);
    let file = std::env::temp_dir().join(format!("mmpipe-bench-cache-{}.bin", std::process::id()));
    let cache = Arc::new(ImageCache::create(&file, SIZE, samples.len()).expect("cache file"));
    let m = Materialiser::ShardImages(t, Some(cache));
    let cold = rate(&m, Some(1));
    let warm = rate(&m, None);
    let _ = std::fs::remove_file(file);
    (plain, cold, warm)
}

/// Images per second through one image rank's pipeline with `workers` threads; `bytes`:
/// batches leave as uint8 for the device to normalise (`data.normalise_on`).
fn pipeline(shard: &Path, workers: usize, bytes: bool) -> f64 {
    let cache = None;
    let batch = 32;
    let order = SampleOrder::Shards(Box::new(GlobalStream::new(
        vec![shard.to_path_buf()],
        OrderConfig {
            seed: 0,
            shuffle_buffer: 1,
            resample: false,
        },
    )));
    let data = RankData::spawn(
        order,
        0,
        batch,
        batch,
        Arc::new(Materialiser::ShardImages(
            ImageTransform::clip(SIZE, Crop::Centre),
            cache,
        )),
        Assembler {
            tower: Tower::Image,
            image_shape: (3, SIZE, SIZE),
            norm: ImageTransform::clip(SIZE, Crop::Centre).norm(),
            bytes_to_device: bytes,
            tokenizer: Arc::new(TextTokenizer::clip()),
            context: 77,
            upload: None,
        },
        PipelineConfig {
            workers,
            prefetch: 2,
            seed: 0,
            start_step: 0,
        },
    );
    data.next().expect("first batch");
    let (start, mut done) = (Instant::now(), 0);
    while start.elapsed().as_secs_f64() < SECONDS {
        data.next().expect("batch");
        done += batch;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let shard = PathBuf::from("../shared/data/real-photos/shard-000000.tar");
    let dir = std::env::temp_dir().join(format!("mmpipe-data-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    type Files = (&'static str, Vec<PathBuf>, Vec<Vec<u8>>);
    let mut by_kind: Vec<Files> = vec![("jpg", vec![], vec![]), ("png", vec![], vec![])];
    for s in scan(&shard).samples {
        let m = s.image().expect("an image");
        let bytes = s.read(m).expect("readable");
        for (kind, files, blobs) in by_kind.iter_mut() {
            if m.extension == *kind {
                let path = dir.join(format!("{}.{}", s.key, m.extension));
                std::fs::write(&path, &bytes).expect("write");
                files.push(path);
                blobs.push(bytes.clone());
            }
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut md = format!(
        "# Image preprocessing throughput\n\n\
         Generated by `cargo bench --bench data_throughput` on this machine ({cores} cores). \
         The real photos of `../shared/data/real-photos/shard-000000.tar`, decoded, centre-cropped, \
         resized to {SIZE}×{SIZE} (bicubic) and normalised with CLIP's mean and std, one thread, \
         whole passes over the files for {SECONDS} s. The anchor is OpenCLIP's eval transform in \
         Python on the same files (`scripts/bench/pillow_preprocess.py`).\n\n\
         | files | mmpipe (images/s, 1 thread) | anchor (images/s, 1 thread) | speed-up | anchor |\n\
         |---|---:|---:|---:|---|\n"
    );
    for (kind, files, blobs) in &by_kind {
        let mine = ours(blobs);
        let (theirs, what) = match anchor(files) {
            Ok((r, w)) => (Some(r), w),
            Err(e) => (None, e),
        };
        eprintln!(
            "{kind}: mmpipe {mine:.1}/s, anchor {}",
            theirs.map_or(what.clone(), |t| format!("{t:.1}/s ({what})"))
        );
        let _ = writeln!(
            md,
            "| {} {kind} ({}) | {mine:.1} | {} | {} | {what} |",
            files.len(),
            dimensions(blobs),
            theirs.map_or("—".into(), |t| format!("{t:.1}")),
            theirs.map_or("—".into(), |t| format!("{:.2}×", mine / t)),
        );
    }
    let _ = writeln!(
        md,
        "\nThrough one image rank's pipeline (all 22 photos, batches of 32, prefetch 2):\n\n\
         | worker threads | images/s, normalised as stacked (floats leave) | images/s, bytes leave (normalised on the device) |\n|---:|---:|---:|"
    );
    for workers in [1, 2, 4] {
        let floats = pipeline(&shard, workers, false);
        let bytes = pipeline(&shard, workers, true);
        eprintln!("pipeline, {workers} workers: {floats:.1}/s floats, {bytes:.1}/s bytes");
        let _ = writeln!(md, "| {workers} | {floats:.1} | {bytes:.1} |");
    }
    let (plain, cold, warm) = cached(&shard);
    eprintln!("cache: uncached {plain:.1}/s, first pass {cold:.1}/s, later passes {warm:.1}/s");
    let _ = writeln!(
        md,
        "\nThe preprocessed cache (`data.cache`), one thread, all 22 photos: decoded squares \
         stored as uint8 in a memory-mapped file on the first pass, read back afterwards \
         (the crop and resize to {SIZE} and the normalisation still run):\n\n\
         | | images/s | speed-up |\n|---|---:|---:|\n\
         | uncached | {plain:.1} | 1.00× |\n\
         | cached, first pass (fills the cache) | {cold:.1} | {:.2}× |\n\
         | cached, later passes | {warm:.1} | {:.2}× |",
        cold / plain,
        warm / plain
    );
    std::fs::create_dir_all("docs").expect("docs");
    std::fs::write("docs/data-throughput.md", md).expect("write");
    eprintln!("wrote docs/data-throughput.md");
}
