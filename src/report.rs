//! `mmpipe report`: reads runs' metrics files (JSONL, one line per step and one per
//! evaluation) and draws PNG plots: the training curves, the evaluations, and where each
//! tower's step time goes. Several runs are drawn on the same axes, and their losses
//! compared step by step (the convergence check of one topology against another).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::train::PhaseTimes;

/// One step line of a metrics file.
#[derive(Debug, Clone, PartialEq)]
pub struct StepPoint {
    pub step: usize,
    /// None on a skipped step.
    pub loss: Option<f64>,
    pub lr: f64,
    pub logit_scale: f64,
    pub samples_per_s: f64,
    /// Per phase (in [`PhaseTimes::NAMES`] order), the mean over each tower's ranks, ms.
    pub image_phases_ms: [f64; 7],
    pub text_phases_ms: [f64; 7],
    /// Each tower's gradient norm before clipping (absent in older files: NaN).
    pub image_grad_norm: f64,
    pub text_grad_norm: f64,
}

/// One evaluation line.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    pub step: usize,
    pub zero_shot: Option<f64>,
    pub image_to_text_r1: f64,
    pub text_to_image_r1: f64,
    /// The named sets' headline numbers (`[[eval.sets]]`): a zero-shot set's top-1
    /// (`NAME top-1`), a retrieval set's image→text recall@1 (`NAME R@1`).
    pub sets: Vec<(String, f64)>,
}

/// A run's metrics, as read back.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub path: PathBuf,
    pub steps: Vec<StepPoint>,
    pub evals: Vec<EvalPoint>,
}

/// The metrics file of `run`: the path itself, or `metrics.jsonl` in a run folder.
pub fn metrics_path(run: &Path) -> PathBuf {
    if run.is_dir() {
        run.join("metrics.jsonl")
    } else {
        run.to_path_buf()
    }
}

fn phase_key(name: &str) -> String {
    format!("{}_ms", name.replace([' ', '-'], "_"))
}

impl Run {
    /// The median throughput over the run's steps.
    pub fn median_samples_per_s(&self) -> f64 {
        crate::train::metrics::median(self.steps.iter().map(|s| s.samples_per_s))
    }

    /// Reads a metrics file. A malformed line is an error naming the file and line,
    /// except a cut-off last line (a run killed mid-write), which is skipped.
    pub fn read(run: &Path) -> Result<Run> {
        let path = metrics_path(run);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let name = run
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| n != "metrics.jsonl")
            .or_else(|| {
                run.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| run.display().to_string());
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut steps = Vec::new();
        let mut evals = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let bad = |message: String| Error::Parse {
                path: path.clone(),
                message: format!("line {}: {message}", i + 1),
            };
            let value: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                    tracing::warn!("{}: the last line is cut off; skipped", path.display());
                    continue;
                }
                Err(e) => return Err(bad(e.to_string())),
            };
            let step = value["step"]
                .as_u64()
                .ok_or_else(|| bad("no `step`".into()))? as usize;
            if let Some(eval) = value.get("eval") {
                let recall = |key: &str| eval["recall"][key].as_f64().unwrap_or(f64::NAN);
                let mut sets = Vec::new();
                for (name, set) in eval["sets"].as_object().into_iter().flatten() {
                    if let Some(top1) = set["top1"].as_f64() {
                        sets.push((format!("{name} top-1"), top1));
                    }
                    if let Some(r1) = set["recall"]["image_to_text_r1"].as_f64() {
                        sets.push((format!("{name} R@1"), r1));
                    }
                }
                evals.push(EvalPoint {
                    step,
                    zero_shot: eval["zero_shot"].as_f64(),
                    image_to_text_r1: recall("image_to_text_r1"),
                    text_to_image_r1: recall("text_to_image_r1"),
                    sets,
                });
                continue;
            }
            let number = |key: &str| {
                value[key]
                    .as_f64()
                    .ok_or_else(|| bad(format!("no number `{key}`")))
            };
            let ranks = value["ranks"]
                .as_array()
                .ok_or_else(|| bad("no `ranks`".into()))?;
            let mut phases = [[0.0; 7]; 2];
            let mut counts = [0usize; 2];
            let mut grad_norms = [f64::NAN; 2];
            for rank in ranks {
                // A rank that holds both towers counts on both sides: its phases are
                // both towers' work.
                let label = rank["tower"].as_str().unwrap_or_default();
                for (side, tower) in ["image", "text"].into_iter().enumerate() {
                    if !label.split('+').any(|t| t == tower) {
                        continue;
                    }
                    counts[side] += 1;
                    // Every rank of a group holds the same summed gradients.
                    grad_norms[side] = rank["grad_norm"][tower].as_f64().unwrap_or(f64::NAN);
                    for (p, name) in PhaseTimes::NAMES.iter().enumerate() {
                        phases[side][p] += rank["phases"][phase_key(name)]
                            .as_f64()
                            .ok_or_else(|| bad(format!("a rank has no `{}`", phase_key(name))))?;
                    }
                }
            }
            for (side, count) in counts.iter().enumerate() {
                for p in &mut phases[side] {
                    *p /= (*count).max(1) as f64;
                }
            }
            steps.push(StepPoint {
                step,
                loss: value["loss"].as_f64(),
                lr: number("lr")?,
                logit_scale: number("logit_scale")?,
                samples_per_s: number("samples_per_s")?,
                image_phases_ms: phases[0],
                text_phases_ms: phases[1],
                image_grad_norm: grad_norms[0],
                text_grad_norm: grad_norms[1],
            });
        }
        if steps.is_empty() {
            return Err(Error::File {
                path: path.to_path_buf(),
                message:
                    "no step lines (is this a metrics file written by `mmpipe train --metrics`?)"
                        .into(),
            });
        }
        Ok(Run {
            name,
            path,
            steps,
            evals,
        })
    }

    /// `(step, loss)` of the steps that trained.
    pub fn losses(&self) -> Vec<(usize, f64)> {
        self.steps
            .iter()
            .filter_map(|s| s.loss.map(|l| (s.step, l)))
            .collect()
    }
}

