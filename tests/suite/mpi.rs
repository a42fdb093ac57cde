//! Ranks as processes under mpirun (feature `mpi`): the collectives and the global losses
//! against serial answers and one device, training through scripts/launch.sh against the
//! single-process thread run, and a killed rank stopping the run.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn mpirun_flags() -> Vec<&'static str> {
    let mut flags = vec!["--oversubscribe", "--mca", "btl", "self,tcp"];
    if is_root() {
        flags.insert(0, "--allow-run-as-root");
    }
    flags
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// `target/<profile>/examples/NAME`, beside this test binary's `deps/`.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name)
}

#[test]
fn mpi_collectives_and_losses_match_serial_answers_and_one_device() {
    for np in ["3", "4"] {
        let out: Output = Command::new("mpirun")
            .args(mpirun_flags())
            .args(["-np", np])
            .arg(example("mpi_check"))
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .expect("mpirun runs (apt install openmpi-bin)");
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("all checks passed"),
            "np {np}:\n{stdout}\n{}",
            text(&out.stderr)
        );
        // Every check ran: six collectives on the world and the groups (bf16 sums among them),
        // 2 losses x 2 schemes x 2 tilings.
        assert!(stdout.matches("ok   ").count() >= 2 * 6 + 16, "{stdout}");
    }
}

