//! The `mmpipe` subcommands. Each turns its arguments into one validated config, runs the
//! library, and prints what the user acts on.

pub mod args;
mod bench;
mod data;
mod eval;
mod plan;
mod report;
mod summary;
mod train;

use std::path::PathBuf;

use mmpipe::model::ClipConfig;

use args::Command;

/// Runs one subcommand.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Plan(a) => plan::run(a),
        Command::Train(a) => train::run(*a),
        Command::Convert(a) => data::convert_checkpoint(a),
        Command::Data(c) => data::run(c),
        Command::Report(a) => report::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => eval::run(a),
    }
}

/// The model config at `path`, or the built-in clip-tiny.
fn load_model(path: Option<&PathBuf>) -> anyhow::Result<ClipConfig> {
    Ok(match path {
        Some(p) => ClipConfig::from_file(p)?,
        None => ClipConfig::default_tiny(),
    })
}
