//! The loss's forward + backward against the global batch: wall time and peak extra memory
//! per rank, untiled (one `b × B` block, as OpenCLIP's local loss) against tiled
//! (`b × tile`), on a 1×1 and a 4×4 split. Writes `docs/loss-scaling.md` and
//! `docs/loss-scaling.svg`.
//!
//! ```text
//! cargo bench --bench loss_scaling                       # 4K .. 256K (about 1 h on 2 cores)
//! LOSS_SCALING_MAX=65536 LOSS_SCALING_WORLD_MAX=16384 cargo bench --bench loss_scaling
//! # one more point into the existing docs/loss-scaling.{csv,md,svg}:
//! LOSS_SCALING_MIN=262144 LOSS_SCALING_APPEND=1 cargo bench --bench loss_scaling
//! ```
//!
//! Memory is counted by this binary's allocator per thread (each rank is a thread), from
//! the moment the rank calls the loss to its return, so it is the loss's own memory: the
//! inputs (own rows, the other side's gathered features) are not in it, the output
//! gradient is. Not criterion: each point is one run of seconds to minutes, and peak
//! memory needs an allocator of our own.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::fmt::Write as _;
use std::time::Instant;

use candle_core::{Device, Tensor};
use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
use mmpipe::loss::{global_loss, LossConfig, LossScalars, Side, TileSize, TILE_BLOCKS};
use mmpipe::topology::layout::{split_len, split_offset, FeatureLayout};
use mmpipe::topology::{Topology, Tower};
use rand::{Rng, SeedableRng};

/// Counts live heap bytes per thread, and their peak, on top of mimalloc.
struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    // `try_with`: allocations during thread teardown find the counters gone.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as i64);
        mimalloc::MiMalloc.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as i64));
        mimalloc::MiMalloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as i64 - layout.size() as i64);
        mimalloc::MiMalloc.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DIM: usize = 256;
/// Skip the untiled loss where its blocks alone would take more than this, all ranks
/// together: the table gives the predicted size instead.
const MEMORY_LIMIT: f64 = 12.0 * (1u64 << 30) as f64;

fn topology(image: usize, text: usize) -> Topology {
    let text = format!(
        "name = \"cpu-{image}x{text}\"\ndevice = \"cpu\"\n[[nodes]]\nname = \"host\"\ndevices = {}\n\
         [groups]\nimage = [\"host:0-{}\"]\ntext = [\"host:{}-{}\"]\n",
        image + text,
        image - 1,
        image,
        image + text - 1
    );
    Topology::from_str(&text, std::path::Path::new("bench.toml")).expect("valid topology")
}

/// Row-normalised random features from a seeded RNG.
fn features(batch: usize, seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..batch * DIM)
        .map(|_| rng.random::<f32>() - 0.5)
        .collect();
    let x = Tensor::from_vec(v, (batch, DIM), &Device::Cpu).unwrap();
    let norm = x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    x.broadcast_div(&norm).unwrap()
}

struct Point {
    batch: usize,
    split: (usize, usize),
    /// Only the image rank of the split ran, with every core (the text rank's work is its
    /// mirror image: the same `b × B` block, transposed).
    alone: bool,
    tiled: bool,
    tile: usize,
    /// Slowest rank's loss call, seconds; None when skipped.
    seconds: Option<f64>,
    /// Largest rank's peak extra bytes (measured, or predicted when skipped).
    peak_bytes: f64,
    measured: bool,
}

/// The image rank of a 1×1 split by itself: one-rank world and group.
fn run_image_rank_alone(batch: usize, x: &Tensor, y: &Tensor) -> Point {
    let cfg = LossConfig::default();
    let topology = topology(1, 1);
    let layout = FeatureLayout::new(&topology, batch);
    let one = |name: &str| mmpipe::comm::thread::group(name, 1, DEFAULT_TIMEOUT).remove(0);
    let comms = mmpipe::comm::RankComms {
        world: Box::new(one("world")),
        groups: vec![mmpipe::comm::GroupComms {
            tower: Tower::Image,
            comm: Box::new(one("image")),
            stats: std::sync::Arc::new(one("image-stats")),
        }],
    };
    let scalars = LossScalars {
        logit_scale: 2.66,
        logit_bias: 0.0,
    };
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let started = Instant::now();
    let side = Side {
        local: x,
        other: y,
        offset: 0,
    };
    let out = global_loss(&comms, &cfg, &layout, &[side], scalars).expect("loss ran");
    let seconds = started.elapsed().as_secs_f64();
    let peak = PEAK.with(Cell::get) - base;
    drop(out);
    Point {
        batch,
        split: (1, 1),
        alone: true,
        tiled: true,
        tile: cfg.tile_columns(batch, batch, 4),
        seconds: Some(seconds),
        peak_bytes: peak as f64,
        measured: true,
    }
}

