//! mmpipe's side of the bf16-against-f32 comparison with OpenCLIP's own autocast
//! (`scripts/reference/openclip_bf16.py`, docs/precision.md):
//!
//!   cargo run --release --example precision_reference -- OUT_DIR
//!
//! On the test suite's tiny model (tests/fixtures/test-model.toml, seed 7) and the synthetic
//! batch of step 0 (12 pairs), one 1×1 step in fp32 and one in bf16. Writes to OUT_DIR:
//! `weights.safetensors` (the initial weights, OpenCLIP's names), `batch.safetensors`
//! (`images` f32, `tokens` and `eot` i64), and `grads-fp32.safetensors`,
//! `grads-bf16.safetensors` (every parameter's gradient, f32, and `loss`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
use mmpipe::data::{Stream, SyntheticSource};
use mmpipe::model::{checkpoint, ClipConfig, TowerInput};
use mmpipe::plan::Precision;
use mmpipe::topology::Topology;
use mmpipe::train::{RankTrainer, TrainConfig};

/// The test suite's model; OpenCLIP's CLIP of the same config is built by the Python side.
const MODEL: &str = include_str!("../tests/fixtures/test-model.toml");

const SEED: u64 = 7;
const BATCH: usize = 12;

fn main() -> mmpipe::error::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/precision-reference".into()),
    );
    std::fs::create_dir_all(&out).map_err(|source| mmpipe::error::Error::Io {
        path: out.clone(),
        source,
    })?;
    let model = ClipConfig::from_str(
        MODEL,
        std::path::Path::new("tests/fixtures/test-model.toml"),
    )?;
    let topology = Topology::from_str(
        "device = \"cpu\"\n[[nodes]]\nname = \"host\"\ndevices = 2\n[groups]\nimage = [\"host:0\"]\ntext = [\"host:1\"]\n",
        std::path::Path::new("cpu-1x1.toml"),
    )?;
    let source = SyntheticSource::new(SEED, &model)?;
    let indices: Vec<u64> = (0..BATCH as u64).collect();
    let mut batch = HashMap::new();
    for tower in [
        mmpipe::topology::Tower::Image,
        mmpipe::topology::Tower::Text,
    ] {
        match source
            .tower_input(tower, Stream::Train, &indices, &Device::Cpu)?
            .normalised()?
        {
            TowerInput::Images(t) => {
                batch.insert("images".to_string(), t.to_dtype(DType::F32)?);
            }
            TowerInput::Captions { tokens, eot, .. } => {
                batch.insert("tokens".to_string(), tokens.to_dtype(DType::I64)?);
                batch.insert("eot".to_string(), eot.to_dtype(DType::I64)?);
            }
            TowerInput::Pixels { .. } => unreachable!("normalised above"),
        }
    }
    checkpoint::write_tensors(&batch, &out.join("batch.safetensors"))?;
    for precision in [Precision::Fp32, Precision::Bf16] {
        let cfg = TrainConfig {
            seed: SEED,
            global_batch: BATCH,
            precision: Some(precision),
            progress: false,
            ..TrainConfig::default()
        };
        let parts = run_ranks(&topology, DEFAULT_TIMEOUT, |rank, comms| {
            let trainer =
                RankTrainer::new(&topology, rank, &model, &cfg, DType::F32, &Device::Cpu)?;
            // A split: every rank holds one tower.
            let tower = &trainer.towers[0];
            let weights: Vec<(String, Tensor)> = tower
                .params()
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_tensor().copy().expect("copy")))
                .collect();
            let input = source.tower_input(tower.tower, Stream::Train, &indices, &Device::Cpu)?;
            let g = trainer.compute_grads(&comms, std::slice::from_ref(&input), None)?;
            let mut grads: Vec<(String, Tensor)> = tower
                .trainable()
                .names()
                .into_iter()
                .map(str::to_string)
                .zip(g.grads.concat())
                .collect();
            grads.push(("loss".into(), Tensor::new(&[g.loss as f32], &Device::Cpu)?));
            Ok((weights, grads))
        })?;
        let mut weights = HashMap::new();
        let mut grads = HashMap::new();
        for (w, g) in parts {
            weights.extend(w);
            grads.extend(g);
        }
        let name = match precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        };
        if precision == Precision::Fp32 {
            checkpoint::write_tensors(&weights, &out.join("weights.safetensors"))?;
        }
        checkpoint::write_tensors(&grads, &out.join(format!("grads-{name}.safetensors")))?;
    }
    println!("wrote {}", out.display());
    Ok(())
}
