//! Every parser of outside input against arbitrary and mutated input (proptest): it
//! answers, with a value or an error, and never panics, hangs or allocates without bound;
//! where there is a round trip (shards), it holds. CI runs each property a few hundred
//! times; `PROPTEST_CASES=N` runs more (docs/reliability.md has a long run's counts).

use std::path::{Path, PathBuf};

use mmpipe::data::shards::{expand_braces, scan, write_shard, SampleMembers};
use proptest::prelude::*;

fn temp_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmpipe-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}-{:?}", std::thread::current().id()))
}

fn cases(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A byte string changed the ways damage and crafting change files: bytes flipped, cut,
/// inserted, a region overwritten by a repeated byte.
fn mutated(original: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = original.len().max(1);
    (
        0..4u8,
        0..len,
        1..256usize,
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(how, at, n, byte, junk)| {
            let mut b = original.clone();
            let at = at.min(b.len());
            match how {
                0 => {
                    for i in at..(at + n).min(b.len()) {
                        b[i] ^= byte | 1;
                    }
                }
                1 => b.truncate(at),
                2 => {
                    b.splice(at..at, junk);
                }
                _ => {
                    let end = (at + n * 16).min(b.len());
                    b[at..end].fill(byte);
                }
            }
            b
        })
}

proptest! {
    #![proptest_config(cases(256))]

    /// Brace patterns: an answer for any string, never more than the cap of names (a
    /// product of ranges used to expand without bound).
    #[test]
    fn brace_expansion_answers_any_pattern(pattern in "[a-z0-9{},./]{0,24}|([a-z]{1,3}\\{[0-9]{1,4}\\.\\.[0-9]{1,5}\\}){1,3}") {
        if let Ok(names) = expand_braces(&pattern) {
            prop_assert!(names.len() <= 10_000_000);
            if !pattern.contains('{') {
                prop_assert_eq!(names, vec![pattern.clone()]);
            }
        }
    }

    /// Shards round-trip: any samples (keys, member extensions and bytes) written as a tar
    /// scan back to the same samples, grouped by key, in order.
    #[test]
    fn shards_round_trip_through_write_and_scan(
        samples in proptest::collection::vec(
            (
                "[a-z0-9_]{1,12}",
                proptest::collection::btree_map("(jpg|png|txt|json|cls)", proptest::collection::vec(any::<u8>(), 0..300), 1..4),
            ),
            0..12,
        )
    ) {
        // Consecutive samples with one key would merge: WebDataset keys are unique.
        let mut seen = std::collections::BTreeSet::new();
        let samples: Vec<SampleMembers> = samples
            .into_iter()
            .filter(|(k, _)| seen.insert(k.clone()))
            .map(|(k, m)| (k, m.into_iter().collect()))
            .collect();
        let path = temp_file("roundtrip.tar");
        write_shard(&path, &samples).unwrap();
        let got = scan(&path);
        prop_assert!(got.stopped.is_none(), "{:?}", got.stopped);
        prop_assert_eq!(got.samples.len(), samples.len());
        for (s, (key, members)) in got.samples.iter().zip(&samples) {
            prop_assert_eq!(&s.key, key);
            let back: Vec<(String, Vec<u8>)> = s
                .members
                .iter()
                .map(|m| (m.extension.clone(), s.read(m).unwrap()))
                .collect();
            prop_assert_eq!(&back, members);
        }
    }

    /// Any bytes as a shard: a scan (samples, or a stop with a cause), never a panic.
    #[test]
    fn any_bytes_scan_as_a_shard(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let path = temp_file("junk.tar");
        std::fs::write(&path, &bytes).unwrap();
        let _ = scan(&path);
    }

    /// The three TOML loaders on arbitrary TOML-like text: a value or an error naming
    /// the file.
    #[test]
    fn config_loaders_answer_any_text(text in "([a-z_.\\[\\]]{1,12} = (\"[a-z0-9:/-]{0,10}\"|-?[0-9]{1,6}|true|\\[[0-9, ]{0,8}\\]|\\{\\})\n){0,8}") {
        let _ = mmpipe::topology::Topology::from_str(&text, Path::new("fuzz-topology.toml"));
        let _ = mmpipe::model::ClipConfig::from_str(&text, Path::new("fuzz-model.toml"));
        let path = temp_file("train.toml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = mmpipe::train::TrainConfig::load(Some(&path), &[]) {
            prop_assert!(e.to_string().contains("train.toml"), "{e}");
        }
    }

    /// Tokenizers on any text: exactly `context` ids, in the vocabulary, a mask of ones then
    /// zeros, and the end-of-text position inside the ones.
    #[test]
    fn the_clip_tokenizer_takes_any_text(text in "\\PC{0,200}", context in 2usize..40) {
        static CLIP: std::sync::OnceLock<mmpipe::data::TextTokenizer> = std::sync::OnceLock::new();
        let t = CLIP.get_or_init(mmpipe::data::TextTokenizer::clip);
        let tokens = t.encode_batch(&[text.as_str()], context).unwrap();
        prop_assert_eq!(tokens.ids.len(), context);
        prop_assert!(tokens.ids.iter().all(|&id| (id as usize) < 49_408));
        let real = tokens.mask.iter().take_while(|&&m| m == 1).count();
        prop_assert!(tokens.mask[real..].iter().all(|&m| m == 0));
        prop_assert!((tokens.eot[0] as usize) < real.max(1));
    }
}

/// The real files each reader takes, mutated: the checkpoint reader (and a load of what
/// it read), the Fashion-MNIST IDX reader, the HF tokenizer on any text.
mod mutated_files {
    use super::*;

    fn checkpoint() -> Vec<u8> {
        std::fs::read("tests/fixtures/openclip-tiny.safetensors").unwrap()
    }

    /// A valid IDX pair of 3 images of 28 × 28 and their labels.
    fn idx_files() -> (Vec<u8>, Vec<u8>) {
        let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 28, 0, 0, 0, 28];
        images.extend((0..3 * 28 * 28).map(|i| (i % 251) as u8));
        let labels = vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 7, 9];
        (images, labels)
    }

    proptest! {
        #![proptest_config(cases(128))]

        #[test]
        fn a_damaged_checkpoint_is_an_error_not_a_crash(bytes in mutated(checkpoint())) {
            let path = temp_file("ckpt.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            if mmpipe::model::checkpoint::read_tensors(&path).is_ok() {
                let model = super::super::common::test_model();
                let pb = mmpipe::model::cpu_builder(0);
                mmpipe::model::build_all(&pb, &model).unwrap();
                let _ = mmpipe::model::checkpoint::load(&pb.params(), &path);
            }
        }

        #[test]
        fn damaged_idx_files_are_an_error_not_a_crash(
            images in mutated(idx_files().0),
            labels in mutated(idx_files().1),
        ) {
            let dir = temp_file("idx");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("t10k-images-idx3-ubyte"), &images).unwrap();
            std::fs::write(dir.join("t10k-labels-idx1-ubyte"), &labels).unwrap();
            let _ = mmpipe::data::fashion_mnist::FashionMnist::load(
                &dir,
                mmpipe::data::fashion_mnist::Split::Test,
            );
        }

        #[test]
        fn the_hf_tokenizer_takes_any_text(text in "\\PC{0,200}", context in 2usize..40) {
            static HF: std::sync::OnceLock<mmpipe::data::TextTokenizer> = std::sync::OnceLock::new();
            let t = HF.get_or_init(|| {
                mmpipe::data::TextTokenizer::from_hf_file(Path::new(
                    "target/fixtures/all-minilm-l6-v2/tokenizer.json",
                ))
                .unwrap()
            });
            let tokens = t.encode_batch(&[text.as_str()], context).unwrap();
            prop_assert_eq!(tokens.ids.len(), context);
            prop_assert!((tokens.eot[0] as usize) < context);
        }

        /// A real shard mutated: a scan, never a panic; whatever it keeps reads back.
        #[test]
        fn a_damaged_real_shard_scans_without_panicking(bytes in mutated(std::fs::read("tests/fixtures/real-photos.tar").unwrap())) {
            let path = temp_file("damaged.tar");
            std::fs::write(&path, &bytes).unwrap();
            for s in scan(&path).samples {
                for m in &s.members {
                    let _ = s.read(m);
                }
            }
        }
    }
}