/// How far `other`'s losses stray from `reference`'s at the steps both ran: the largest
/// absolute difference and the step where it occurs, and how many steps were compared.
pub fn loss_gap(reference: &Run, other: &Run) -> Option<(f64, usize, usize)> {
    let reference: std::collections::HashMap<usize, f64> = reference.losses().into_iter().collect();
    let mut worst: Option<(f64, usize)> = None;
    let mut compared = 0;
    for (step, loss) in other.losses() {
        if let Some(r) = reference.get(&step) {
            compared += 1;
            let gap = (loss - r).abs();
            if worst.is_none_or(|(w, _)| gap > w) {
                worst = Some((gap, step));
            }
        }
    }
    worst.map(|(gap, step)| (gap, step, compared))
}

/// The font the plots' text uses: `MMPIPE_FONT`, or a sans-serif TrueType font from the
/// usual Linux places.
fn register_font() -> Result<()> {
    const CANDIDATES: [&str; 5] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    ];
    let chosen = std::env::var_os("MMPIPE_FONT")
        .map(PathBuf::from)
        .into_iter()
        .chain(CANDIDATES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Msg(format!(
                "no TrueType font for the plots' labels: install one (Debian: apt install fonts-dejavu-core) \
                 or point MMPIPE_FONT at a .ttf file; looked in {}",
                CANDIDATES.join(", ")
            ))
        })?;
    let bytes = std::fs::read(&chosen).map_err(|source| Error::Io {
        path: chosen.clone(),
        source,
    })?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        Error::File {
            path: chosen.to_path_buf(),
            message: "not a usable TrueType font".into(),
        }
    })
}

fn plot_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::File {
        path: path.to_path_buf(),
        message: format!("drawing failed: {e:?}"),
    }
}

const SERIES: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const PHASE_COLOURS: [RGBColor; 7] = [
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(188, 189, 34),
];

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// One panel: a line per run of `value` over the steps.
fn line_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    runs: &[Run],
    title: &str,
    value: &dyn Fn(&StepPoint) -> Option<f64>,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let last_step = runs
        .iter()
        .flat_map(|r| r.steps.last().map(|s| s.step))
        .max()
        .unwrap_or(1)
        .max(1);
    let (lo, hi) = range(runs.iter().flat_map(|r| r.steps.iter().filter_map(value)));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..last_step as f64, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, run) in runs.iter().enumerate() {
        let colour = SERIES[i % SERIES.len()];
        let points: Vec<(f64, f64)> = run
            .steps
            .iter()
            .filter_map(|s| value(s).map(|v| (s.step as f64, v)))
            .collect();
        let drawn = chart.draw_series(LineSeries::new(points, colour.stroke_width(2)))?;
        if runs.len() > 1 {
            drawn
                .label(run.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        }
    }
    if runs.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}