fn run(batch: usize, (image, text): (usize, usize), tiled: bool, x: &Tensor, y: &Tensor) -> Point {
    let topology = topology(image, text);
    let cfg = LossConfig {
        tile: if tiled {
            TileSize::Auto
        } else {
            TileSize::Untiled
        },
        ..LossConfig::default()
    };
    let rows = batch / image.min(text);
    let tile = cfg.tile_columns(rows, batch, 4);
    let blocks = (TILE_BLOCKS * rows * tile * 4) as f64;
    if !tiled && blocks * (image + text) as f64 > MEMORY_LIMIT {
        return Point {
            batch,
            split: (image, text),
            alone: false,
            tiled,
            tile,
            seconds: None,
            peak_bytes: blocks + (rows * DIM * 4) as f64,
            measured: false,
        };
    }
    let layout = FeatureLayout::new(&topology, batch);
    let scalars = LossScalars {
        logit_scale: 2.66,
        logit_bias: 0.0,
    };
    let per_rank = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
        // A split: every rank holds one tower.
        let r = topology.ranks[rank].roles[0];
        let size = topology.group_size(r.tower);
        let offset = split_offset(batch, size, r.group_rank);
        let len = split_len(batch, size, r.group_rank);
        let (own, other) = match r.tower {
            Tower::Image => (x, y),
            Tower::Text => (y, x),
        };
        let local = own.narrow(0, offset, len)?;
        comms.world.barrier()?;
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let started = Instant::now();
        let side = Side {
            local: &local,
            other,
            offset,
        };
        let out = global_loss(&comms, &cfg, &layout, &[side], scalars)?;
        let seconds = started.elapsed().as_secs_f64();
        let peak = PEAK.with(Cell::get) - base;
        drop(out);
        Ok((seconds, peak))
    })
    .expect("loss ran");
    Point {
        batch,
        split: (image, text),
        alone: false,
        tiled,
        tile,
        seconds: Some(per_rank.iter().map(|p| p.0).fold(0.0, f64::max)),
        peak_bytes: per_rank.iter().map(|p| p.1).max().unwrap_or(0) as f64,
        measured: true,
    }
}

/// One line per point: what `LOSS_SCALING_APPEND=1` reads back, so a long point can be
/// measured in a run of its own and merged.
fn to_csv(points: &[Point]) -> String {
    let mut s = String::from("batch,image,text,alone,tiled,tile,seconds,peak_bytes,measured\n");
    for p in points {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{}",
            p.batch,
            p.split.0,
            p.split.1,
            p.alone,
            p.tiled,
            p.tile,
            p.seconds.map_or(String::new(), |t| t.to_string()),
            p.peak_bytes,
            p.measured
        );
    }
    s
}

fn from_csv(text: &str) -> Vec<Point> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            Some(Point {
                batch: f.first()?.parse().ok()?,
                split: (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?),
                alone: f.get(3)?.parse().ok()?,
                tiled: f.get(4)?.parse().ok()?,
                tile: f.get(5)?.parse().ok()?,
                seconds: f.get(6)?.parse().ok(),
                peak_bytes: f.get(7)?.parse().ok()?,
                measured: f.get(8)?.parse().ok()?,
            })
        })
        .collect()
}

fn mib(b: f64) -> f64 {
    b / (1u64 << 20) as f64
}

