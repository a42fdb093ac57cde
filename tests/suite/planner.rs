//! The cost model's arithmetic on hand-checked cases, the split search, and the planner's
//! outputs and errors.

use std::path::Path;

use mmpipe::model::ClipConfig;
use mmpipe::plan::cost::{ring_all_gather_s, ring_all_reduce_s, ring_link, LinkCost};
use mmpipe::plan::search::{search, Candidate};
use mmpipe::plan::{CostModel, Plan, Precision};
use mmpipe::topology::{LayoutKind, Topology, Tower};

use super::plan::options;

fn model(name: &str) -> ClipConfig {
    ClipConfig::from_file(&Path::new("configs").join(name)).unwrap()
}

/// A cluster of identical devices with round numbers: 100 TFLOP/s sustained, 1 TB/s
/// everywhere (or as given between nodes), no latency.
fn cluster(nodes: usize, per_node: usize, inter_gbps: f64, groups: &str) -> Topology {
    let mut s = format!(
        "device = \"cuda\"\n{groups}\n[device_kinds.x]\ntflops = 100.0\nmemory_gib = 80.0\nefficiency = 1.0\n\
         [links]\nintra_node_gbps = 1000.0\nintra_node_latency_us = 0.0\ninter_node_gbps = {inter_gbps}\n\
         inter_node_latency_us = 0.0\n"
    );
    for n in 0..nodes {
        s += &format!("[[nodes]]\nname = \"n{n}\"\ndevices = {per_node}\n");
    }
    Topology::from_str(&s, Path::new("hand.toml")).unwrap()
}

#[test]
fn a_two_rank_ring_all_reduce_moves_the_payload_once_each_way() {
    let link = Some(LinkCost {
        bytes_per_s: 1e9,
        latency_s: 1e-6,
        inter_node: false,
    });
    // 2(p−1)/p = 1: the payload over the link once, plus two latencies.
    assert!((ring_all_reduce_s(1e9, 2, link) - (1.0 + 2e-6)).abs() < 1e-12);
    // Four ranks: 2·3/4 of the payload, six latencies.
    assert!((ring_all_reduce_s(1e9, 4, link) - (1.5 + 6e-6)).abs() < 1e-12);
    // All-gather of 1 GB in total over 4 ranks: 3/4 of it, three latencies.
    assert!((ring_all_gather_s(1e9, 4, link) - (0.75 + 3e-6)).abs() < 1e-12);
    assert_eq!(ring_all_reduce_s(1e9, 1, link), 0.0);
}

#[test]
fn a_group_spanning_two_nodes_uses_the_inter_node_link() {
    let t = cluster(2, 2, 10.0, "groups = \"auto\"");
    let t = t.with_groups(&[(0, 0), (1, 0)], &[(0, 1), (1, 1)]).unwrap();
    let links = t.links.unwrap();
    let image = ring_link(&t, &links, &t.group(Tower::Image)).unwrap();
    assert!(image.inter_node && image.bytes_per_s == 10e9);
    let inside = t.with_groups(&[(0, 0), (0, 1)], &[(1, 0), (1, 1)]).unwrap();
    let image = ring_link(&inside, &links, &inside.group(Tower::Image)).unwrap();
    assert!(!image.inter_node && image.bytes_per_s == 1000e9);
    // And the estimate's all-reduce time follows: 10 GB/s vs 1000 GB/s.
    let m = model("ViT-B-16.toml");
    let est = |t: &Topology| {
        CostModel {
            topology: t,
            model: &m,
            options: &options(64),
        }
        .split()
        .unwrap()
        .groups[0]
            .grad_all_reduce_s
    };
    let params_bytes = m.vision.size().num_params(512) as f64 * 4.0;
    assert!(
        (est(&t.with_groups(&[(0, 0), (1, 0)], &[(0, 1), (1, 1)]).unwrap()) - params_bytes / 10e9)
            .abs()
            < 1e-9
    );
    assert!((est(&inside) - params_bytes / 1000e9).abs() < 1e-9);
}

