//! The fused ops' CUDA kernels (src/model/fused/*.cu) on the CPU emulator
//! (tests/cuda-emulator/), launched by the very plans `fused::cuda` launches on a GPU
//! (`fused::plan`), against an f64 reference written here from the formulas: on any
//! machine with g++, before a GPU runs them. Each argument's type is checked against the
//! kernel's parameter, so a launch sequence out of step with a signature fails here.
//!
//! Every job runs under AddressSanitizer and UBSan (bounds of buffers and `__shared__`
//! arrays) and twice, in the forward and the reversed schedule, whose bytes must agree
//! (races).
//!
//! The GPU workbench (`fused::cuda::`, scripts/gpu-check.sh) checks the same kernels on
//! the device and times them; this one checks their logic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mmpipe::model::fused::plan::{self, Arg, Buffer, Gelu, Plan, Values};

/// An emulator build: the kernels of `source`, compiled with the harness.
fn build(name: &str, source: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cuda-emulator")
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kernels.cu"), source).unwrap();
    // The entry points, from the source with its macros expanded.
    let expanded = std::process::Command::new("g++")
        .args([
            "-E",
            "-P",
            "-x",
            "c++",
            "-D__global__=",
            "-D__device__=",
            "-D__forceinline__=inline",
            "-D__shared__=static",
            "-D__restrict__=",
        ])
        .arg(dir.join("kernels.cu"))
        .output()
        .expect("the kernel emulator needs g++");
    assert!(
        expanded.status.success(),
        "{}",
        String::from_utf8_lossy(&expanded.stderr)
    );
    let text = String::from_utf8(expanded.stdout).unwrap();
    let mut names: Vec<String> = text
        .split("extern \"C\"")
        .skip(1)
        .filter_map(|rest| {
            let rest = rest.trim_start().strip_prefix("void")?;
            let name: String = rest
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty(), "{name}: no kernels");
    let registry: String = names.iter().map(|n| format!("KERNEL({n})\n")).collect();
    std::fs::write(dir.join("registry.inc"), registry).unwrap();
    let binary = dir.join("emulator");
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda-emulator");
    // IEEE single precision, no contractions into fused multiply-adds: the CPU's
    // arithmetic, and the GPU's where a kernel is compiled with --fmad=false.
    let mut cmd = std::process::Command::new("g++");
    cmd.args(["-std=c++20", "-O1", "-ffp-contract=off"]);
    if sanitizers() {
        cmd.args(SANITIZE);
    }
    let out = cmd
        .arg("-I")
        .arg(&dir)
        .arg("-I")
        .arg(&here)
        .arg(here.join("harness.cpp"))
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the emulator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    binary
}

/// AddressSanitizer and UndefinedBehaviorSanitizer, fatal at the first report: the
/// emulator's kernels then stop at any read or write outside a buffer or a `__shared__`
/// array, as compute-sanitizer's memcheck would on a GPU (a kernel that lost its bounds
/// guard fails with a heap-buffer-overflow naming its line).
const SANITIZE: [&str; 3] = [
    "-g",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
];

/// Whether the emulator is built with [`SANITIZE`]: where g++ can link them (a probe,
/// once per run) and MMPIPE_EMULATOR_SANITIZE is not 0. Without them the kernels' results
/// are still checked; only the bounds go unwatched, and the run says so.
fn sanitizers() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        if std::env::var("MMPIPE_EMULATOR_SANITIZE").is_ok_and(|v| v == "0") {
            return false;
        }
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
        std::fs::create_dir_all(&dir).unwrap();
        let probe = dir.join("probe.cpp");
        std::fs::write(&probe, "int main() { return 0; }\n").unwrap();
        let built = std::process::Command::new("g++")
            .args(SANITIZE)
            .arg(&probe)
            .arg("-o")
            .arg(dir.join("probe"))
            .output()
            .is_ok_and(|o| o.status.success())
            && std::process::Command::new(dir.join("probe"))
                .status()
                .is_ok_and(|s| s.success());
        if !built {
            eprintln!("kernels: g++ cannot link the address and UB sanitizers here: the emulator runs without bounds checks");
        }
        built
    })
}

/// The fused ops' kernels on the emulator, built once per test run.
fn emulator() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("fused", plan::SOURCE))
}

/// The AdamW kernel on the emulator, built once per test run.
fn adamw_emulator() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build("adamw", mmpipe::train::optim::plan::SOURCE))
}

/// Runs job `job` (the harness's commands) in a fresh folder `name` with `emulator`.
fn run_job(emulator: &Path, name: &str, job: &str) -> std::process::Output {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cuda-emulator")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("job"), job).unwrap();
    std::process::Command::new(emulator)
        .arg(dir.join("job"))
        .output()
        .unwrap()
}