fn table(points: &[Point]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| global batch | split | loss | tile (columns) | time (s) | peak extra memory per rank (MiB) |"
    );
    let _ = writeln!(s, "|---:|:---:|:---|---:|---:|---:|");
    for p in points {
        let _ = writeln!(
            s,
            "| {} | {}×{}{} | {} | {} | {} | {}{:.0} |",
            p.batch,
            p.split.0,
            p.split.1,
            if p.alone {
                " (image rank alone, all cores)"
            } else {
                ""
            },
            if p.tiled { "tiled" } else { "untiled" },
            p.tile,
            p.seconds.map_or("—".into(), |t| format!("{t:.2}")),
            if p.measured { "" } else { "predicted " },
            mib(p.peak_bytes)
        );
    }
    s
}

/// Log-log plot of peak memory per rank against the global batch, one line per series.
fn plot(points: &[Point]) -> String {
    let (w, h, left, bottom, top, right) = (720.0, 440.0, 80.0, 50.0, 30.0, 200.0);
    let batches: Vec<f64> = points.iter().map(|p| p.batch as f64).collect();
    let mems: Vec<f64> = points.iter().map(|p| mib(p.peak_bytes).max(1.0)).collect();
    let (bx0, bx1) = (
        batches.iter().copied().fold(f64::INFINITY, f64::min).log2(),
        batches.iter().copied().fold(0.0, f64::max).log2(),
    );
    let (my0, my1) = (
        mems.iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .log2()
            .floor(),
        mems.iter().copied().fold(0.0, f64::max).log2().ceil(),
    );
    let px = |b: f64| left + (b.log2() - bx0) / (bx1 - bx0).max(1e-9) * (w - left - right);
    let py = |m: f64| {
        h - bottom - (m.max(1.0).log2() - my0) / (my1 - my0).max(1e-9) * (h - top - bottom)
    };
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">Loss forward + backward, D = {DIM}: peak extra memory per rank against global batch</text>\n"
    );
    // Axes, ticks at each batch and each power of 4 MiB.
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/><line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{0}\" stroke=\"black\"/>",
        h - bottom,
        w - right
    );
    let mut seen = Vec::new();
    for &b in &batches {
        if seen.contains(&(b as usize)) {
            continue;
        }
        seen.push(b as usize);
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}K</text>",
            px(b),
            h - bottom + 16.0,
            b as usize / 1024
        );
    }
    let mut e = my0 as i32;
    while e as f64 <= my1 {
        let m = 2f64.powi(e);
        let label = if m >= 1024.0 {
            format!("{} GiB", m / 1024.0)
        } else {
            format!("{m} MiB")
        };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text><line x1=\"{left}\" y1=\"{1:.1}\" x2=\"{2}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>",
            left - 6.0,
            py(m) + 4.0,
            w - right
        );
        e += 2;
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">global batch B</text>",
        (left + w - right) / 2.0,
        h - 12.0
    );
    let series = [
        ((1, 1), false, "#d62728", "untiled, 1×1"),
        ((4, 4), false, "#ff9896", "untiled, 4×4"),
        ((1, 1), true, "#1f77b4", "tiled, 1×1"),
        ((4, 4), true, "#aec7e8", "tiled, 4×4"),
    ];
    for (i, (split, tiled, colour, name)) in series.iter().enumerate() {
        let pts: Vec<&Point> = points
            .iter()
            .filter(|p| p.split == *split && p.tiled == *tiled)
            .collect();
        if pts.is_empty() {
            continue;
        }
        for segment in pts.windows(2) {
            let dashed = if segment[1].measured {
                ""
            } else {
                " stroke-dasharray=\"5,4\""
            };
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"{dashed}/>",
                px(segment[0].batch as f64),
                py(mib(segment[0].peak_bytes)),
                px(segment[1].batch as f64),
                py(mib(segment[1].peak_bytes))
            );
        }
        for p in &pts {
            let fill = if p.measured { *colour } else { "white" };
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{fill}\" stroke=\"{colour}\"/>",
                px(p.batch as f64),
                py(mib(p.peak_bytes))
            );
        }
        let ly = top + 20.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{0}\" y1=\"{ly}\" x2=\"{1}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{2}\" y=\"{3}\">{name}</text>",
            w - right + 15.0,
            w - right + 40.0,
            w - right + 46.0,
            ly + 4.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" fill=\"#555\">open, dashed: predicted</text>",
        w - right + 15.0,
        top + 110.0
    );
    s.push_str("</svg>\n");
    s
}

