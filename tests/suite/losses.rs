//! The global losses at the feature level: on every topology, for CLIP and SigLIP under
//! both exchange schemes, tiled or not, each rank's feature gradient, the loss and the
//! scalars' gradients equal single-device autograd on the whole batch.

use candle_core::{DType, Device, Tensor, Var};
use mmpipe::comm::thread::{run_ranks, DEFAULT_TIMEOUT};
use mmpipe::loss::{
    clip_loss_reference, global_loss, siglip_loss_reference, Exchange, LossConfig, LossKind,
    LossScalars, Side, TileSize,
};
use mmpipe::topology::layout::{split_len, split_offset, FeatureLayout};
use mmpipe::topology::{Topology, Tower};

use super::common::{cpu_topology, fixed_values, scalar, worst_violation, Relative};

const BATCH: usize = 12;
const DIM: usize = 8;
const TOPOLOGIES: [(usize, usize); 5] = [(1, 1), (2, 1), (1, 3), (2, 2), (3, 2)];

/// Row-normalised `[B, D]` features, fixed (candle's CPU RNG cannot be seeded).
fn features(phase: f64, dtype: DType) -> Tensor {
    let x = fixed_values(&[BATCH, DIM], phase);
    let norm = x.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
    x.broadcast_div(&norm).unwrap().to_dtype(dtype).unwrap()
}

struct Expected {
    loss: f64,
    image: Tensor,
    text: Tensor,
    logit_scale: f64,
    logit_bias: f64,
}

