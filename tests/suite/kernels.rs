//! The fused ops' CUDA kernels (src/model/fused/*.cu) on the CPU emulator
//! (tests/cuda-emulator/), launched by the very plans `fused::cuda` launches on a GPU
//! (`fused::plan`), against an f64 reference written here from the formulas: on any
//! machine with g++, before a GPU runs them. Each argument's type is checked against the
//! kernel's parameter, so a launch sequence out of step with a signature fails here.
//!
//! The GPU workbench (`fused::cuda::`, scripts/gpu-check.sh) checks the same kernels on
//! the device and times them; this one checks their logic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mmpipe::model::fused::plan::{self, Arg, Buffer, Gelu, Plan, Values};

/// The emulator built once per test run: the kernels' source and the list of their entry
/// points beside it.
fn emulator() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernels.cu"), plan::SOURCE).unwrap();
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
        assert!(names.len() >= 10, "{names:?}");
        let registry: String = names.iter().map(|n| format!("KERNEL({n})\n")).collect();
        std::fs::write(dir.join("registry.inc"), registry).unwrap();
        let binary = dir.join("emulator");
        let out = std::process::Command::new("g++")
            .args(["-std=c++20", "-O1", "-I"])
            .arg(&dir)
            .arg("-I")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda-emulator"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda-emulator/harness.cpp"))
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
    })
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
        job.push_str(&format!("launch {} {} {}", l.kernel, l.grid.0, l.grid.1));
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
    for b in all.keys() {
        job.push_str(&format!(
            "write {} {}\n",
            id(b),
            dir.join(format!("{}.out", id(b))).display()
        ));
    }
    std::fs::write(dir.join("job"), job).unwrap();
    let out = std::process::Command::new(emulator())
        .arg(dir.join("job"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = all
        .keys()
        .map(|b| {
            (
                *b,
                std::fs::read(dir.join(format!("{}.out", id(b)))).unwrap(),
            )
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    result
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
/// over one (300: the strided loops), and enough rows for chunks of two rows.
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
            (Buffer::Output, vec![0u8; 4 * rows * width]),
            (Buffer::Stats, vec![0u8; 8 * rows]),
        ]);
        let fwd = run(
            &format!("{name}-fwd"),
            &plan::layer_norm_forward(of, rows, width, eps),
            &buffers,
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
        buffers.insert(Buffer::InputGrad, vec![0u8; encode(&raw, of).0.len()]);
        buffers.insert(Buffer::WeightGrad, vec![0u8; 4 * width]);
        buffers.insert(Buffer::BiasGrad, vec![0u8; 4 * width]);
        let bwd = run(
            &format!("{name}-bwd"),
            &plan::layer_norm_backward(of, rows, width),
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
            &plan::layer_norm_backward(of, rows, width),
            &buffers,
        );
        assert_eq!(
            again[&Buffer::WeightGrad],
            bwd[&Buffer::WeightGrad],
            "{name}: dw bits"
        );
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
        let bytes_of = |count: usize| vec![0u8; count * if of == Values::F32 { 4 } else { 2 }];
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
            BTreeMap::from([(Buffer::Input, x_bytes), (Buffer::Output, vec![0u8; bytes])]);
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
        buffers.insert(Buffer::InputGrad, vec![0u8; bytes]);
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

/// A plan whose arguments do not match the kernel's parameters is refused by name: the
/// emulator's check is live.
#[test]
fn a_launch_out_of_step_with_its_kernel_is_refused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emulator");
    let _ = emulator();
    let job = dir.join(format!("bad-job-{}", std::process::id()));
    std::fs::write(
        &job,
        "buffer Input 16 -\nbuffer Output 16 -\nlaunch gelu_fwd_f32 1 1 b:Input n b:Output i:4 l:4\n",
    )
    .unwrap();
    let out = std::process::Command::new(emulator())
        .arg(&job)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gelu_fwd_f32: argument 3 is an i32, the parameter an i64"),
        "{stderr}"
    );
}
