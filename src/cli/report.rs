//! `mmpipe report`: plots and a table of runs' metrics.

use std::path::PathBuf;

use anyhow::Context;

use super::args::ReportArgs;

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let runs = &args.runs;
    let out = args.out.unwrap_or_else(|| {
        let first = &runs[0];
        if first.is_dir() {
            first.clone()
        } else {
            first
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from)
        }
    });
    let report = mmpipe::report::write(runs, &out)?;
    for run in &report.runs {
        let losses = run.losses();
        let eval = run.evals.last().map_or(String::new(), |e| {
            let zero_shot = e
                .zero_shot
                .map_or(String::new(), |z| format!("zero-shot {:.1}%, ", 100.0 * z));
            format!(
                "; last evaluation (after step {}): {zero_shot}recall@1 {:.1}/{:.1}%",
                e.step + 1,
                100.0 * e.image_to_text_r1,
                100.0 * e.text_to_image_r1
            )
        });
        println!(
            "{}: {} steps, loss {:.4} -> {:.4}, median {:.0} samples/s{eval}",
            run.name,
            run.steps.len(),
            losses.first().map_or(f64::NAN, |l| l.1),
            losses.last().map_or(f64::NAN, |l| l.1),
            run.median_samples_per_s(),
        );
    }
    for other in report.runs.iter().skip(1) {
        if let Some((gap, step, compared)) = mmpipe::report::loss_gap(&report.runs[0], other) {
            println!(
                "loss of {} vs {}: largest difference {gap:.3e} (step {step}) over {compared} common steps",
                other.name, report.runs[0].name
            );
        }
    }
    for plot in &report.plots {
        println!("wrote {}", plot.display());
    }
    if let Some(path) = args.table {
        std::fs::write(&path, mmpipe::report::markdown_table(&report.runs))
            .with_context(|| path.display().to_string())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