#[test]
fn compute_time_is_three_forwards_at_sustained_throughput() {
    let m = model("ViT-B-16.toml");
    let t = cluster(1, 2, 1.0, "[groups]\nimage = [\"n0:0\"]\ntext = [\"n0:1\"]");
    let mut o = options(100);
    let est = CostModel {
        topology: &t,
        model: &m,
        options: &o,
    }
    .split()
    .unwrap();
    // mmpipe runs ViT-B/16's last block at the class token only: of its 197·(4·768² +
    // 2·768·3072) + 2·197²·768 = 1454.0 M multiply-adds, 197·2·768² (keys, values) +
    // 2·768² (query, output) + 2·768·3072 + 2·197·768 = 238.6 M remain, so
    // 35.13 − 2·1.2154 = 32.70 GFLOPs a forward.
    let executed = m.vision.size().executed_forward_flops(512);
    let by_hand = 35.13e9 - 2.0 * (1453.95e6 - 238.59e6);
    assert!(
        (executed - by_hand).abs() < 0.01e9,
        "{executed} vs {by_hand}"
    );
    // 100 samples × 32.70 GFLOPs × 3 at 100 TFLOP/s.
    let image = &est.groups[0];
    assert!((image.forward_s + image.backward_s - 100.0 * 3.0 * 32.70e9 / 100e12).abs() < 2e-4);
    o.checkpointing = true;
    let ckpt = CostModel {
        topology: &t,
        model: &m,
        options: &o,
    }
    .split()
    .unwrap();
    assert!((ckpt.groups[0].backward_s / ckpt.groups[0].forward_s - 3.0).abs() < 1e-9);
    assert!(ckpt.groups[0].memory.activations < 0.5 * image.memory.activations);
    // The step is the busier group's; the text group idles the difference.
    let text = &est.groups[1];
    assert!((text.compute_s + text.comm_s + text.idle_s - est.step_s).abs() < 1e-12);
    assert_eq!(est.lighter, Tower::Text);
}

#[test]
fn auto_finds_the_balanced_split_worked_out_by_hand() {
    // ViT-B/16 costs 35.13 / 5.96 = 5.89 text towers per sample (32.93 / 5.59 as mmpipe
    // runs them, last blocks at the pooled token only: the same ratio). On 8 equal devices with
    // fast links the step is max(5.89/k, 1/(8−k)) in text-tower units: k=6 gives 0.98,
    // k=7 gives 1.0 (the text rank is the bottleneck), k=5 gives 1.18. Batch 840 divides
    // by every k.
    let m = model("ViT-B-16.toml");
    let t = cluster(1, 8, 1000.0, "groups = \"auto\"");
    let auto = search(&t, &m, &options(840), 3).unwrap();
    let best = &best_of(&auto, LayoutKind::Split).split;
    let ranks = |t: Tower| best.groups.iter().find(|g| g.tower == t).unwrap().ranks;
    assert_eq!((ranks(Tower::Image), ranks(Tower::Text)), (6, 2));
    assert!(auto
        .candidates
        .windows(2)
        .all(|w| w[0].split.step_s <= w[1].split.step_s));
}

#[test]
fn auto_gives_the_faster_devices_to_the_heavier_tower_on_a_mixed_cluster() {
    let m = model("ViT-B-16.toml");
    let t = Topology::from_file(Path::new("topology/mixed.toml")).unwrap();
    let auto = search(&t, &m, &options(1920), 5).unwrap();
    let best = best_of(&auto, LayoutKind::Split);
    assert!(
        best.image.iter().all(|e| e.starts_with("fast")),
        "{:?}",
        best.image
    );
}

/// The best layout of `kind` the search kept.
fn best_of(auto: &mmpipe::plan::search::AutoPlan, kind: LayoutKind) -> &Candidate {
    auto.candidates
        .iter()
        .find(|c| c.kind == kind)
        .unwrap_or_else(|| panic!("no {kind} candidate: {}", auto.render()))
}