fn main() {
    // `cargo bench` passes `--bench`; this binary takes its settings from the environment.
    let max: usize = std::env::var("LOSS_SCALING_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(262_144);
    let several_max: usize = std::env::var("LOSS_SCALING_WORLD_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(65_536);
    let out = std::path::PathBuf::from(
        std::env::var("LOSS_SCALING_OUT").unwrap_or_else(|_| "docs".into()),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // rayon's pool takes its size from this at first use: all cores, shared by the ranks.
    std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
    // One throw-away run, so the first point does not pay for warming up.
    let (x, y) = (features(4096, 1), features(4096, 2));
    run(4096, (1, 1), true, &x, &y);
    let min: usize = std::env::var("LOSS_SCALING_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let csv = out.join("loss-scaling.csv");
    let mut points = if std::env::var("LOSS_SCALING_APPEND").is_ok_and(|v| v == "1") {
        from_csv(&std::fs::read_to_string(&csv).unwrap_or_default())
            .into_iter()
            .filter(|p| p.batch < min || p.batch > max)
            .collect()
    } else {
        Vec::new()
    };
    let mut batch = min;
    while batch <= max {
        let (x, y) = (features(batch, 1), features(batch, 2));
        if batch > several_max {
            // Past here the whole world would take hours on a laptop-sized CPU: measure the
            // one rank whose memory is in question, with the machine to itself.
            std::env::set_var("RAYON_NUM_THREADS", cores.to_string());
            let p = run_image_rank_alone(batch, &x, &y);
            eprintln!(
                "B {batch:>7} image rank of 1x1 alone, tile {:>7}: {:.2} s, {:.0} MiB",
                p.tile,
                p.seconds.unwrap_or(f64::NAN),
                mib(p.peak_bytes)
            );
            points.push(p);
            for split in [(1, 1), (4, 4)] {
                let p = run(batch, split, false, &x, &y);
                points.push(p);
            }
            batch *= 2;
            continue;
        }
        for split in [(1, 1), (4, 4)] {
            for tiled in [false, true] {
                // Each rank gets its share of the cores for its matrix products.
                std::env::set_var(
                    "RAYON_NUM_THREADS",
                    (cores / (split.0 + split.1)).max(1).to_string(),
                );
                let p = run(batch, split, tiled, &x, &y);
                eprintln!(
                    "B {batch:>7} {}x{} {:<8} tile {:>7}: {} s, {:.0} MiB{}",
                    split.0,
                    split.1,
                    if tiled { "tiled" } else { "untiled" },
                    p.tile,
                    p.seconds.map_or("-".into(), |t| format!("{t:.2}")),
                    mib(p.peak_bytes),
                    if p.measured { "" } else { " (predicted)" }
                );
                points.push(p);
            }
        }
        batch *= 2;
    }
    points.sort_by_key(|p| (p.split, p.tiled, p.batch));
    std::fs::create_dir_all(&out).expect("output directory");
    let md = format!(
        "# Loss memory and time against the global batch\n\n\
         Generated by `cargo bench --bench loss_scaling` on this machine ({cores} cores, CPU, f32, \
         D = {DIM}, CLIP loss, `lse` exchange, tile `auto` = 256 MiB budget). Time: the slowest \
         rank's loss forward + backward, including its collectives. Memory: the largest peak of \
         heap bytes a rank allocates inside the loss (inputs excluded, output gradient included), \
         counted per thread by the bench's allocator. Untiled runs whose blocks would take more \
         than {:.0} GiB on all ranks together are predicted from `4 · b · B` floats, not run.\n\n{}",
        MEMORY_LIMIT / (1u64 << 30) as f64,
        table(&points)
    );
    std::fs::write(out.join("loss-scaling.md"), md).expect("write table");
    std::fs::write(out.join("loss-scaling.svg"), plot(&points)).expect("write plot");
    std::fs::write(&csv, to_csv(&points)).expect("write points");
    eprintln!(
        "wrote {0}/loss-scaling.md and {0}/loss-scaling.svg",
        out.display()
    );
}