/// Single-device autograd on the whole batch.
fn reference(kind: LossKind, scalars: LossScalars, dtype: DType) -> Expected {
    let x = Var::from_tensor(&features(0.3, dtype)).unwrap();
    let y = Var::from_tensor(&features(1.7, dtype)).unwrap();
    let t = Var::from_tensor(
        &Tensor::new(scalars.logit_scale, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let bias = Var::from_tensor(
        &Tensor::new(scalars.logit_bias, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let loss = match kind {
        LossKind::Clip => clip_loss_reference(&x, &y, &t).unwrap(),
        LossKind::Siglip => siglip_loss_reference(&x, &y, &t, &bias).unwrap(),
    };
    let g = loss.backward().unwrap();
    Expected {
        loss: scalar(&loss),
        image: g.get(&x).unwrap().clone(),
        text: g.get(&y).unwrap().clone(),
        logit_scale: scalar(g.get(&t).unwrap()),
        logit_bias: g.get(&bias).map_or(0.0, scalar),
    }
}

/// Every rank's (tower, offset, loss, feature gradient, ∂t, ∂β), one entry per tower it
/// holds.
fn split(
    topology: &Topology,
    cfg: LossConfig,
    scalars: LossScalars,
    dtype: DType,
) -> Vec<(Tower, usize, f64, Tensor, f64, f64)> {
    let layout = FeatureLayout::new(topology, BATCH);
    let per_rank = run_ranks(topology, DEFAULT_TIMEOUT, |rank, comms| {
        let roles = &topology.ranks[rank].roles;
        let mut locals = Vec::new();
        let mut offsets = Vec::new();
        for role in roles {
            let size = topology.group_size(role.tower);
            let (offset, len) = (
                split_offset(BATCH, size, role.group_rank),
                split_len(BATCH, size, role.group_rank),
            );
            let all = match role.tower {
                Tower::Image => features(0.3, dtype),
                Tower::Text => features(1.7, dtype),
            };
            locals.push(all.narrow(0, offset, len)?);
            offsets.push(offset);
        }
        let (x, y) = mmpipe::loss::exchange_features(
            comms.world.as_ref(),
            &layout,
            &Tensor::cat(&locals, 0)?,
        )?;
        let others: Vec<Tensor> = roles
            .iter()
            .map(|role| match role.tower {
                Tower::Image => y.clone(),
                Tower::Text => x.clone(),
            })
            .collect();
        let sides: Vec<Side> = locals
            .iter()
            .zip(&others)
            .zip(&offsets)
            .map(|((local, other), &offset)| Side {
                local,
                other,
                offset,
            })
            .collect();
        let out = global_loss(&comms, &cfg, &layout, &sides, scalars)?;
        Ok(roles
            .iter()
            .zip(offsets)
            .zip(out.grads)
            .map(|((role, offset), grad)| {
                (
                    role.tower,
                    offset,
                    out.loss,
                    grad,
                    out.grad_logit_scale,
                    out.grad_logit_bias,
                )
            })
            .collect::<Vec<_>>())
    })
    .unwrap();
    per_rank.into_iter().flatten().collect()
}

fn scalars_for(kind: LossKind) -> LossScalars {
    LossScalars {
        // Away from the initial values, so a mix-up of scale and bias would show.
        logit_scale: kind.initial_logit_scale() - 0.3,
        logit_bias: kind.initial_logit_bias().map_or(0.0, |b| b + 2.5),
    }
}

fn check(kind: LossKind, exchange: Exchange, tile: TileSize, dtype: DType) {
    // In f32 a scalar summed over all of S (∂β = Σ(σ(U) − I)/B) is small by cancellation
    // of terms of size ~1: it carries their rounding, ~1e-7 absolute, on one device too.
    let (rel, abs, relative) = match dtype {
        DType::F64 => (1e-10, 1e-13, Relative::Element),
        _ => (1e-5, 1e-6, Relative::Tensor),
    };
    let scalars = scalars_for(kind);
    let want = reference(kind, scalars, dtype);
    let cfg = LossConfig {
        kind,
        exchange,
        tile,
        ..LossConfig::default()
    };
    let splits = TOPOLOGIES
        .iter()
        .map(|&(image, text)| (format!("{image}x{text}"), cpu_topology(image, text)));
    // Devices holding both towers: data parallel on 2 and 3 ranks, and a hybrid.
    let shared = [(2, "0-1", "0-1"), (3, "0-2", "0-2"), (3, "0-2", "1-2")]
        .into_iter()
        .map(|(devices, image, text)| {
            (
                format!("{devices} devices, image {image}, text {text}"),
                super::common::cpu_layout(devices, image, text),
            )
        });
    for (name, topology) in splits.chain(shared) {
        let label = format!("{kind} {exchange} tile {tile} {name} {dtype:?}");
        let close = |a: f64, b: f64| (a - b).abs() <= abs + rel * b.abs();
        for (rank, (tower, offset, loss, grad, dt, dbias)) in split(&topology, cfg, scalars, dtype)
            .into_iter()
            .enumerate()
        {
            assert!(
                close(loss, want.loss),
                "{label} rank {rank}: loss {loss} vs {}",
                want.loss
            );
            assert!(
                close(dt, want.logit_scale),
                "{label} rank {rank}: ∂t {dt} vs {}",
                want.logit_scale
            );
            assert!(
                close(dbias, want.logit_bias),
                "{label} rank {rank}: ∂β {dbias} vs {}",
                want.logit_bias
            );
            let all = match tower {
                Tower::Image => &want.image,
                Tower::Text => &want.text,
            };
            let rows = all.narrow(0, offset, grad.dim(0).unwrap()).unwrap();
            if let Some((i, a, b)) = worst_violation(&grad, &rows, rel, 1e-12, relative) {
                panic!("{label} rank {rank} ({tower}): feature gradient [{i}] {a} vs {b}");
            }
        }
    }
}

/// Tiles of 1 column, 5 (not dividing 12 nor any rank's 4 or 6 rows) and the whole batch.
const TILES: [TileSize; 4] = [
    TileSize::Untiled,
    TileSize::Columns(5),
    TileSize::Columns(1),
    TileSize::Auto,
];

#[test]
fn clip_lse_equals_one_device_on_every_topology_and_tiling() {
    for tile in TILES {
        check(LossKind::Clip, Exchange::Lse, tile, DType::F64);
    }
    check(
        LossKind::Clip,
        Exchange::Lse,
        TileSize::Columns(5),
        DType::F32,
    );
}

#[test]
fn clip_gather_scatter_equals_one_device_on_every_topology_and_tiling() {
    for tile in TILES {
        check(LossKind::Clip, Exchange::GatherScatter, tile, DType::F64);
    }
    check(
        LossKind::Clip,
        Exchange::GatherScatter,
        TileSize::Columns(5),
        DType::F32,
    );
}

#[test]
fn siglip_lse_equals_one_device_on_every_topology_and_tiling() {
    for tile in TILES {
        check(LossKind::Siglip, Exchange::Lse, tile, DType::F64);
    }
    check(
        LossKind::Siglip,
        Exchange::Lse,
        TileSize::Columns(5),
        DType::F32,
    );
}

#[test]
fn siglip_gather_scatter_equals_one_device_on_every_topology_and_tiling() {
    for tile in TILES {
        check(LossKind::Siglip, Exchange::GatherScatter, tile, DType::F64);
    }
    check(
        LossKind::Siglip,
        Exchange::GatherScatter,
        TileSize::Columns(5),
        DType::F32,
    );
}

/// The SigLIP reference itself, against the loss written out by hand on a 2×2 batch:
/// what the split losses are tested against must not share their mistakes.
#[test]
fn siglip_reference_matches_the_formula_by_hand() {
    let x = Tensor::new(&[[1.0f64, 0.0], [0.6, 0.8]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[0.0f64, 1.0], [0.8, 0.6]], &Device::Cpu).unwrap();
    let (t, b) = (0.5f64, -1.0f64);
    let s = t.exp();
    let xs = [[1.0, 0.0], [0.6, 0.8]];
    let ys = [[0.0, 1.0], [0.8, 0.6]];
    let mut want = 0.0;
    for (i, xi) in xs.iter().enumerate() {
        for (j, yj) in ys.iter().enumerate() {
            let u = s * (xi[0] * yj[0] + xi[1] * yj[1]) + b;
            let z = if i == j { 1.0 } else { -1.0 };
            want += -(1.0 / (1.0 + (-z * u).exp())).ln();
        }
    }
    want /= 2.0;
    let got = scalar(
        &siglip_loss_reference(
            &x,
            &y,
            &Tensor::new(t, &Device::Cpu).unwrap(),
            &Tensor::new(b, &Device::Cpu).unwrap(),
        )
        .unwrap(),
    );
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

#[test]
fn auto_tiles_follow_the_memory_budget() {
    let cfg = LossConfig {
        tile_memory_mib: 64.0,
        ..LossConfig::default()
    };
    // 64 MiB over 4 blocks of 4096 rows × 4 bytes: 1024 columns.
    assert_eq!(cfg.tile_columns(4096, 262_144, 4), 1024);
    // Never more than the batch, never less than one SIMD panel of 64.
    assert_eq!(cfg.tile_columns(16, 100, 4), 100);
    assert_eq!(cfg.tile_columns(1 << 24, 1 << 24, 4), 64);
    let untiled = LossConfig {
        tile: TileSize::Untiled,
        ..cfg
    };
    assert_eq!(untiled.tile_columns(4096, 262_144, 4), 262_144);
}

#[test]
fn tile_sizes_parse_from_toml_and_reject_nonsense() {
    #[derive(serde::Deserialize)]
    struct T {
        loss: LossConfig,
    }
    let parse = |s: &str| toml::from_str::<T>(s).map(|t| t.loss.tile);
    assert_eq!(parse("[loss]\ntile = 512").unwrap(), TileSize::Columns(512));
    assert_eq!(parse("[loss]\ntile = \"none\"").unwrap(), TileSize::Untiled);
    assert_eq!(parse("[loss]\ntile = \"auto\"").unwrap(), TileSize::Auto);
    let err = parse("[loss]\ntile = 0").unwrap_err().to_string();
    assert!(err.contains("at least 1"), "{err}");
    let err = parse("[loss]\ntile = \"big\"").unwrap_err().to_string();
    assert!(err.contains("auto"), "{err}");
    let err = toml::from_str::<T>("[loss]\nexchange = \"ring\"")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("gather-scatter"), "{err}");
}
