use std::collections::HashMap;
use std::time::Duration;

use mmpipe::comm::rendezvous::{first_slurm_host, join, LaunchEnv, DEFAULT_PORT};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

#[test]
fn launcher_variables_are_read_from_torchrun_and_slurm() {
    let env = LaunchEnv::from_vars(vars(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29400"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            env.rank,
            env.world_size,
            env.local_rank,
            env.master_addr.as_str(),
            env.master_port
        ),
        (3, 8, 1, "10.0.0.1", 29400)
    );
    assert_eq!(env.launcher, "torchrun");
    let env = LaunchEnv::from_vars(vars(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODELIST", "gpu[07-10,12],login1"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        (
            env.rank,
            env.world_size,
            env.local_rank,
            env.master_addr.as_str(),
            env.master_port
        ),
        (5, 16, 1, "gpu07", DEFAULT_PORT)
    );
    assert_eq!(env.launcher, "slurm");
    // No launcher: a single-process run.
    assert_eq!(LaunchEnv::from_vars(vars(&[])).unwrap(), None);
    // Bad values are errors naming the variable.
    for (pairs, needle) in [
        (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK"),
        (vec![("RANK", "0"), ("WORLD_SIZE", "2")], "MASTER_ADDR"),
        (
            vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
            "MASTER_PORT",
        ),
        (
            vec![
                ("RANK", "2"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "1"),
            ],
            "rank 2 is not a rank of a world of 2",
        ),
        (vec![("RANK", "0")], "WORLD_SIZE"),
        (
            vec![("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
            "SLURM_NODELIST",
        ),
    ] {
        let err = LaunchEnv::from_vars(vars(&pairs)).unwrap_err().to_string();
        assert!(err.contains(needle), "{pairs:?}: {err}");
    }
}

#[test]
fn the_first_host_of_a_slurm_node_list() {
    for (list, first) in [
        ("node01", "node01"),
        ("node[03-05,07],gpu1", "node03"),
        ("a1,b[1-2]", "a1"),
        ("gpu[12]", "gpu12"),
    ] {
        assert_eq!(first_slurm_host(list).unwrap(), first, "{list}");
    }
    for bad in ["", "node[", "node[x-2]"] {
        assert!(first_slurm_host(bad).is_err(), "{bad}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env(rank: usize, world: usize, port: u16) -> LaunchEnv {
    LaunchEnv {
        rank,
        world_size: world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: "torchrun",
        secret: Some("the run's secret".into()),
    }
}

/// Runs one rendezvous with a thread per rank; `config_hash(rank)` and `present(rank)`
/// pick each rank's job and whether it shows up.
fn rendezvous(
    world: usize,
    config_hash: impl Fn(usize) -> u64 + Sync,
    present: impl Fn(usize) -> bool + Sync,
    timeout: Duration,
) -> Vec<Option<mmpipe::Result<mmpipe::comm::rendezvous::Rendezvous>>> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (config_hash, present) = (&config_hash, &present);
                s.spawn(move || {
                    present(rank).then(|| {
                        let shared = if rank == 0 {
                            vec![("world".to_string(), vec![1, 2, 3])]
                        } else {
                            Vec::new()
                        };
                        join(
                            &env(rank, world, port),
                            7,
                            config_hash(rank),
                            shared,
                            timeout,
                        )
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn every_rank_joins_and_gets_rank_zeros_values() {
    let results = rendezvous(4, |_| 42, |_| true, Duration::from_secs(20));
    for (rank, r) in results.into_iter().enumerate() {
        let r = r.unwrap().unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert_eq!(r.get("world"), Some(&[1u8, 2, 3][..]), "rank {rank}");
        assert_eq!(r.joins.len(), 4);
        assert!(r.joins.iter().enumerate().all(|(i, j)| j.rank == i));
    }
}

#[test]
fn a_rank_with_another_config_is_refused_with_both_hashes() {
    let results = rendezvous(
        3,
        |rank| if rank == 2 { 0xbad } else { 0x600d },
        |_| true,
        Duration::from_secs(20),
    );
    for (rank, r) in results.into_iter().enumerate() {
        let err = r.unwrap().unwrap_err().to_string();
        assert!(
            err.contains("config hash 000000000000600d")
                && err.contains("0000000000000bad")
                && err.contains("rank 2"),
            "rank {rank}: {err}"
        );
    }
}

#[test]
fn a_missing_rank_times_out_with_its_number() {
    let results = rendezvous(3, |_| 1, |rank| rank != 2, Duration::from_secs(2));
    let lead = results[0]
        .as_ref()
        .unwrap()
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(
        lead.contains("rank 2 of 3 did not join within 2 s"),
        "{lead}"
    );
    // The rank that did join is told why, instead of hanging.
    let other = results[1]
        .as_ref()
        .unwrap()
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(other.contains("rank 2 of 3 did not join"), "{other}");
}

#[test]
fn a_rank_without_rank_zero_gives_up_naming_the_address() {
    let port = free_port();
    let err = join(&env(1, 2, port), 1, 1, Vec::new(), Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("rank 1 of 2"),
        "{err}"
    );
}

/// Waits until something listens on 127.0.0.1:`port` (rank 0's thread has bound it).
fn wait_for_listener(port: u16) {
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed().as_secs() < 10, "rank 0 never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a stranger got back before the connection closed (at most 64 KiB, 5 s).
fn drain(mut s: std::net::TcpStream) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || got.len() > 65536 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Garbage, a line that never ends, 4 MB of junk, a client that sends a byte every 300 ms,
/// and fake rank 1s (an unsigned join, one signed with another secret) all hit rank 0
/// before the real ranks: none of them aborts or delays the run, each gets nothing but
/// the greeting, and the real ranks meet.
#[test]
fn strangers_on_the_port_change_nothing() {
    use std::io::Write;
    let port = free_port();
    let world = 3;
    std::thread::scope(|s| {
        let lead = s.spawn(move || {
            join(
                &env(0, world, port),
                7,
                9,
                vec![("nccl/world".into(), vec![4, 2])],
                Duration::from_secs(30),
            )
        });
        wait_for_listener(port);
        let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut strangers = Vec::new();
        // Garbage.
        let mut c = connect();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        strangers.push(s.spawn(move || drain(c)));
        // A line that never ends, left open.
        let mut c = connect();
        c.write_all(&[b'{'; 1000]).unwrap();
        strangers.push(s.spawn(move || drain(c)));
        // 4 MB of junk without a newline.
        let mut c = connect();
        strangers.push(s.spawn(move || {
            let _ = c.write_all(&vec![b'x'; 4 << 20]);
            drain(c)
        }));
        // A slow drip: one byte every 300 ms, for longer than the join deadline.
        let mut c = connect();
        strangers.push(s.spawn(move || {
            for _ in 0..40 {
                if c.write_all(b"{").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            drain(c)
        }));
        // Fake rank 1s: a well-formed join without the secret, and one with another.
        let fake = |secret: &str| {
            let mut other = env(1, world, port);
            other.secret = Some(secret.into());
            other
        };
        let mut c = connect();
        strangers.push(s.spawn(move || {
            let _ = c.write_all(
                b"{\"join\": \"{\\\"rank\\\": 1, \\\"world_size\\\": 3, \\\"topology_hash\\\": 7, \\\"config_hash\\\": 9, \\\"host\\\": \\\"x\\\"}\", \"nonce\": \"00\", \"mac\": \"00\"}\n",
            );
            drain(c)
        }));
        let impostor =
            s.spawn(move || join(&fake("a guess"), 7, 9, Vec::new(), Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(500));
        // The real ranks.
        let real: Vec<_> = (1..world)
            .map(|rank| {
                s.spawn(move || {
                    join(
                        &env(rank, world, port),
                        7,
                        9,
                        Vec::new(),
                        Duration::from_secs(30),
                    )
                })
            })
            .collect();
        for (rank, r) in real.into_iter().enumerate() {
            let r = r
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("rank {}: {e}", rank + 1));
            assert_eq!(r.get("nccl/world"), Some(&[4u8, 2][..]));
        }
        let lead = lead.join().unwrap().expect("rank 0 met its ranks");
        assert_eq!(lead.joins.len(), world);
        for (i, st) in strangers.into_iter().enumerate() {
            let got = st.join().unwrap();
            assert!(
                !got.contains("nccl") && !got.contains("hash") && !got.contains("reply"),
                "stranger {i} was told: {got}"
            );
        }
        let err = impostor.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("MMPIPE_RUN_SECRET"), "{err}");
    });
}

/// A rank takes NCCL ids from the real rank 0 only: a process on the port that answers
/// without the run's secret is not believed.
#[test]
fn a_rank_does_not_believe_an_answer_without_the_secret() {
    use std::io::{BufRead, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut s = stream;
            let _ = s.write_all(b"{\"nonce\": \"0011\"}\n");
            let mut line = String::new();
            let _ = std::io::BufReader::new(&s).read_line(&mut line);
            let reply = r#"{"Ready":{"joins":[],"shared":[["nccl/world",[6,6,6]]]}}"#;
            let forged = serde_json::json!({"reply": reply, "mac": "00".repeat(32)});
            let _ = writeln!(s, "{forged}");
        }
    });
    let err = join(&env(1, 2, port), 1, 1, Vec::new(), Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("answered without this run's secret"), "{err}");
}

/// Rank 0 listens on MASTER_ADDR's address only, not on every interface.
#[test]
fn rank_0_listens_on_master_addr_only() {
    let port = free_port();
    std::thread::scope(|s| {
        let lead =
            s.spawn(move || join(&env(0, 2, port), 1, 1, Vec::new(), Duration::from_secs(3)));
        wait_for_listener(port);
        // 127.0.0.2 is this host too, but not the address rank 0 was told to serve.
        assert!(std::net::TcpStream::connect(("127.0.0.2", port)).is_err());
        let _ = lead.join();
    });
}