/// `training.png`: loss, samples/s, learning rate, logit scale, each tower's gradient
/// norm.
fn draw_training(runs: &[Run], path: &Path) -> Result<()> {
    // Files written before gradient norms were logged get the four panels only.
    let norms = runs
        .iter()
        .flat_map(|r| &r.steps)
        .any(|s| s.image_grad_norm.is_finite() || s.text_grad_norm.is_finite());
    let (size, grid) = if norms {
        ((1400, 1200), (3, 2))
    } else {
        ((1400, 900), (2, 2))
    };
    let root = BitMapBackend::new(path, size).into_drawing_area();
    let err = plot_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let panels = root.split_evenly(grid);
    line_panel(&panels[0], runs, "loss", &|s| s.loss).map_err(&err)?;
    line_panel(&panels[1], runs, "samples/s (slowest rank)", &|s| {
        Some(s.samples_per_s)
    })
    .map_err(&err)?;
    line_panel(&panels[2], runs, "learning rate", &|s| Some(s.lr)).map_err(&err)?;
    line_panel(&panels[3], runs, "logit scale (ln 1/T)", &|s| {
        Some(s.logit_scale)
    })
    .map_err(&err)?;
    if !norms {
        return root.present().map_err(&err);
    }
    let finite = |v: f64| v.is_finite().then_some(v);
    line_panel(&panels[4], runs, "image tower gradient norm", &|s| {
        finite(s.image_grad_norm)
    })
    .map_err(&err)?;
    line_panel(&panels[5], runs, "text tower gradient norm", &|s| {
        finite(s.text_grad_norm)
    })
    .map_err(&err)?;
    root.present().map_err(&err)
}

/// A chart of percentages over the steps the runs trained, its axes drawn.
fn percent_chart<'a, DB: DrawingBackend + 'a>(
    root: &'a DrawingArea<DB, plotters::coord::Shift>,
    runs: &[Run],
    caption: &str,
    path: &Path,
) -> Result<
    ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
> {
    let last_step = runs
        .iter()
        .flat_map(|r| r.steps.last().map(|s| s.step))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(last_step + 1) as f64, 0f64..100f64)
        .map_err(plot_err(path))?;
    chart
        .configure_mesh()
        .x_desc("steps trained")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("%")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(plot_err(path))?;
    Ok(chart)
}

/// `eval.png`: zero-shot accuracy (where measured) and recall@1 both ways, in percent.
fn draw_evals(runs: &[Run], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    let err = plot_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = percent_chart(
        &root,
        runs,
        "held-out evaluation (solid: zero-shot, dashed: image→text R@1, dotted: text→image R@1)",
        path,
    )?;
    for (i, run) in runs.iter().enumerate() {
        let colour = SERIES[i % SERIES.len()];
        let series = |f: &dyn Fn(&EvalPoint) -> Option<f64>| -> Vec<(f64, f64)> {
            run.evals
                .iter()
                .filter_map(|e| {
                    // A run scoring only named sets has no held-out recall (NaN).
                    let v = f(e).filter(|v| v.is_finite())?;
                    Some(((e.step + 1) as f64, 100.0 * v))
                })
                .collect()
        };
        let zero_shot = series(&|e| e.zero_shot);
        if !zero_shot.is_empty() {
            chart
                .draw_series(LineSeries::new(zero_shot.clone(), colour.stroke_width(3)))
                .map_err(&err)?
                .label(format!("{} zero-shot", run.name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(
                    zero_shot
                        .iter()
                        .map(|&p| Circle::new(p, 4, colour.filled())),
                )
                .map_err(&err)?;
        }
        let i2t = series(&|e| Some(e.image_to_text_r1));
        chart
            .draw_series(DashedLineSeries::new(i2t, 8, 5, colour.stroke_width(2)))
            .map_err(&err)?
            .label(format!("{} recall@1", run.name))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour));
        let t2i = series(&|e| Some(e.text_to_image_r1));
        chart
            .draw_series(DashedLineSeries::new(t2i, 2, 4, colour.stroke_width(2)))
            .map_err(&err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)
}

/// `phases.png`: each tower's step time split by phase (stacked, ms, mean over the
/// tower's ranks), for one run.
fn draw_phases(run: &Run, path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    let err = plot_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let panels = root.split_evenly((1, 2));
    let last_step = run.steps.last().map_or(1, |s| s.step).max(1) as f64;
    for (panel, (tower, pick)) in panels.iter().zip([
        (
            "image",
            (|s: &StepPoint| s.image_phases_ms) as fn(&StepPoint) -> [f64; 7],
        ),
        ("text", |s: &StepPoint| s.text_phases_ms),
    ]) {
        // Cumulative sums: phase p's band lies between the sums of phases < p and <= p.
        let stacked: Vec<(usize, [f64; 7])> = run
            .steps
            .iter()
            .map(|s| {
                let mut acc = pick(s);
                for p in 1..7 {
                    acc[p] += acc[p - 1];
                }
                (s.step, acc)
            })
            .collect();
        // A few slow steps (the first, an evaluation's) would flatten the rest.
        let mut totals: Vec<f64> = stacked.iter().map(|(_, a)| a[6]).collect();
        totals.sort_by(f64::total_cmp);
        let top = totals
            .get(totals.len() * 98 / 100)
            .copied()
            .unwrap_or(1.0)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} tower: ms per step by phase ({})", tower, run.name),
                ("sans-serif", 18),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..last_step, 0f64..top)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("ms")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(&err)?;
        // Top band first, so each lower band paints over the area below its upper edge.
        for p in (0..7).rev() {
            let colour = PHASE_COLOURS[p];
            chart
                .draw_series(AreaSeries::new(
                    stacked.iter().map(|(s, acc)| (*s as f64, acc[p].min(top))),
                    0.0,
                    colour.mix(0.85).filled(),
                ))
                .map_err(&err)?
                .label(PhaseTimes::NAMES[p])
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(&err)?;
    }
    root.present().map_err(&err)
}