/// Runs `body` (the job's buffers and launches) on `emulator` twice: blocks and threads
/// in index order, then reversed. The bytes of each buffer named in `outputs` must agree:
/// no kernel's result may depend on the order its threads run in between barriers (the
/// race check a fixed schedule would otherwise hide). Returns them, in `outputs`' order.
fn in_both_schedules(
    emulator: &Path,
    name: &str,
    dir: &Path,
    body: &str,
    outputs: &[String],
) -> Vec<Vec<u8>> {
    let mut results = Vec::new();
    for order in ["forward", "reversed"] {
        let mut job = format!("schedule {order}\n{body}");
        for id in outputs {
            job.push_str(&format!(
                "write {id} {}\n",
                dir.join(format!("{id}.{order}.out")).display()
            ));
        }
        std::fs::write(dir.join("job"), job).unwrap();
        let out = std::process::Command::new(emulator)
            .arg(dir.join("job"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name} ({order} schedule): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes: Vec<Vec<u8>> = outputs
            .iter()
            .map(|id| std::fs::read(dir.join(format!("{id}.{order}.out"))).unwrap())
            .collect();
        results.push(bytes);
    }
    let forward = results.swap_remove(0);
    for ((id, a), b) in outputs.iter().zip(&forward).zip(&results[0]) {
        assert!(
            a == b,
            "{name}: {id} differs between the forward and the reversed schedule (a race: a read of another thread's or block's write with no barrier between)"
        );
    }
    forward
}

/// Runs `plan` on the emulator with `buffers` (bytes by role, plus the plan's scratch),
/// and returns every buffer as the kernels left it.
fn run(name: &str, plan: &Plan, buffers: &BTreeMap<Buffer, Vec<u8>>) -> BTreeMap<Buffer, Vec<u8>> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cuda-emulator")
        .join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut all = buffers.clone();
    for &(b, len) in &plan.scratch {
        all.insert(b, vec![0u8; 4 * len]);
    }
    let id = |b: &Buffer| format!("{b:?}");
    let mut job = String::new();
    for (b, bytes) in &all {
        let path = dir.join(format!("{}.in", id(b)));
        std::fs::write(&path, bytes).unwrap();
        job.push_str(&format!(
            "buffer {} {} {}\n",
            id(b),
            bytes.len(),
            path.display()
        ));
    }
    for l in &plan.launches {
        job.push_str(&format!(
            "launch {} {} {} {}",
            l.kernel, l.grid.0, l.grid.1, l.threads
        ));
        for a in &l.args {
            job.push_str(&match a {
                Arg::Address(b) => format!(" b:{}", id(b)),
                Arg::Null => " n".into(),
                Arg::I64(v) => format!(" l:{v}"),
                Arg::I32(v) => format!(" i:{v}"),
                Arg::F32(v) => format!(" f:{:x}", v.to_bits()),
            });
        }
        job.push('\n');
    }
    let ids: Vec<String> = all.keys().map(id).collect();
    let bytes = in_both_schedules(emulator(), name, &dir, &job, &ids);
    let result: BTreeMap<Buffer, Vec<u8>> = all.keys().copied().zip(bytes).collect();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// What a fresh, uninitialised allocation may hold: all-ones bytes, a NaN in f32 and in
/// bf16. `fused::cuda` allocates the buffers the kernels write whole without zeroing them,
/// so each test hands those in like this: an element a kernel leaves unwritten fails its
/// check.
fn unwritten(bytes: usize) -> Vec<u8> {
    vec![0xFF; bytes]
}

/// Deterministic values in about [-2, 2] (a fixed LCG: no dependency on the suite's RNG).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Values as the kernels' element bytes, and the values they hold (bf16-rounded).
fn encode(v: &[f32], of: Values) -> (Vec<u8>, Vec<f64>) {
    match of {
        Values::F32 => (
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            v.iter().map(|&x| x as f64).collect(),
        ),
        Values::Bf16 => {
            let b: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (
                b.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                b.iter().map(|x| x.to_f64()).collect(),
            )
        }
    }
}

fn decode(bytes: &[u8], of: Values) -> Vec<f64> {
    match of {
        Values::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        Values::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f64())
            .collect(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    encode(v, Values::F32).0
}

/// Every element within `tol` of the reference, relative to the reference's largest
/// magnitude; plus, where the output is bf16, the reference rounded to bf16 (half an ulp,
/// and the f32 computation's error).
fn assert_close(what: &str, got: &[f64], want: &[f64], of: Values, tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let allowed = match of {
            Values::F32 => tol * scale,
            // One bf16 ulp of the value (2^-7 relative), as the GPU's rounding of an f32
            // within `tol` of the reference can land either side.
            Values::Bf16 => w.abs() / 128.0 + tol * scale,
        };
        assert!(
            (g - w).abs() <= allowed,
            "{what}[{i}]: {g} vs reference {w} (allowed {allowed:e})"
        );
    }
}

fn gelu(z: f64) -> f64 {
    0.5 * z * (1.0 + libm_erf(z / std::f64::consts::SQRT_2))
}

fn gelu_grad(z: f64) -> f64 {
    let cdf = 0.5 * (1.0 + libm_erf(z / std::f64::consts::SQRT_2));
    cdf + z * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// A scalar function of the reference.
type Scalar = fn(f64) -> f64;

fn quick_gelu(z: f64) -> f64 {
    z / (1.0 + (-1.702 * z).exp())
}

fn quick_gelu_grad(z: f64) -> f64 {
    let s = 1.0 / (1.0 + (-1.702 * z).exp());
    s + 1.702 * z * s * (1.0 - s)
}

fn libm_erf(x: f64) -> f64 {
    candle_core::cpu::erf::erf_f64(x)
}

/// Layer norm forward and backward, f32 and bf16 inputs: rows of a width under a block,
/// over one (300: the strided loops), and enough rows for chunks of two rows; and the
/// forward's bf16 output, the f32 one rounded, and backward from a bf16 gradient.
#[test]
fn layer_norm_kernels_equal_the_formulas() {
    for (of, rows, width) in [
        (Values::F32, 5, 24),
        (Values::F32, 3, 300),
        (Values::Bf16, 4, 300),
        (Values::F32, 300, 40),
        (Values::Bf16, 300, 40),
    ] {
        let name = format!("layer-norm-{}-{rows}x{width}", of.suffix());
        let eps = 1e-5f32;
        // An offset row mean, as a residual stream has.
        let raw: Vec<f32> = values(rows * width, 1)
            .iter()
            .map(|v| v * 1.5 + 0.7)
            .collect();
        let (x_bytes, x) = encode(&raw, of);
        let w = values(width, 2);
        let b = values(width, 3);
        let g = values(rows * width, 4);
        let mut buffers = BTreeMap::from([
            (Buffer::Input, x_bytes),
            (Buffer::Weight, f32_bytes(&w)),
            (Buffer::Bias, f32_bytes(&b)),
            (Buffer::Output, unwritten(4 * rows * width)),
            (Buffer::Stats, unwritten(8 * rows)),
        ]);
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::layer_norm_forward(of, Values::F32, rows, width, eps),
            &buffers,
        );
        // The bf16 output (for a bf16 matrix product after the norm): the f32 output
        // rounded to bf16, bit for bit, and the same statistics.
        let mut to_bf16 = buffers.clone();
        to_bf16.insert(Buffer::Output, unwritten(2 * rows * width));
        let rounded = run(
            &format!("{name}-fwd-to-bf16"),
            &plan::layer_norm_forward(of, Values::Bf16, rows, width, eps),
            &to_bf16,
        );
        let f32_out: Vec<f32> = fwd[&Buffer::Output]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let expected: Vec<u8> = f32_out
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        assert!(
            rounded[&Buffer::Output] == expected,
            "{name}: the bf16 output is not the f32 output rounded"
        );
        assert_eq!(
            rounded[&Buffer::Stats],
            fwd[&Buffer::Stats],
            "{name}: statistics"
        );

        // The reference, in f64 from the values the kernels read.
        let (mut y, mut dx) = (vec![0f64; rows * width], vec![0f64; rows * width]);
        let (mut dw, mut db) = (vec![0f64; width], vec![0f64; width]);
        let mut stats = vec![0f64; 2 * rows];
        for r in 0..rows {
            let row = &x[r * width..(r + 1) * width];
            let mean = row.iter().sum::<f64>() / width as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let gr = &g[r * width..(r + 1) * width];
            let gw: Vec<f64> = (0..width).map(|i| gr[i] as f64 * w[i] as f64).collect();
            let mean_gw = gw.iter().sum::<f64>() / width as f64;
            let mean_gw_xhat = (0..width).map(|i| gw[i] * xhat[i]).sum::<f64>() / width as f64;
            for i in 0..width {
                y[r * width + i] = xhat[i] * w[i] as f64 + b[i] as f64;
                dx[r * width + i] = rstd * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat);
                dw[i] += gr[i] as f64 * xhat[i];
                db[i] += gr[i] as f64;
            }
        }
        assert_close(
            &format!("{name} y"),
            &decode(&fwd[&Buffer::Output], Values::F32),
            &y,
            Values::F32,
            1e-5,
        );
        assert_close(
            &format!("{name} stats"),
            &decode(&fwd[&Buffer::Stats], Values::F32),
            &stats,
            Values::F32,
            1e-5,
        );

        buffers.insert(Buffer::Stats, fwd[&Buffer::Stats].clone());
        buffers.insert(Buffer::OutputGrad, f32_bytes(&g));
        buffers.insert(Buffer::InputGrad, unwritten(encode(&raw, of).0.len()));
        buffers.insert(Buffer::WeightGrad, unwritten(4 * width));
        buffers.insert(Buffer::BiasGrad, unwritten(4 * width));
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::layer_norm_backward(of, Values::F32, rows, width),
            &buffers,
        );
        assert_close(
            &format!("{name} dx"),
            &decode(&bwd[&Buffer::InputGrad], of),
            &dx,
            of,
            1e-5,
        );
        assert_close(
            &format!("{name} dw"),
            &decode(&bwd[&Buffer::WeightGrad], Values::F32),
            &dw,
            Values::F32,
            1e-5,
        );
        assert_close(
            &format!("{name} db"),
            &decode(&bwd[&Buffer::BiasGrad], Values::F32),
            &db,
            Values::F32,
            1e-5,
        );
        // The reductions run in a fixed order: the same bits again.
        let again = run(
            &format!("{name}-bwd2"),
            &plan::layer_norm_backward(of, Values::F32, rows, width),
            &buffers,
        );
        assert_eq!(
            again[&Buffer::WeightGrad],
            bwd[&Buffer::WeightGrad],
            "{name}: dw bits"
        );
        // From a bf16 output gradient (a norm that wrote bf16): the bits its f32 widening
        // gives, every gradient.
        let (g16_bytes, g16) = encode(&g, Values::Bf16);
        let widened: Vec<f32> = g16.iter().map(|&v| v as f32).collect();
        let mut from_bf16 = buffers.clone();
        from_bf16.insert(Buffer::OutputGrad, g16_bytes);
        let mut from_f32 = buffers.clone();
        from_f32.insert(Buffer::OutputGrad, f32_bytes(&widened));
        let narrow = run(
            &format!("{name}-bwd-from-bf16"),
            &plan::layer_norm_backward(of, Values::Bf16, rows, width),
            &from_bf16,
        );
        let wide = run(
            &format!("{name}-bwd-widened"),
            &plan::layer_norm_backward(of, Values::F32, rows, width),
            &from_f32,
        );
        for part in [Buffer::InputGrad, Buffer::WeightGrad, Buffer::BiasGrad] {
            assert!(
                narrow[&part] == wide[&part],
                "{name}: {part:?} from the bf16 gradient differs from its widening's"
            );
        }
    }
}