/// `mmpipe ARGS --metrics METRICS` started by scripts/launch.sh over MPI, with `hosts` as
/// its host file (written into `dir`).
fn train_over_mpi(
    dir: &std::path::Path,
    hosts: &str,
    args: &[&str],
    metrics: &std::path::Path,
) -> std::process::Output {
    let hostfile = dir.join("hosts.txt");
    std::fs::write(&hostfile, hosts).unwrap();
    Command::new("bash")
        .args([
            "scripts/launch.sh",
            "--hostfile",
            hostfile.to_str().unwrap(),
            "--backend",
            "mpi",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_mmpipe"))
        .args(args)
        .args(["--metrics", metrics.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// scripts/launch.sh with a host file of two "nodes" on loopback starts three MPI ranks;
/// 20 steps give the losses of the single-process thread run, bit for bit (the MPI
/// backend sums in rank order, as the thread backend does).
#[test]
fn launch_script_trains_over_mpi_like_the_thread_run() {
    let dir = std::env::temp_dir().join(format!("mmpipe-launch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let common = [
        "train",
        "--topology",
        "topology/cpu-2x1.toml",
        "--steps",
        "20",
        "--batch",
        "12",
        "--eval-pairs",
        "12",
        "--quiet",
    ];
    let threads = dir.join("threads.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_mmpipe"))
        .args(common)
        .args(["--metrics", threads.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let thread_stdout = text(&out.stdout);
    let processes = dir.join("processes.jsonl");
    let out = train_over_mpi(
        &dir,
        "localhost slots=2\n127.0.0.1 slots=1  # a second 'node'\n",
        &common,
        &processes,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("as processes (MPI)"), "{stdout}");
    let (a, b) = (
        super::common::metric_losses(&threads),
        super::common::metric_losses(&processes),
    );
    assert_eq!(a.len(), 20);
    assert_eq!(a, b, "thread run vs MPI processes");
    // Rank 0 evaluates, as the thread run does: the same scores.
    let eval = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("held-out evaluation"))
            .map(str::to_string)
    };
    assert_eq!(eval(&stdout), eval(&thread_stdout), "{stdout}");
    assert!(eval(&stdout).is_some(), "{stdout}");
}

/// Starts a long 3-rank MPI training run through scripts/launch.sh (extra `train` flags
/// appended) and returns once it has written a few steps' metrics.
fn start_long_run(name: &str, extra: &[&str]) -> (std::process::Child, PathBuf) {
    let dir = std::env::temp_dir().join(format!("mmpipe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hosts = dir.join("hosts.txt");
    std::fs::write(&hosts, "localhost slots=3\n").unwrap();
    let metrics = dir.join("m.jsonl");
    let child = Command::new("bash")
        .args([
            "scripts/launch.sh",
            "--hostfile",
            hosts.to_str().unwrap(),
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_mmpipe"))
        .args([
            "train",
            "--topology",
            "topology/cpu-2x1.toml",
            "--steps",
            "100000",
            "--batch",
            "12",
            "--quiet",
            "--metrics",
            metrics.to_str().unwrap(),
        ])
        .args(extra)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (child, metrics)
}

/// Killing one rank mid-run stops the others within 60 s, and the failure names it.
#[test]
fn a_killed_rank_stops_the_run_naming_it() {
    let (child, metrics) = start_long_run("kill", &[]);
    let rank_one = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            has(&environ, b"OMPI_COMM_WORLD_RANK=1\0")
                && has(&cmdline, metrics.to_str().unwrap().as_bytes())
        })
        .expect("rank 1's process");
    let killed = Instant::now();
    Command::new("kill")
        .args(["-9", &rank_one.to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let waited = killed.elapsed();
    assert!(
        waited < Duration::from_secs(60),
        "the others ran on for {waited:?}"
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr) + &text(&out.stdout);
    assert!(stderr.contains("rank 1"), "{stderr}");
}

/// A rank that hangs (alive, but never reaching the collective): the others' watchdog
/// aborts the run after the configured time, naming the collective and its group.
#[test]
fn a_hanging_rank_is_caught_by_the_collective_timeout() {
    let started = Instant::now();
    let out = Command::new("mpirun")
        .args(mpirun_flags())
        .args(["-np", "3", "-x", "MPI_CHECK_STALL=1"])
        .arg(example("mpi_check"))
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(!out.status.success());
    assert!(elapsed < Duration::from_secs(40), "took {elapsed:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("collective `barrier` in group `world` did not complete within 2 s"),
        "{stderr}"
    );
}

/// SIGTERM to the launcher: mpirun would end the job at once, so launch.sh passes the
/// request on as SIGUSR1; every rank finishes its step, they checkpoint together, and the
/// run exits 0.
#[test]
fn sigterm_to_the_launcher_checkpoints_every_rank_and_exits_cleanly() {
    let checkpoints =
        std::env::temp_dir().join(format!("mmpipe-mpi-stop-ck-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&checkpoints);
    let (child, _) = start_long_run(
        "mpi-stop",
        &[
            "--eval-pairs",
            "0",
            "--checkpoint-dir",
            checkpoints.to_str().unwrap(),
        ],
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let step = super::common::stopped_after_step(&stdout);
    let latest = std::fs::read_to_string(checkpoints.join("latest")).unwrap();
    assert_eq!(latest, format!("step-{step:08}"));
    for part in ["image.safetensors", "text.safetensors", "state.json"] {
        assert!(checkpoints.join(&latest).join(part).is_file(), "{part}");
    }
}

/// On storage each node sees on its own (node-local, or stale), ranks can find different
/// saves under one name: here each rank's node holds a `step-00000004` of another run.
/// They check each candidate together and stop, naming the rank that sees another save,
/// instead of resuming from two different states.
#[test]
fn ranks_that_see_different_saves_stop_naming_them() {
    let base = std::env::temp_dir().join(format!("mmpipe-mpi-saves-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let bin = env!("CARGO_BIN_EXE_mmpipe");
    let topology = std::fs::canonicalize("topology/cpu-1x1.toml").unwrap();
    let args = |steps: &str| {
        format!(
            "train --topology {} --steps {steps} --batch 8 --quiet --eval-pairs 0 \
             --checkpoint-dir ckpt --checkpoint-every 2",
            topology.display()
        )
    };
    // Two runs with the same settings, one per "node": two run ids, two saves of step 4.
    for node in ["node0", "node1"] {
        let dir = base.join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new(bin)
            .current_dir(&dir)
            .args(args("4").split(' '))
            .env("RAYON_NUM_THREADS", "1")
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = Command::new("mpirun")
        .args(mpirun_flags())
        .args(["-np", "2", "sh", "-c"])
        .arg(format!(
            "cd {}/node$OMPI_COMM_WORLD_RANK && exec {bin} {} --resume latest --backend mpi",
            base.display(),
            args("6")
        ))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the ranks see different saves") && stderr.contains("rank 1 (step 4"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&base);
}

/// Layouts whose processes hold both towers over MPI: each process joins the world and
/// the group of every tower it holds (split with the file's group order as the key).
/// cpu-dp2 on two processes and a hybrid on three (image on all, text on the last two,
/// listed out of world order) give their thread runs' losses bit for bit.
#[test]
fn data_parallel_and_hybrid_layouts_train_over_mpi_like_their_thread_runs() {
    let dir = std::env::temp_dir().join(format!("mmpipe-mpi-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let hybrid = dir.join("hybrid.toml");
    std::fs::write(
        &hybrid,
        "device = \"cpu\"\n[[nodes]]\nname = \"h\"\ndevices = 3\n[groups]\nimage = [\"h:0-2\"]\ntext = [\"h:2\", \"h:1\"]\n",
    )
    .unwrap();
    for (topology, ranks) in [("topology/cpu-dp2.toml", 2), (hybrid.to_str().unwrap(), 3)] {
        let common = [
            "train",
            "--topology",
            topology,
            "--steps",
            "6",
            "--batch",
            "11",
            "--eval-pairs",
            "0",
            "--quiet",
        ];
        let threads = dir.join("threads.jsonl");
        let out = Command::new(env!("CARGO_BIN_EXE_mmpipe"))
            .args(common)
            .args(["--metrics", threads.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let processes = dir.join("processes.jsonl");
        let hosts = format!("localhost slots={ranks}\n");
        let out = train_over_mpi(&dir, &hosts, &common, &processes);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        let (a, b) = (
            super::common::metric_losses(&threads),
            super::common::metric_losses(&processes),
        );
        assert_eq!(a.len(), 6, "{topology}");
        assert_eq!(a, b, "{topology}: thread run vs MPI processes");
    }
}