/// Where plain data parallelism beats every split (ViT-B/16 at 4800 on two 8-GPU nodes,
/// the case the old warning named), `--auto` now chooses it (or a hybrid), lists the best
/// of each other kind beside it, and its choice is what `with_groups` makes of it.
#[test]
fn auto_compares_the_three_kinds_and_chooses_data_parallelism_where_it_wins() {
    let m = model("ViT-B-16.toml");
    let t = Topology::from_file(Path::new("topology/2node-8gpu.toml")).unwrap();
    let auto = search(&t, &m, &options(4800), 3).unwrap();
    let best = auto.best();
    assert_ne!(best.kind, LayoutKind::Split, "{}", auto.render());
    for kind in [
        LayoutKind::Split,
        LayoutKind::DataParallel,
        LayoutKind::Hybrid,
    ] {
        let c = best_of(&auto, kind);
        assert!(c.split.step_s >= best.split.step_s);
        let chosen = t.with_groups(&c.image_devices, &c.text_devices).unwrap();
        assert_eq!(chosen.layout_kind(), kind);
    }
    let split = best_of(&auto, LayoutKind::Split);
    assert!(split.split.step_s > best.split.step_s, "{}", auto.render());
    let text = auto.render();
    assert!(text.contains("best split: "), "{text}");
    // The counts say what was searched.
    assert_eq!(
        auto.considered
            .iter()
            .find(|(k, _)| *k == LayoutKind::DataParallel)
            .unwrap()
            .1,
        1
    );
}

/// The cost model on layouts whose devices hold both towers: data parallel on 8 equal
/// devices is each device running both towers on an eighth of the batch; a device
/// holding both carries both towers' weights, gradients and optimizer state.
#[test]
fn a_device_holding_both_towers_runs_both_and_holds_both() {
    let m = model("ViT-B-16.toml");
    let cost = |t: &Topology| {
        CostModel {
            topology: t,
            model: &m,
            options: &options(1024),
        }
        .split()
        .unwrap()
    };
    let split = cost(&cluster(
        1,
        8,
        1000.0,
        "[groups]\nimage = [\"n0:0-5\"]\ntext = [\"n0:6-7\"]",
    ));
    let dp = cost(&cluster(
        1,
        8,
        1000.0,
        "[groups]\nimage = [\"n0:0-7\"]\ntext = [\"n0:0-7\"]",
    ));
    let (image, text) = (&dp.groups[0], &dp.groups[1]);
    // Each group's row is a device's whole step: both towers' compute.
    let towers = image.forward_s
        + image.backward_s
        + image.loss_s
        + text.forward_s
        + text.backward_s
        + text.loss_s;
    assert!(
        (image.compute_s - towers).abs() < 1e-12,
        "{} vs {towers}",
        image.compute_s
    );
    assert_eq!(image.compute_s, text.compute_s);
    assert!((image.compute_s + image.comm_s + image.idle_s - dp.step_s).abs() < 1e-12);
    assert!(
        image.idle_s.abs() < 1e-12,
        "no device idles in data parallelism"
    );
    // Both towers' state on every device: more than the split's image rank holds.
    let split_image = &split.groups[0].memory;
    assert!(image.memory.weights > split_image.weights);
    assert!(
        (image.memory.weights - (split.groups[0].memory.weights + split.groups[1].memory.weights))
            .abs()
            < 1.0
    );
    // 1024 over 8: 128 samples of each tower per device.
    assert_eq!((image.local_batch, text.local_batch), (128, 128));
}

#[test]
fn eight_to_eight_is_about_1_7x_slower_than_data_parallel_for_vit_b_16() {
    let m = model("ViT-B-16.toml");
    let t = cluster(
        2,
        8,
        1000.0,
        "[groups]\nimage = [\"n0:0-7\"]\ntext = [\"n1:0-7\"]",
    );
    let plan = Plan::new(&t, &m, &options(1024)).unwrap();
    let ratio = plan.split.unwrap().step_s / plan.data_parallel.unwrap().step_s;
    assert!((1.6..1.8).contains(&ratio), "{ratio}");
}