/// Exact and quick GELU forward and backward, with and without the bias, f32 and bf16: a
/// tail block (n not a multiple of 256), and rows enough for chunked bias gradients.
#[test]
fn gelu_kernels_equal_the_formulas() {
    for (act, of, rows, width, bias) in [
        (Gelu::Erf, Values::F32, 7, 37, false),
        (Gelu::Erf, Values::F32, 7, 37, true),
        (Gelu::Erf, Values::Bf16, 7, 300, true),
        (Gelu::Erf, Values::Bf16, 5, 24, false),
        (Gelu::Erf, Values::F32, 300, 20, true),
        (Gelu::Quick, Values::F32, 7, 37, false),
        (Gelu::Quick, Values::Bf16, 7, 300, true),
        (Gelu::Quick, Values::F32, 300, 20, true),
    ] {
        let name = format!("{act:?}-{}-{rows}x{width}-{bias}", of.suffix());
        let (f, f_grad): (Scalar, Scalar) = match act {
            Gelu::Erf => (gelu, gelu_grad),
            Gelu::Quick => (quick_gelu, quick_gelu_grad),
        };
        let n = rows * width;
        let (y_bytes, y) = encode(&values(n, 5), of);
        let (b_bytes, b) = encode(&values(width, 6), of);
        let (g_bytes, g) = encode(&values(n, 7), of);
        let bytes_of = |count: usize| unwritten(count * if of == Values::F32 { 4 } else { 2 });
        let mut buffers = BTreeMap::from([(Buffer::Input, y_bytes), (Buffer::Output, bytes_of(n))]);
        if bias {
            buffers.insert(Buffer::Bias, b_bytes);
        }
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::gelu_forward(act, of, n, width, bias),
            &buffers,
        );
        let z = |i: usize| y[i] + if bias { b[i % width] } else { 0.0 };
        let want: Vec<f64> = (0..n).map(|i| f(z(i))).collect();
        assert_close(
            &format!("{name} out"),
            &decode(&fwd[&Buffer::Output], of),
            &want,
            of,
            1e-6,
        );

        buffers.insert(Buffer::OutputGrad, g_bytes);
        buffers.insert(Buffer::InputGrad, bytes_of(n));
        if bias {
            buffers.insert(Buffer::BiasGrad, bytes_of(width));
        }
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::gelu_backward(act, of, n, width, bias),
            &buffers,
        );
        let dz: Vec<f64> = (0..n).map(|i| g[i] * f_grad(z(i))).collect();
        assert_close(
            &format!("{name} dy"),
            &decode(&bwd[&Buffer::InputGrad], of),
            &dz,
            of,
            1e-6,
        );
        if bias {
            let mut dbias = vec![0f64; width];
            for (i, d) in dz.iter().enumerate() {
                dbias[i % width] += d;
            }
            assert_close(
                &format!("{name} dbias"),
                &decode(&bwd[&Buffer::BiasGrad], of),
                &dbias,
                of,
                1e-5,
            );
        }
    }
}

/// The bias add and residual add after a linear layer (f32 stream, f32 or bf16 branch),
/// forward and backward, against the plain ops' maths: `z = y + b` rounded to the branch's
/// dtype, `out = stream + z`; the branch's gradient the output's rounded, and the bias's
/// its sum over the rows (with rows over several chunks).
#[test]
fn bias_residual_kernels_equal_the_formulas() {
    for (of, rows, width) in [
        (Values::F32, 7, 37),
        (Values::Bf16, 7, 300),
        (Values::F32, 300, 20),
        (Values::Bf16, 600, 3),
    ] {
        let name = format!("bias-residual-{}-{rows}x{width}", of.suffix());
        let n = rows * width;
        let stream = values(n, 11);
        let (y_bytes, y) = encode(&values(n, 12), of);
        let (b_bytes, b) = encode(&values(width, 13), of);
        let g = values(n, 14);
        let bytes_of = |count: usize| unwritten(count * if of == Values::F32 { 4 } else { 2 });
        let round = |v: f64| match of {
            Values::F32 => v as f32 as f64,
            Values::Bf16 => half::bf16::from_f64(v).to_f64(),
        };
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::bias_residual_forward(of, n, width),
            &BTreeMap::from([
                (Buffer::Residual, f32_bytes(&stream)),
                (Buffer::Input, y_bytes),
                (Buffer::Bias, b_bytes),
                (Buffer::Output, unwritten(4 * n)),
            ]),
        );
        // The sum rounded to the branch's dtype first, then added in f32 as the kernel
        // does: the same bits (bf16's rounding of `y + b` in f32 and in f64 agree but for
        // ties, which these values do not hit).
        let want: Vec<f64> = (0..n)
            .map(|i| (stream[i] + round(y[i] + b[i % width]) as f32) as f64)
            .collect();
        assert_close(
            &format!("{name} out"),
            &decode(&fwd[&Buffer::Output], Values::F32),
            &want,
            Values::F32,
            0.0,
        );
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::bias_residual_backward(of, n, width),
            &BTreeMap::from([
                (Buffer::OutputGrad, f32_bytes(&g)),
                (Buffer::InputGrad, bytes_of(n)),
                (Buffer::BiasGrad, bytes_of(width)),
            ]),
        );
        let dy: Vec<f64> = g.iter().map(|&v| round(v as f64)).collect();
        if of == Values::Bf16 {
            assert_close(
                &format!("{name} dy"),
                &decode(&bwd[&Buffer::InputGrad], of),
                &dy,
                of,
                0.0,
            );
        } else {
            assert!(
                bwd[&Buffer::InputGrad].iter().all(|&x| x == 0xFF),
                "{name}: the f32 branch's gradient is the output's own, not written"
            );
        }
        let mut dbias = vec![0f64; width];
        for (i, d) in dy.iter().enumerate() {
            dbias[i % width] += d;
        }
        assert_close(
            &format!("{name} dbias"),
            &decode(&bwd[&Buffer::BiasGrad], of),
            &dbias,
            of,
            1e-5,
        );
    }
}