/// A markdown table of the runs: the loss at the end (last step, and the mean of the last
/// tenth of the steps, which evens out batch-to-batch noise), the last evaluation, median
/// throughput, and the largest loss difference from the first run.
pub fn markdown_table(runs: &[Run]) -> String {
    let mut out = String::from(
        "| run | steps | last loss | mean loss, last 10% | zero-shot | R@1 image→text / text→image | samples/s (median) | max \\|Δ loss\\| vs first |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, run) in runs.iter().enumerate() {
        let losses = run.losses();
        let tail = &losses[losses.len() - (losses.len() / 10).max(1).min(losses.len())..];
        let tail_mean = tail.iter().map(|l| l.1).sum::<f64>() / tail.len().max(1) as f64;
        let eval = run.evals.last();
        let percent =
            |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.1}%", 100.0 * v));
        let gap = if i == 0 {
            "–".to_string()
        } else {
            loss_gap(&runs[0], run).map_or("–".to_string(), |(g, _, _)| format!("{g:.1e}"))
        };
        out.push_str(&format!(
            "| {} | {} | {:.4} | {:.4} | {} | {} / {} | {:.0} | {} |\n",
            run.name,
            run.steps.len(),
            losses.last().map_or(f64::NAN, |l| l.1),
            tail_mean,
            percent(eval.and_then(|e| e.zero_shot)),
            percent(eval.map(|e| e.image_to_text_r1)),
            percent(eval.map(|e| e.text_to_image_r1)),
            run.median_samples_per_s(),
            gap,
        ));
    }
    out
}

/// What `mmpipe report` wrote and measured.
pub struct Report {
    pub plots: Vec<PathBuf>,
    pub runs: Vec<Run>,
}

/// `sets.png`: each named set's headline number (zero-shot top-1, retrieval R@1) per run,
/// in percent, one line per (run, set).
fn draw_sets(runs: &[Run], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    let err = plot_err(path);
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = percent_chart(
        &root,
        runs,
        "evaluation sets (zero-shot top-1, retrieval image→text R@1)",
        path,
    )?;
    let mut colour_at = 0;
    for run in runs {
        let mut names: Vec<&String> = run
            .evals
            .iter()
            .flat_map(|e| e.sets.iter().map(|(n, _)| n))
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let colour = SERIES[colour_at % SERIES.len()];
            colour_at += 1;
            let points: Vec<(f64, f64)> = run
                .evals
                .iter()
                .filter_map(|e| {
                    let v = e.sets.iter().find(|(n, _)| n == name)?.1;
                    Some(((e.step + 1) as f64, 100.0 * v))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(3)))
                .map_err(&err)?
                .label(format!("{} {name}", run.name))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(3))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(&err)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(&err)?;
    root.present().map_err(&err)
}

/// Reads the runs and draws `training.png`, `eval.png` (when a run evaluated),
/// `sets.png` (when it scored named sets) and `phases.png` (the first run) into `out`.
pub fn write(runs: &[PathBuf], out: &Path) -> Result<Report> {
    let runs: Vec<Run> = runs.iter().map(|r| Run::read(r)).collect::<Result<_>>()?;
    register_font()?;
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut plots = vec![out.join("training.png")];
    draw_training(&runs, &plots[0])?;
    if runs.iter().any(|r| !r.evals.is_empty()) {
        plots.push(out.join("eval.png"));
        draw_evals(&runs, plots.last().expect("just pushed"))?;
    }
    if runs
        .iter()
        .flat_map(|r| &r.evals)
        .any(|e| !e.sets.is_empty())
    {
        plots.push(out.join("sets.png"));
        draw_sets(&runs, plots.last().expect("just pushed"))?;
    }
    plots.push(out.join("phases.png"));
    draw_phases(&runs[0], plots.last().expect("just pushed"))?;
    Ok(Report { plots, runs })
}