#[test]
fn the_plan_round_trips_through_json() {
    let m = model("ViT-B-16.toml");
    let t = Topology::from_file(Path::new("topology/4x4.toml")).unwrap();
    let plan = Plan::new(&t, &m, &options(256)).unwrap();
    let json = serde_json::to_string(&plan).unwrap();
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    assert!(json.contains("\"step_s\""));
}

#[test]
fn impossible_requests_are_errors() {
    let m = model("ViT-B-16.toml");
    // One device can only hold both towers.
    let one = cluster(1, 1, 1.0, "groups = \"auto\"");
    let auto = search(&one, &m, &options(8), 3).unwrap();
    assert_eq!(auto.best().kind, LayoutKind::DataParallel);
    assert_eq!(auto.candidates.len(), 1);
    let t = cluster(1, 4, 1.0, "groups = \"auto\"");
    // Any batch splits, but not over more ranks than it has samples.
    search(&t, &m, &options(7), 3).unwrap();
    // A batch of one fits on no group of two or more: only a split of one device each,
    // or one device holding both (not on a four-device cluster, where every device needs a
    // tower).
    let e = search(&t, &m, &options(1), 3).unwrap_err().to_string();
    assert!(e.contains("more ranks in a group than samples"), "{e}");
    // ViT-L/14 at 65,536 fits with checkpointing and micro-batches; at 2^26 the gathered
    // features alone (2 × B × 768 × 4 bytes) outgrow a device.
    search(&t, &model("ViT-L-14.toml"), &options(1 << 16), 3).unwrap();
    let e = search(&t, &model("ViT-L-14.toml"), &options(1 << 26), 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("even with gradient checkpointing"), "{e}");
    // An auto topology cannot be planned or trained without choosing the groups.
    let e = Plan::new(&t, &m, &options(8)).unwrap_err().to_string();
    assert!(e.contains("--auto"), "{e}");
}

#[test]
fn a_plan_without_device_specs_says_why_it_has_no_times() {
    let t = Topology::from_file(Path::new("topology/cpu-2x1.toml")).unwrap();
    let plan = Plan::new(&t, &ClipConfig::default_tiny(), &options(12)).unwrap();
    assert!(plan.split.is_none());
    assert!(plan.no_estimate.unwrap().contains("--calibrate"));
}

#[test]
fn a_batch_no_split_divides_still_gets_a_plan_with_uneven_slices() {
    // A prime batch: no split of 2 or more ranks divides it, and each used to be skipped.
    const PRIME: usize = 4801;
    let t = Topology::from_file(Path::new("topology/2node-8gpu.toml")).unwrap();
    let auto = search(&t, &model("ViT-B-16.toml"), &options(PRIME), 3).unwrap();
    assert_eq!(auto.too_small, 0);
    let best = &auto.candidates[0];
    let chosen = t
        .with_groups(&best.image_devices, &best.text_devices)
        .unwrap();
    let plan = Plan::new(&chosen, &model("ViT-B-16.toml"), &options(PRIME)).unwrap();
    // Each group's slices add up to the batch and differ by at most one sample.
    for tower in [Tower::Image, Tower::Text] {
        let slices: Vec<usize> = plan
            .ranks
            .iter()
            .filter(|r| r.tower == tower)
            .map(|r| r.local_batch)
            .collect();
        assert_eq!(slices.iter().sum::<usize>(), PRIME, "{tower}: {slices:?}");
        let (lo, hi) = (slices.iter().min().unwrap(), slices.iter().max().unwrap());
        assert!(hi - lo <= 1, "{tower}: {slices:?}");
    }
}