/// A gradient into its f32 running sum in place (f32, and bf16 widened): the CPU's sums,
/// bit for bit, over a size that is no multiple of a block.
#[test]
fn accumulate_kernels_equal_the_cpu_sums() {
    for of in [Values::F32, Values::Bf16] {
        let n = 1000;
        let sum = values(n, 21);
        let (g_bytes, g) = encode(&values(n, 22), of);
        let out = run(
            &format!("accumulate-{}", of.suffix()),
            &plan::accumulate(of, n),
            &BTreeMap::from([(Buffer::Output, f32_bytes(&sum)), (Buffer::Input, g_bytes)]),
        );
        let want: Vec<f64> = (0..n).map(|i| (sum[i] + g[i] as f32) as f64).collect();
        assert_eq!(decode(&out[&Buffer::Output], Values::F32), want, "{of:?}");
    }
}

/// Decoded bytes normalised into the image tower's input (HWC u8 → CHW f32), over images
/// whose pixels are no multiple of a block: the host's floats (`PixelNorm::extend_chw`,
/// the pipeline's own formula), bit for bit, for every byte value and CLIP's and
/// ImageNet's statistics.
#[test]
fn pixel_normalise_kernel_equals_the_hosts_floats_bit_for_bit() {
    use mmpipe::model::PixelNorm;
    let (images, h, w) = (3, 9, 13);
    // Every byte value, then a fixed pseudo-random rest.
    let bytes: Vec<u8> = (0..images * h * w * 3)
        .map(|i| {
            if i < 256 {
                i as u8
            } else {
                (i * 7919 % 251) as u8
            }
        })
        .collect();
    let norms = [
        PixelNorm {
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
        },
        PixelNorm {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        },
    ];
    for (k, norm) in norms.iter().enumerate() {
        let (scale, shift) = norm.scale_shift();
        let out = run(
            &format!("pixel-normalise-{k}"),
            &plan::pixel_normalise(images, h * w, scale, shift),
            &BTreeMap::from([
                (Buffer::Input, bytes.clone()),
                (Buffer::Output, unwritten(4 * images * 3 * h * w)),
            ]),
        );
        let mut want = Vec::new();
        for image in bytes.chunks_exact(h * w * 3) {
            norm.extend_chw(image, &mut want);
        }
        let got: Vec<u32> = out[&Buffer::Output]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want, "{norm:?}");
    }
}

/// A linear layer's bias add (no residual after it), f32 and bf16, and its bias's
/// gradient, the output's summed over the rows (several chunks of them).
#[test]
fn bias_add_kernels_equal_the_formulas() {
    for (of, rows, width) in [
        (Values::F32, 7, 37),
        (Values::Bf16, 7, 300),
        (Values::Bf16, 600, 3),
    ] {
        let name = format!("bias-add-{}-{rows}x{width}", of.suffix());
        let n = rows * width;
        let (y_bytes, y) = encode(&values(n, 15), of);
        let (b_bytes, b) = encode(&values(width, 16), of);
        let (g_bytes, g) = encode(&values(n, 17), of);
        let bytes_of = |count: usize| unwritten(count * if of == Values::F32 { 4 } else { 2 });
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::bias_add_forward(of, n, width),
            &BTreeMap::from([
                (Buffer::Input, y_bytes),
                (Buffer::Bias, b_bytes),
                (Buffer::Output, bytes_of(n)),
            ]),
        );
        let want: Vec<f64> = (0..n).map(|i| y[i] + b[i % width]).collect();
        assert_close(
            &format!("{name} out"),
            &decode(&fwd[&Buffer::Output], of),
            &want,
            of,
            1e-7,
        );
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::bias_add_backward(of, n, width),
            &BTreeMap::from([
                (Buffer::OutputGrad, g_bytes),
                (Buffer::BiasGrad, bytes_of(width)),
            ]),
        );
        let mut dbias = vec![0f64; width];
        for (i, d) in g.iter().enumerate() {
            dbias[i % width] += d;
        }
        assert_close(
            &format!("{name} dbias"),
            &decode(&bwd[&Buffer::BiasGrad], of),
            &dbias,
            of,
            1e-5,
        );
    }
}

/// Softmax forward and backward over rows of attention's widths (50, 77, 197) and one
/// over the block, f32 and bf16, with a row of −∞ but one entry (a causal mask's first
/// row).
#[test]
fn softmax_kernels_equal_the_formulas() {
    for (of, rows, width) in [
        (Values::F32, 6, 50),
        (Values::F32, 4, 197),
        (Values::Bf16, 5, 77),
        (Values::F32, 2, 1000),
        (Values::Bf16, 2, 300),
    ] {
        let name = format!("softmax-{}-{rows}x{width}", of.suffix());
        let mut raw: Vec<f32> = values(rows * width, 8).iter().map(|v| v * 3.0).collect();
        for v in &mut raw[1..width] {
            *v = f32::NEG_INFINITY;
        }
        let (x_bytes, x) = encode(&raw, of);
        let bytes = x_bytes.len();
        let mut buffers =
            BTreeMap::from([(Buffer::Input, x_bytes), (Buffer::Output, unwritten(bytes))]);
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::softmax_forward(of, rows, width),
            &buffers,
        );
        let mut want = vec![0f64; rows * width];
        for r in 0..rows {
            let row = &x[r * width..(r + 1) * width];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            for i in 0..width {
                want[r * width + i] = (row[i] - max).exp() / sum;
            }
        }
        let y = decode(&fwd[&Buffer::Output], of);
        assert_close(&format!("{name} y"), &y, &want, of, 1e-6);
        assert_eq!(y[0], 1.0, "{name}: the masked row's one entry");

        let (g_bytes, g) = encode(&values(rows * width, 9), of);
        buffers.insert(Buffer::Output, fwd[&Buffer::Output].clone());
        buffers.insert(Buffer::OutputGrad, g_bytes);
        buffers.insert(Buffer::InputGrad, unwritten(bytes));
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::softmax_backward(of, rows, width),
            &buffers,
        );
        // From the probabilities the kernel kept (rounded to bf16 where the values are).
        let mut dx = vec![0f64; rows * width];
        for r in 0..rows {
            let (yr, gr) = (
                &y[r * width..(r + 1) * width],
                &g[r * width..(r + 1) * width],
            );
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for i in 0..width {
                dx[r * width + i] = yr[i] * (gr[i] - dot);
            }
        }
        assert_close(
            &format!("{name} dx"),
            &decode(&bwd[&Buffer::InputGrad], of),
            &dx,
            of,
            1e-6,
        );
    }
}