/// The rendezvous protocol: whatever a client sends rank 0 before the real rank, the real
/// rank still joins and rank 0 answers it.
mod rendezvous_protocol {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    proptest! {
        #![proptest_config(cases(12))]

        #[test]
        fn any_bytes_from_a_stranger_leave_the_rendezvous_working(junk in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let env = |rank| mmpipe::comm::rendezvous::LaunchEnv {
                rank,
                world_size: 2,
                local_rank: rank,
                master_addr: "127.0.0.1".into(),
                master_port: port,
                launcher: "torchrun",
                secret: Some("fuzz".into()),
            };
            let (a, b) = std::thread::scope(|s| {
                let lead = s.spawn(|| mmpipe::comm::rendezvous::join(&env(0), 1, 1, vec![("k".into(), vec![1])], Duration::from_secs(20)));
                let started = std::time::Instant::now();
                let mut stranger = loop {
                    if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                        break c;
                    }
                    assert!(started.elapsed().as_secs() < 10);
                    std::thread::sleep(Duration::from_millis(10));
                };
                let _ = stranger.write_all(&junk);
                drop(stranger);
                let real = s.spawn(|| mmpipe::comm::rendezvous::join(&env(1), 1, 1, Vec::new(), Duration::from_secs(20)));
                (lead.join().unwrap(), real.join().unwrap())
            });
            prop_assert!(a.is_ok(), "{:?}", a.err());
            let b = b.unwrap();
            prop_assert_eq!(b.get("k"), Some(&[1u8][..]));
        }
    }
}