/// Issue 20's case: ViT-B/16 at 32,768 on two 8-GPU nodes fits nowhere as asked; `--auto`
/// turns on checkpointing for it, and at four times the batch adds micro-batches, says so,
/// and the plan it prints (costed with them) fits.
#[test]
fn auto_adds_checkpointing_and_micro_batches_where_memory_needs_them() {
    let t = Topology::from_file(Path::new("topology/2node-8gpu.toml")).unwrap();
    let m = model("ViT-B-16.toml");
    let fits = |batch: usize, best: &mmpipe::plan::search::Candidate| {
        let chosen = t
            .with_groups(&best.image_devices, &best.text_devices)
            .unwrap();
        let plan = Plan::new(&chosen, &m, &best.options(&options(batch))).unwrap();
        plan.split.unwrap().groups.iter().all(|g| g.memory.fits)
    };
    let auto = search(&t, &m, &options(32768), 1).unwrap();
    let best = &auto.candidates[0];
    let asked = Plan::new(
        &t.with_groups(&best.image_devices, &best.text_devices)
            .unwrap(),
        &m,
        &options(32768),
    )
    .unwrap();
    assert!(
        asked.split.unwrap().groups.iter().any(|g| !g.memory.fits),
        "the test needs a batch that does not fit as asked"
    );
    assert_eq!(best.needs, vec!["--checkpointing".to_string()]);
    assert!(best.checkpointing && best.micro_batch == Default::default());
    assert!(fits(32768, best));

    let auto = search(&t, &m, &options(131072), 1).unwrap();
    let best = &auto.candidates[0];
    assert!(best.checkpointing, "{:?}", best.needs);
    assert!(
        best.needs.iter().any(|n| n.starts_with("--micro-batch-")),
        "{:?}",
        best.needs
    );
    assert!(fits(131072, best));
    assert!(auto
        .render()
        .contains("and train it with --checkpointing --micro-batch-"));
}

#[test]
fn a_locked_tower_costs_a_forward_and_no_gradient_traffic() {
    let t = Topology::from_file(Path::new("topology/4x4.toml")).unwrap();
    let free = model("ViT-B-16.toml");
    let mut locked = free.clone();
    locked.locked = vec![Tower::Text];
    let est = |m: &ClipConfig| {
        CostModel {
            topology: &t,
            model: m,
            options: &options(256),
        }
        .split()
        .unwrap()
        .groups[1]
            .clone()
    };
    let (a, b) = (est(&free), est(&locked));
    assert_eq!(
        (
            b.backward_s,
            b.grad_all_reduce_s,
            b.memory.optimizer,
            b.memory.gradients
        ),
        (0.0, 0.0, 0.0, 0.0)
    );
    assert!(a.backward_s > 0.0 && a.grad_all_reduce_s > 0.0);
    assert_eq!(a.forward_s, b.forward_s);
    assert!(b.memory.total < a.memory.total);
    let plan = Plan::new(&t, &locked, &options(256)).unwrap();
    assert_eq!(plan.traffic.grad_all_reduce[1], (Tower::Text, 0));
}

#[test]
fn calibration_runs_every_rank_in_lockstep_and_returns_each_towers_rate() {
    // Three threads of unequal work (two image ranks at half the batch, one text rank at
    // all of it) share barriers: a thread that left the lockstep early would hang this test.
    // In each precision: the towers run in it (bf16 products on the CPU too), and the
    // rates say which they are.
    for precision in [Precision::Fp32, Precision::Bf16] {
        let rates = mmpipe::train::calibrate::calibrate(
            &super::common::cpu_topology(2, 1),
            &super::common::test_model(),
            8,
            std::time::Duration::ZERO,
            precision,
        )
        .unwrap();
        for rate in [rates.image_samples_per_s, rates.text_samples_per_s] {
            assert!(rate.is_finite() && rate > 0.0, "{rates:?}");
        }
        assert_eq!(rates.precision, precision);
    }
}

/// Rates measured in one precision do not cost a plan in another.
#[test]
fn a_calibration_in_another_precision_is_refused() {
    let t = Topology::from_file(Path::new("topology/cpu-2x1.toml")).unwrap();
    let m = ClipConfig::default_tiny();
    let options = mmpipe::plan::CostOptions {
        precision: Precision::Bf16,
        calibration: Some(mmpipe::plan::Calibration {
            image_samples_per_s: 100.0,
            text_samples_per_s: 300.0,
            precision: Precision::Fp32,
        }),
        ..options(12)
    };
    let e = CostModel {
        topology: &t,
        model: &m,
        options: &options,
    }
    .split()
    .unwrap_err()
    .to_string();
    assert!(e.contains("calibrate with the same --precision"), "{e}");
}