/// Attention's softmax from raw scores: the scale and an additive mask broadcast over the
/// heads (none; a causal `[1, len, len]`; a padding `[n, 1, len]`; a full `[n, len, len]`),
/// rows of 5, 77 (CLIP's text) and 300 keys; probabilities and the raw scores' gradient.
#[test]
fn attention_softmax_kernels_equal_the_formulas() {
    use plan::MaskStrides;
    for (samples, heads, len, mask) in [
        (2, 3, 5, "none"),
        (1, 2, 77, "causal"),
        (3, 2, 5, "padding"),
        (2, 3, 5, "full"),
        (1, 1, 300, "causal"),
    ] {
        let name = format!("attention-softmax-{samples}x{heads}x{len}-{mask}");
        let rows = samples * heads * len;
        let scale = 1.0 / (len as f32).sqrt();
        let s = values(rows * len, 11)
            .iter()
            .map(|v| v * 4.0)
            .collect::<Vec<f32>>();
        let (mask_dims, mask_values): ((usize, usize), Vec<f32>) = match mask {
            "none" => ((0, 0), Vec::new()),
            "causal" => (
                (1, len),
                (0..len * len)
                    .map(|i| {
                        if i % len > i / len {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            ),
            // Each sample's last keys padded: -inf, and a large finite negative.
            "padding" => (
                (samples, 1),
                (0..samples * len)
                    .map(|i| match (i % len) + (i / len) {
                        k if k > len => f32::NEG_INFINITY,
                        k if k == len => -1e9,
                        _ => 0.0,
                    })
                    .collect(),
            ),
            _ => ((samples, len), values(samples * len * len, 12)),
        };
        let strides = (mask != "none").then(|| MaskStrides {
            sample: if mask_dims.0 > 1 {
                mask_dims.1 * len
            } else {
                0
            },
            query: if mask_dims.1 > 1 { len } else { 0 },
        });
        let mut buffers = BTreeMap::from([
            (Buffer::Input, f32_bytes(&s)),
            (Buffer::Output, unwritten(4 * rows * len)),
        ]);
        if strides.is_some() {
            buffers.insert(Buffer::Mask, f32_bytes(&mask_values));
        }
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::attention_softmax_forward(rows, len, heads, strides, scale),
            &buffers,
        );
        let g = values(rows * len, 13);
        let (mut p, mut ds) = (vec![0f64; rows * len], vec![0f64; rows * len]);
        for r in 0..rows {
            let (query, sample) = (r % len, r / (len * heads));
            let z: Vec<f64> = (0..len)
                .map(|k| {
                    let m = match strides {
                        Some(st) => mask_values[sample * st.sample + query * st.query + k] as f64,
                        None => 0.0,
                    };
                    s[r * len + k] as f64 * scale as f64 + m
                })
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            let pr: Vec<f64> = z.iter().map(|v| (v - max).exp() / sum).collect();
            let dot: f64 = (0..len).map(|k| pr[k] * g[r * len + k] as f64).sum();
            for k in 0..len {
                p[r * len + k] = pr[k];
                ds[r * len + k] = scale as f64 * pr[k] * (g[r * len + k] as f64 - dot);
            }
        }
        assert_close(
            &format!("{name} p"),
            &decode(&fwd[&Buffer::Output], Values::F32),
            &p,
            Values::F32,
            1e-6,
        );
        buffers.insert(Buffer::Output, fwd[&Buffer::Output].clone());
        buffers.insert(Buffer::OutputGrad, f32_bytes(&g));
        buffers.insert(Buffer::InputGrad, unwritten(4 * rows * len));
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::attention_softmax_backward(Values::F32, rows, len, scale),
            &buffers,
        );
        assert_close(
            &format!("{name} ds"),
            &decode(&bwd[&Buffer::InputGrad], Values::F32),
            &ds,
            Values::F32,
            1e-5,
        );
        // The same from the probabilities rounded to bf16 (as attention keeps them for
        // its bf16 GEMMs), the gradient written in bf16: the formula on the rounded values.
        let kernel_p: Vec<f32> = decode(&fwd[&Buffer::Output], Values::F32)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let (p_bf16, pb) = encode(&kernel_p, Values::Bf16);
        buffers.insert(Buffer::Output, p_bf16);
        buffers.insert(Buffer::InputGrad, unwritten(2 * rows * len));
        let bwd = run(
            &format!("{name}-bwd-bf16"),
            &plan::attention_softmax_backward(Values::Bf16, rows, len, scale),
            &buffers,
        );
        let mut ds_rounded = vec![0f64; rows * len];
        for r in 0..rows {
            let row = r * len..(r + 1) * len;
            let dot: f64 = row.clone().map(|i| pb[i] * g[i] as f64).sum();
            for i in row {
                ds_rounded[i] = scale as f64 * pb[i] * (g[i] as f64 - dot);
            }
        }
        assert_close(
            &format!("{name} ds from bf16 probabilities"),
            &decode(&bwd[&Buffer::InputGrad], Values::Bf16),
            &ds_rounded,
            Values::Bf16,
            1e-5,
        );
    }
}

/// Flash attention forward and backward (bf16 packed projections, heads of 64) against
/// the f64 formulas: no mask over 50 positions (one partial tile); CLIP's causal mask over
/// 77 (two tiles); a padding mask over 70 whose third sample has every key masked (its
/// output, log-sum-exp and gradients are 0, +∞ and 0, not NaN); no mask over 130 (three
/// tiles). The output, each query row's log-sum-exp, and the packed gradient.
#[test]
fn flash_attention_kernels_equal_the_formulas() {
    use plan::{MaskStrides, FLASH_HEAD as D};
    for (samples, heads, len, mask) in [
        (2, 2, 50, "none"),
        (1, 2, 77, "causal"),
        (3, 2, 70, "padding"),
        (1, 1, 130, "none"),
    ] {
        let name = format!("flash-attention-{samples}x{heads}x{len}-{mask}");
        let width = heads * D;
        let scale = 1.0 / (D as f32).sqrt();
        let (qkv_bytes, qkv) = encode(&values(samples * len * 3 * width, 21), Values::Bf16);
        let (g_bytes, g) = encode(&values(samples * len * width, 22), Values::Bf16);
        let (strides, mask_values): (Option<MaskStrides>, Vec<f32>) = match mask {
            "none" => (None, Vec::new()),
            "causal" => (
                Some(MaskStrides {
                    sample: 0,
                    query: len,
                }),
                (0..len * len)
                    .map(|i| {
                        if i % len > i / len {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            ),
            // Sample s keeps its first len − 20·s − 3 keys (none, for the last).
            _ => (
                Some(MaskStrides {
                    sample: len,
                    query: 0,
                }),
                (0..samples * len)
                    .map(|i| {
                        let kept = len.saturating_sub(20 * (i / len) + 3).min(len);
                        let kept = if i / len == samples - 1 { 0 } else { kept };
                        if i % len >= kept {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            ),
        };
        let mask_at = |sample: usize, query: usize, key: usize| match strides {
            Some(st) => mask_values[sample * st.sample + query * st.query + key] as f64,
            None => 0.0,
        };
        // The f64 reference.
        let at = |sample: usize, pos: usize, part: usize, head: usize| {
            (sample * len + pos) * 3 * width + part * width + head * D
        };
        let merged =
            |sample: usize, pos: usize, head: usize| (sample * len + pos) * width + head * D;
        let mut out = vec![0f64; samples * len * width];
        let mut lse = vec![0f64; samples * heads * len];
        let mut dqkv = vec![0f64; samples * len * 3 * width];
        let sc = scale as f64;
        for sample in 0..samples {
            for head in 0..heads {
                for query in 0..len {
                    let q = &qkv[at(sample, query, 0, head)..][..D];
                    let z: Vec<f64> = (0..len)
                        .map(|key| {
                            let k = &qkv[at(sample, key, 1, head)..][..D];
                            sc * q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>()
                                + mask_at(sample, query, key)
                        })
                        .collect();
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let row = (sample * heads + head) * len + query;
                    if max == f64::NEG_INFINITY {
                        lse[row] = f64::INFINITY;
                        continue;
                    }
                    let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                    lse[row] = max + sum.ln();
                    let p: Vec<f64> = z.iter().map(|v| (v - max).exp() / sum).collect();
                    let o = merged(sample, query, head);
                    let gq = &g[o..][..D];
                    let dp: Vec<f64> = (0..len)
                        .map(|key| {
                            let v = &qkv[at(sample, key, 2, head)..][..D];
                            gq.iter().zip(v).map(|(a, b)| a * b).sum::<f64>()
                        })
                        .collect();
                    let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for key in 0..len {
                        let ds = p[key] * (dp[key] - delta);
                        for d in 0..D {
                            let (qi, ki, vi) = (
                                at(sample, query, 0, head),
                                at(sample, key, 1, head),
                                at(sample, key, 2, head),
                            );
                            out[o + d] += p[key] * qkv[vi + d];
                            dqkv[qi + d] += sc * ds * qkv[ki + d];
                            dqkv[ki + d] += sc * ds * qkv[qi + d];
                            dqkv[vi + d] += p[key] * g[o + d];
                        }
                    }
                }
            }
        }
        let mut buffers = BTreeMap::from([
            (Buffer::Input, qkv_bytes),
            (Buffer::Output, unwritten(2 * out.len())),
            (Buffer::Stats, unwritten(4 * lse.len())),
        ]);
        if strides.is_some() {
            buffers.insert(Buffer::Mask, f32_bytes(&mask_values));
        }
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::flash_attention_forward(samples, len, heads, strides, scale),
            &buffers,
        );
        assert_close(
            &format!("{name} output"),
            &decode(&fwd[&Buffer::Output], Values::Bf16),
            &out,
            Values::Bf16,
            1e-2,
        );
        let kernel_lse = decode(&fwd[&Buffer::Stats], Values::F32);
        for (i, (got, want)) in kernel_lse.iter().zip(&lse).enumerate() {
            assert!(
                got == want || (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{name} log-sum-exp[{i}]: {got} vs reference {want}"
            );
        }
        buffers.insert(Buffer::Output, fwd[&Buffer::Output].clone());
        buffers.insert(Buffer::Stats, fwd[&Buffer::Stats].clone());
        buffers.insert(Buffer::OutputGrad, g_bytes);
        buffers.insert(Buffer::InputGrad, unwritten(2 * dqkv.len()));
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::flash_attention_backward(samples, len, heads, strides, scale),
            &buffers,
        );
        assert_close(
            &format!("{name} d qkv"),
            &decode(&bwd[&Buffer::InputGrad], Values::Bf16),
            &dqkv,
            Values::Bf16,
            2e-2,
        );
    }
}

/// Embedding lookup and its scatter: a table of 40 rows (a tile and a quarter) and 300
/// columns (two column blocks), 50 ids with repeats, f32 and bf16. The lookup copies rows
/// (an id past the table reads NaN); the scatter sums in token order in f32, so in f32 it
/// is the CPU's scatter bit for bit.
#[test]
fn embedding_kernels_equal_the_cpu_scatter() {
    let (rows, width) = (40usize, 300usize);
    let ids: Vec<u32> = (0..50u32).map(|i| (i * 7 + i / 3) % rows as u32).collect();
    let ids_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    for of in [Values::F32, Values::Bf16] {
        let name = format!("embedding-{}", of.suffix());
        let size = if of == Values::F32 { 4 } else { 2 };
        let (table_bytes, table) = encode(&values(rows * width, 21), of);
        // One id past the table, for the lookup only.
        let mut lookup_ids = ids_bytes.clone();
        lookup_ids[4..8].copy_from_slice(&(rows as u32 + 3).to_le_bytes());
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::embedding_forward(of, rows, width, ids.len()),
            &BTreeMap::from([
                (Buffer::Weight, table_bytes),
                (Buffer::Ids, lookup_ids),
                (Buffer::Output, unwritten(size * ids.len() * width)),
            ]),
        );
        let out = decode(&fwd[&Buffer::Output], of);
        for (p, &id) in ids.iter().enumerate() {
            for j in 0..width {
                let got = out[p * width + j];
                if p == 1 {
                    assert!(got.is_nan(), "{name}: the id past the table reads {got}");
                } else {
                    assert_eq!(got, table[id as usize * width + j], "{name}: out[{p}, {j}]");
                }
            }
        }

        let (g_bytes, g) = encode(&values(ids.len() * width, 22), of);
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::embedding_backward(of, rows, width, ids.len()),
            &BTreeMap::from([
                (Buffer::Ids, ids_bytes.clone()),
                (Buffer::OutputGrad, g_bytes),
                (Buffer::WeightGrad, vec![0xffu8; size * rows * width]),
            ]),
        );
        // The CPU scatter's order, in f32.
        let mut want = vec![0f32; rows * width];
        for (p, &id) in ids.iter().enumerate() {
            for j in 0..width {
                want[id as usize * width + j] += g[p * width + j] as f32;
            }
        }
        let got = decode(&bwd[&Buffer::WeightGrad], of);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let b = match of {
                Values::F32 => *b as f64,
                Values::Bf16 => half::bf16::from_f32(*b).to_f64(),
            };
            assert_eq!(*a, b, "{name}: grad[{}, {}]", i / width, i % width);
        }
    }
}

/// A plan whose arguments do not match the kernel's parameters is refused by name: the
/// emulator's check is live.
#[test]
fn a_launch_out_of_step_with_its_kernel_is_refused() {
    let out = run_job(
        emulator(),
        "bad-job",
        "buffer Input 16 -\nbuffer Output 16 -\nlaunch gelu_fwd_f32 1 1 256 b:Input n b:Output i:4 l:4\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gelu_fwd_f32: argument 3 is an i32, the parameter an i64"),
        "{stderr}"
    );
}

/// The sanitizers watch the emulated kernels' bounds: a kernel that reads one element
/// past its input (a lost `i + 1 < n` guard) stops with a heap-buffer-overflow, and one
/// that writes past a `__shared__` array at the array's bound (UBSan), where without
/// them it would touch a neighbour's bytes and could still pass a result check.
/// MMPIPE_EMULATOR_SANITIZE=0 (for a g++ that cannot link them) turns this check off
/// explicitly; it never goes off by itself.
#[test]
fn the_emulator_stops_a_kernel_reading_past_its_buffer() {
    if std::env::var("MMPIPE_EMULATOR_SANITIZE").is_ok_and(|v| v == "0") {
        eprintln!("MMPIPE_EMULATOR_SANITIZE=0: the emulator's bounds are not checked");
        return;
    }
    assert!(
        sanitizers(),
        "g++ cannot link -fsanitize=address,undefined here; MMPIPE_EMULATOR_SANITIZE=0 runs the kernels without bounds checks"
    );
    let source = r#"
extern "C" __global__ void shift_left(unsigned long long x, unsigned long long y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) ((float*)y)[i] = ((const float*)x)[i + 1];
}
extern "C" __global__ void stage_in_shared(unsigned long long x, unsigned long long y, int n) {
    __shared__ float tile[4];
    const int i = threadIdx.x;
    if (i < n) tile[i] = ((const float*)x)[0];
    __syncthreads();
    if (i < 4) ((float*)y)[i] = tile[i];
}
"#;
    let emulator = build("past-the-end", source);
    // `kernel` over n = `inside` runs; one element further it is stopped: its report.
    let stopped = |kernel: &str, inside: i32| -> String {
        let job = |n: i32| {
            format!("buffer Input 16 -\nbuffer Output 16 -\nlaunch {kernel} 1 1 32 b:Input b:Output i:{n}\n")
        };
        let ran = run_job(&emulator, &format!("{kernel}-inside"), &job(inside));
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let past = run_job(&emulator, &format!("{kernel}-past"), &job(inside + 1));
        assert!(
            !past.status.success(),
            "{kernel} ran past its buffer unstopped"
        );
        String::from_utf8_lossy(&past.stderr).into_owned()
    };
    let stderr = stopped("shift_left", 3);
    assert!(
        stderr.contains("heap-buffer-overflow") && stderr.contains("READ of size 4"),
        "{stderr}"
    );
    assert!(stderr.contains("shift_left"), "{stderr}");
    // And a write past a `__shared__` array.
    let stderr = stopped("stage_in_shared", 4);
    // UBSan sees the array's bound first; ASan's redzone would stop it otherwise.
    assert!(
        stderr.contains("index 4 out of bounds for type 'float [4]'")
            || stderr.contains("global-buffer-overflow"),
        "{stderr}"
    );
}

/// The emulator's `ldmatrix` (kernels.cuh's `ldmatrix_x4`, `_trans`) against the PTX ISA's
/// fragment layout, written out here apart from any kernel that uses it: four 8×8 matrices
/// of 16-bit values, lane l addressing row l % 8 of matrix l / 8; lane l's register i holds
/// matrix i's (row l / 4, columns 2 (l % 4), +1), or, transposed, (rows 2 (l % 4), +1,
/// column l / 4), the lower index in the low half. cp.async's copies land by the wait, or
/// write zeros where the source is not valid. And what a GPU faults on, the emulator stops
/// at, naming it: an ldmatrix row or a cp.async source off a 16-byte boundary.
#[test]
fn the_emulators_ldmatrix_follows_the_ptx_layout_and_alignment_is_checked() {
    let source = format!(
        "{}{}",
        include_str!("../../src/model/fused/kernels.cuh"),
        r#"
template <bool TRANS>
__device__ void load_matrices(unsigned long long x, unsigned long long y, int offset) {
    __shared__ Words4 tile[33];
    const int lane = threadIdx.x;
    tile[lane] = ((const Words4*)x)[lane];
    __syncthreads();
    unsigned r[4];
    const unsigned short* row = (const unsigned short*)tile + 8 * lane + offset;
    if (TRANS) {
        ldmatrix_x4_trans(r, shared_at(row));
    } else {
        ldmatrix_x4(r, shared_at(row));
    }
    for (int i = 0; i < 4; ++i) ((unsigned*)y)[4 * lane + i] = r[i];
}
extern "C" __global__ void matrices(unsigned long long x, unsigned long long y, int offset) {
    load_matrices<false>(x, y, offset);
}
extern "C" __global__ void matrices_trans(unsigned long long x, unsigned long long y, int offset) {
    load_matrices<true>(x, y, offset);
}
extern "C" __global__ void copy_async(unsigned long long x, unsigned long long y, int offset) {
    __shared__ Words4 tile[32];
    const int lane = threadIdx.x;
    cp_async16(shared_at(tile + lane), (const unsigned short*)x + 8 * lane + offset, lane % 3 != 2);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    ((Words4*)y)[lane] = tile[31 - lane];
}
"#
    );
    let emulator = build("ldmatrix", &source);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cuda-emulator")
        .join(format!("ldmatrix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Value v at element v: matrix m's (row i, column j) is 64 m + 8 i + j.
    let input = dir.join("x.in");
    std::fs::write(
        &input,
        // Sixteen bytes more, so that a load one element off stays inside the buffer.
        (0u16..264)
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let job = |kernel: &str, offset: i32, out: &Path| {
        format!(
            "buffer Input 528 {}\nbuffer Output 512 -\nlaunch {kernel} 1 1 32 b:Input b:Output i:{offset}\nwrite Output {}\n",
            input.display(),
            out.display()
        )
    };
    for (kernel, transposed) in [("matrices", false), ("matrices_trans", true)] {
        let out = dir.join(format!("{kernel}.out"));
        let ran = run_job(&emulator, kernel, &job(kernel, 0, &out));
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let words: Vec<u32> = std::fs::read(&out)
            .unwrap()
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for lane in 0..32u32 {
            for m in 0..4u32 {
                let at = |i: u32, j: u32| 64 * m + 8 * i + j;
                let (lo, hi) = if transposed {
                    (
                        at(2 * (lane % 4), lane / 4),
                        at(2 * (lane % 4) + 1, lane / 4),
                    )
                } else {
                    (
                        at(lane / 4, 2 * (lane % 4)),
                        at(lane / 4, 2 * (lane % 4) + 1),
                    )
                };
                assert_eq!(
                    words[(4 * lane + m) as usize],
                    lo | (hi << 16),
                    "{kernel}: lane {lane}, matrix {m}"
                );
            }
        }
        let misaligned = run_job(&emulator, kernel, &job(kernel, 1, &out));
        let stderr = String::from_utf8_lossy(&misaligned.stderr);
        assert!(
            !misaligned.status.success()
                && stderr.contains("an ldmatrix row")
                && stderr.contains("not 16-byte aligned"),
            "{kernel} one element off its row's boundary: {stderr}"
        );
    }
    // cp.async: lane l's 16 bytes into shared row l (zeros where `valid` is false, every
    // third lane), read back by lane 31 − l after the wait and a barrier: the bytes land by
    // then in both schedules (at once in one, at the wait in the other).
    let input_bytes = std::fs::read(&input).unwrap();
    for order in ["forward", "reversed"] {
        let out = dir.join(format!("copy-async-{order}.out"));
        let body = format!("schedule {order}\n{}", job("copy_async", 0, &out));
        let ran = run_job(&emulator, &format!("copy-async-{order}"), &body);
        assert!(
            ran.status.success(),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let got = std::fs::read(&out).unwrap();
        for lane in 0..32 {
            let row = 31 - lane;
            let want: &[u8] = if row % 3 == 2 {
                &[0; 16]
            } else {
                &input_bytes[16 * row..16 * row + 16]
            };
            assert_eq!(
                &got[16 * lane..16 * lane + 16],
                want,
                "{order}: lane {lane}"
            );
        }
    }
    let misaligned = run_job(
        &emulator,
        "copy_async",
        &job("copy_async", 2, &dir.join("x.out")),
    );
    let stderr = String::from_utf8_lossy(&misaligned.stderr);
    assert!(
        !misaligned.status.success() && stderr.contains("a cp.async source"),
        "a cp.async 4 bytes off a 16-byte boundary: {stderr}"
    );
}

/// The one-launch sum of squares of the gradients (`grad_norm.cu`), launched as
/// `optim::cuda::sum_of_squares` launches it (`optim::plan::norm_launch`), against the sum
/// in f64: sizes around its 4096-element blocks, an empty tensor among them, fresh random
/// values; every partial written (the buffer starts as NaNs), and in both schedules the
/// same bits. A NaN or an infinity in one tensor makes the sum NaN or infinite.
#[test]
fn the_grad_norm_kernel_equals_the_f64_sum_of_squares() {
    use mmpipe::train::optim::plan as optim;
    let sizes = [1usize, 4095, 0, 4096, 4097, 3 * 4096 + 7, 5];
    for poison in [None, Some(f32::NAN), Some(f32::INFINITY)] {
        let tensors: Vec<Vec<f32>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| values(n, 90 + i as u64))
            .map(|mut v| {
                if let (Some(p), Some(x)) = (poison, v.get_mut(4000)) {
                    *x = p;
                }
                v
            })
            .collect();
        let launch = optim::norm_launch(&sizes).unwrap();
        assert_eq!(
            launch.descriptors.len(),
            sizes.len() - 1,
            "the empty tensor is left out"
        );
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("cuda-emulator")
            .join(format!("grad-norm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut body = String::new();
        for (i, t) in tensors.iter().enumerate() {
            let path = dir.join(format!("g{i}.in"));
            std::fs::write(&path, f32_bytes(t)).unwrap();
            body.push_str(&format!("buffer g{i} {} {}\n", 4 * t.len(), path.display()));
        }
        let path = dir.join("partials.in");
        std::fs::write(&path, unwritten(4 * launch.blocks)).unwrap();
        body.push_str(&format!(
            "buffer partials {} {}\n",
            4 * launch.blocks,
            path.display()
        ));
        body.push_str("addresses d");
        for d in &launch.descriptors {
            for field in d {
                body.push_str(&match *field {
                    optim::Field::Gradient(i) => format!(" b:g{i}"),
                    optim::Field::Value(v) => format!(" v:{v}"),
                    other => panic!("{other:?} in a norm descriptor"),
                });
            }
        }
        body.push_str(&format!(
            "\nlaunch {} {} 1 {} b:d i:{} b:partials\n",
            optim::NORM_KERNEL,
            launch.blocks,
            optim::NORM_THREADS,
            launch.descriptors.len()
        ));
        let outputs = in_both_schedules(
            adamw_emulator(),
            "grad-norm",
            &dir,
            &body,
            &["partials".into()],
        );
        let partials: Vec<f32> = outputs[0]
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(partials.len(), launch.blocks);
        let got = optim::sum_partials(&partials);
        let want: f64 = tensors
            .iter()
            .flatten()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum();
        match poison {
            None => {
                assert!(
                    partials.iter().all(|p| p.is_finite()),
                    "a partial left unwritten"
                );
                let rel = (got - want).abs() / want;
                assert!(rel < 1e-6, "sum of squares {got} against {want}: {rel:e}");
            }
            Some(p) if p.is_nan() => assert!(got.is_nan(), "{got}"),
            Some(_) => assert_eq!(got, f64::INFINITY),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The one-launch AdamW kernel (`adamw.cu`), launched as `optim::cuda` launches it
/// (`optim::plan`), against the CPU AdamW on the same tensors: sizes around its
/// 4096-element chunks, a scalar, decayed and undecayed, with bf16 working copies; three
/// steps. Masters, both moments and the working copies equal bit for bit: the kernel runs
/// the CPU path's operations in its order, with its f32 scalars, and no fused
/// multiply-adds (as NVRTC compiles it, `--fmad=false`).
#[test]
fn the_adamw_kernel_equals_the_cpu_adamw_bit_for_bit() {
    use candle_core::{DType, Device, Tensor};
    use mmpipe::model::{Init, ParamBuilder};
    use mmpipe::train::optim::{decays, plan as adamw, AdamW, AdamWConfig};

    const CFG: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let pb = ParamBuilder::mixed(11, DType::BF16, DType::F32, &Device::Cpu);
    for (name, shape) in [
        ("a.logit_scale", &[][..]),
        ("b.bias", &[5]),
        ("c.weight", &[64, 64]),
        ("d.weight", &[4097]),
        ("e.bias", &[4095]),
        ("f.weight", &[30, 700]),
        ("g.ln_1.weight", &[8193]),
    ] {
        pb.get(shape, name, Init::Normal(0.3)).unwrap();
    }
    let (masters, working) = (pb.masters(), pb.params());
    let names = masters.names();
    let copy_of = |name: &str| {
        let master = masters.get(name).unwrap();
        working.get(name).filter(|w| w.id() != master.id())
    };
    let tensors: Vec<adamw::Tensor> = masters
        .iter()
        .map(|(name, var)| adamw::Tensor {
            elements: var.elem_count(),
            decays: decays(name, var),
            working_copy: copy_of(name).is_some(),
        })
        .collect();
    assert!(tensors.iter().any(|t| t.working_copy) && tensors.iter().any(|t| !t.decays));
    let bytes_f32 = |t: &Tensor| -> Vec<u8> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    let bytes_bf16 = |t: &Tensor| -> Vec<u8> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect()
    };

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cuda-emulator")
        .join(format!("adamw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut job = String::new();
    let buffer = |job: &mut String, id: String, bytes: &[u8]| {
        let path = dir.join(format!("{id}.in"));
        std::fs::write(&path, bytes).unwrap();
        job.push_str(&format!("buffer {id} {} {}\n", bytes.len(), path.display()));
    };
    for (i, (name, var)) in masters.iter().enumerate() {
        let zeros = vec![0u8; 4 * var.elem_count()];
        buffer(&mut job, format!("w{i}"), &bytes_f32(var.as_tensor()));
        buffer(&mut job, format!("m{i}"), &zeros);
        buffer(&mut job, format!("v{i}"), &zeros);
        if let Some(copy) = copy_of(name) {
            buffer(&mut job, format!("c{i}"), &bytes_bf16(copy.as_tensor()));
        }
    }
    let mut optimizer = AdamW::with_working_copies(&masters, &working, CFG).unwrap();
    for (step, lr) in [3e-3, 1e-2, 5e-4].into_iter().enumerate() {
        let grads: Vec<Tensor> = masters
            .iter()
            .enumerate()
            .map(|(i, (_, var))| {
                let g: Vec<f32> = values(var.elem_count(), 100 + (10 * step + i) as u64)
                    .iter()
                    .map(|v| v * (step + 1) as f32)
                    .collect();
                Tensor::from_vec(g, var.shape(), &Device::Cpu).unwrap()
            })
            .collect();
        for (i, g) in grads.iter().enumerate() {
            buffer(&mut job, format!("g{step}.{i}"), &bytes_f32(g));
        }
        // The update's bias corrections, as AdamW::step computes them.
        let t = (step + 1) as i32;
        let (bias1, bias2) = (1.0 - CFG.beta1.powi(t), 1.0 - CFG.beta2.powi(t));
        let launch = adamw::launch(&tensors, CFG, bias1, bias2, lr).unwrap();
        job.push_str(&format!("addresses d{step}"));
        for d in &launch.descriptors {
            for field in d {
                job.push_str(&match *field {
                    adamw::Field::Master(i) => format!(" b:w{i}"),
                    adamw::Field::FirstMoment(i) => format!(" b:m{i}"),
                    adamw::Field::SecondMoment(i) => format!(" b:v{i}"),
                    adamw::Field::Gradient(i) => format!(" b:g{step}.{i}"),
                    adamw::Field::WorkingCopy(i) => format!(" b:c{i}"),
                    adamw::Field::Null => " v:0".into(),
                    adamw::Field::Value(v) => format!(" v:{v}"),
                });
            }
        }
        job.push_str(&format!(
            "\nlaunch {} {} 1 {} b:d{step} i:{}",
            adamw::KERNEL,
            launch.blocks,
            adamw::THREADS,
            launch.descriptors.len()
        ));
        for s in launch.scalars {
            job.push_str(&format!(" f:{:x}", s.to_bits()));
        }
        job.push('\n');
        optimizer.step(&grads, lr).unwrap();
    }
    for (i, (name, _)) in masters.iter().enumerate() {
        for b in ["w", "m", "v"] {
            job.push_str(&format!(
                "write {b}{i} {}\n",
                dir.join(format!("{b}{i}.out")).display()
            ));
        }
        if copy_of(name).is_some() {
            job.push_str(&format!(
                "write c{i} {}\n",
                dir.join(format!("c{i}.out")).display()
            ));
        }
    }
    std::fs::write(dir.join("job"), &job).unwrap();
    let out = std::process::Command::new(adamw_emulator())
        .arg(dir.join("job"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let state: BTreeMap<String, Tensor> = optimizer.state(&names).unwrap().into_iter().collect();
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    for (i, (name, var)) in masters.iter().enumerate() {
        assert_eq!(
            read(&format!("w{i}.out")),
            bytes_f32(var.as_tensor()),
            "{name}: master"
        );
        let m = &state[&format!("optimizer.m.{name}")];
        let v = &state[&format!("optimizer.v.{name}")];
        assert_eq!(
            read(&format!("m{i}.out")),
            bytes_f32(m),
            "{name}: first moment"
        );
        assert_eq!(
            read(&format!("v{i}.out")),
            bytes_f32(v),
            "{name}: second moment"
        );
        if let Some(copy) = copy_of(name) {
            assert_eq!(
                read(&format!("c{i}.out")),
                bytes_bf16(copy.as_tensor()),
                "{name}: working copy"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
