//! Where a run's samples come from: one place for every data decision. Built once per
//! process from the data config and the model, before any rank starts (so a missing shard
//! or an unreadable CSV is an error then): the shard sets, the rows of a CSV,
//! Fashion-MNIST, the decoded-image cache, the caption tokenizer, the held-out set, the
//! order's seeds, whether batches need masking; then one pipeline per rank.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::cache::ImageCache;
use super::convert::{read_rows, CsvColumns};
use super::fashion_mnist::{FashionMnist, Split};
use super::order::{GlobalStream, OrderConfig};
use super::pipeline::{Assembler, Materialiser, PipelineConfig, RankData, SampleOrder};
use super::shards;
use super::tokenizer::caption_tokenizer;
use super::transform::{Crop, ImageTransform};
use super::{DataConfig, DataKind, HeldOut, SyntheticSource, TextTokenizer};
use crate::error::{Error, Result};
use crate::model::ClipConfig;
use crate::topology::Tower;

/// A run's data, shared by the ranks of a process.
pub struct Source {
    config: DataConfig,
    /// The run's seed: every order and augmentation draws from it.
    seed: u64,
    /// Channels, height, width of the image tower's input.
    image_shape: (usize, usize, usize),
    /// Tokens per caption.
    context: usize,
    synthetic: Arc<SyntheticSource>,
    fashion: Option<Arc<FashionMnist>>,
    rows: Option<Arc<Vec<(PathBuf, String)>>>,
    cache: Option<Arc<ImageCache>>,
    /// Shard sets and their weights.
    shards: Vec<(Vec<PathBuf>, f64)>,
    /// The other files the data comes from (a CSV, Fashion-MNIST's IDX files).
    data_files: Vec<PathBuf>,
    captions: Arc<TextTokenizer>,
    held_out: Option<HeldOut>,
}

/// What draws from the run's seed.
#[derive(Debug, Clone, Copy)]
enum Seeded {
    /// The synthetic set's samples.
    Synthetic,
    /// The permutation of a CSV's rows or Fashion-MNIST's images, and the mix of shard sets.
    Order,
    /// Shard set `i`'s shard order and shuffle buffer.
    ShardSet(usize),
    /// Random crops and the like, per sample.
    Augmentation,
}

/// The one place the data's seeds derive from the run's. They are the run's seed itself
/// except per shard set, so that two sets of a mix do not shuffle alike (the values every
/// earlier release used, so a resumed run replays the same order).
fn seed_of(run: u64, what: Seeded) -> u64 {
    match what {
        Seeded::ShardSet(i) => run.wrapping_add(i as u64),
        Seeded::Synthetic | Seeded::Order | Seeded::Augmentation => run,
    }
}

/// A rank's slice of every global batch, from which step on.
#[derive(Debug, Clone, Copy)]
pub struct RankSlice {
    pub tower: Tower,
    /// Its first row in the global batch, and how many rows.
    pub offset: usize,
    pub len: usize,
    pub global_batch: usize,
    /// The step the pipeline starts at (after a resume: the order replays to it).
    pub start_step: usize,
}

impl Source {
    /// Opens the data of `d` for `model`, with `eval_pairs` held-out pairs (0: none).
    /// `process_rank`: this process's world rank when the run has several processes (each
    /// gets a cache file of its own); None when one process runs every rank.
    pub fn new(
        d: &DataConfig,
        model: &ClipConfig,
        seed: u64,
        eval_pairs: usize,
        process_rank: Option<usize>,
    ) -> Result<Source> {
        let synthetic = Arc::new(SyntheticSource::new(
            seed_of(seed, Seeded::Synthetic),
            model,
        )?);
        // Missing shards are an error now, before any rank starts.
        let shards: Vec<(Vec<PathBuf>, f64)> = match d.kind {
            DataKind::Webdataset if d.sources.is_empty() => vec![(
                shards::resolve(&d.shards, &d.base_dir, &d.origin, "data.shards")?,
                1.0,
            )],
            DataKind::Webdataset => d
                .sources
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let field = format!("data.sources[{i}].shards");
                    Ok((
                        shards::resolve(&s.shards, &d.base_dir, &d.origin, &field)?,
                        s.weight,
                    ))
                })
                .collect::<Result<_>>()?,
            _ => Vec::new(),
        };
        let rows = match d.kind {
            DataKind::Csv => {
                let columns = CsvColumns {
                    image: d.image_column.clone(),
                    caption: d.caption_column.clone(),
                    delimiter: None,
                };
                let rows = read_rows(&d.base_dir.join(&d.csv), &columns)?;
                if rows.is_empty() {
                    return Err(Error::invalid(
                        &d.origin,
                        "data.csv",
                        "the file has no rows",
                    ));
                }
                Some(Arc::new(rows))
            }
            _ => None,
        };
        // One cache for all image ranks, sized for every sample the shards hold.
        let cache = match (&d.cache, d.kind) {
            (Some(path), DataKind::Webdataset) => {
                let samples: usize = shards
                    .iter()
                    .flat_map(|(paths, _)| paths)
                    .map(|p| shards::scan(p).samples.len())
                    .sum();
                let side = d.cache_side.unwrap_or(model.image_size());
                // One file per process: rank threads share their process's, processes of
                // one run (one node's, under a launcher) each get their own.
                let path = d.base_dir.join(path);
                let path = match process_rank {
                    None => path,
                    Some(rank) => per_process(&path, rank),
                };
                Some(Arc::new(ImageCache::create(&path, side, samples)?))
            }
            (Some(_), _) => {
                return Err(Error::invalid(
                    &d.origin,
                    "data.cache",
                    "the decoded-image cache is for shards (kind = \"webdataset\")",
                ))
            }
            (None, _) => None,
        };
        let fashion = match d.kind {
            DataKind::FashionMnist => Some(Arc::new(FashionMnist::load(
                &d.base_dir.join(&d.dir),
                d.split,
            )?)),
            _ => None,
        };
        // What the data is on disk, besides the shards: for a resume to see a change.
        let data_files: Vec<PathBuf> = match d.kind {
            DataKind::Csv => vec![d.base_dir.join(&d.csv)],
            DataKind::FashionMnist => {
                let dir = d.base_dir.join(&d.dir);
                let prefix = match d.split {
                    Split::Train => "train-",
                    Split::Test => "t10k-",
                };
                let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map(|entries| {
                        entries
                            .flatten()
                            .map(|e| e.path())
                            .filter(|p| {
                                p.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with(prefix))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                files.sort();
                files
            }
            DataKind::Synthetic | DataKind::Webdataset => Vec::new(),
        };
        let held_out = match (eval_pairs, d.kind) {
            (0, _) => None,
            (_, DataKind::Synthetic) => Some(HeldOut::Synthetic(synthetic.clone())),
            // The test split beside the training split's files.
            (_, DataKind::FashionMnist) => {
                Some(HeldOut::fashion_mnist(&d.base_dir.join(&d.dir), model)?)
            }
            (_, kind) => {
                tracing::warn!(
                    "no built-in held-out pairs for data.kind = {kind:?}: name your own in \
                     `[[eval.sets]]` (zero-shot folders or shards, or kind = \"retrieval\" \
                     with held-out shards) and set eval.pairs = 0, or evaluate a checkpoint \
                     with `mmpipe eval`"
                );
                None
            }
        };
        if let Some(len) = held_out.as_ref().and_then(HeldOut::pairs) {
            if eval_pairs > len {
                return Err(Error::invalid(
                    &d.origin,
                    "eval.pairs",
                    format!("{eval_pairs} held-out pairs asked for, the test split has {len}"),
                ));
            }
        }
        let captions = match d.kind {
            DataKind::Synthetic => synthetic.tokenizer(),
            _ => Arc::new(caption_tokenizer(model)?),
        };
        Ok(Source {
            config: d.clone(),
            seed,
            image_shape: (model.channels(), model.image_size(), model.image_size()),
            context: model.context_length(),
            synthetic,
            fashion,
            rows,
            cache,
            shards,
            data_files,
            captions,
            held_out,
        })
    }

    fn seed_of(&self, what: Seeded) -> u64 {
        seed_of(self.seed, what)
    }

    /// The decoding threads each rank's pipeline runs.
    pub fn workers(&self) -> usize {
        self.config.workers.max(1)
    }

    /// Whether a batch can hold samples that did not materialise (every rank must then
    /// agree on the readable pairs): everything but the synthetic set, which always does.
    pub fn may_fail(&self) -> bool {
        self.config.kind != DataKind::Synthetic
    }

    /// The held-out pairs, when the run evaluates itself.
    pub fn held_out(&self) -> Option<&HeldOut> {
        self.held_out.as_ref()
    }

    /// Every file the samples come from: what a resume checks for changes.
    pub fn files(&self) -> Vec<PathBuf> {
        self.shards
            .iter()
            .flat_map(|(paths, _)| paths.iter().cloned())
            .chain(self.data_files.iter().cloned())
            .collect()
    }

    /// Starts a rank's pipeline: its modality, its slice of every global batch. `log`:
    /// this rank reports the order's progress (epochs, shards).
    pub fn rank_pipeline(&self, slice: RankSlice, log: bool) -> RankData {
        self.rank_pipeline_onto(slice, log, &Device::Cpu, None)
    }

    /// [`Self::rank_pipeline`] for a rank on `device`, each batch moved by `upload` (onto
    /// the rank's GPU) as soon as it is assembled; decoded images go as bytes where
    /// `data.normalise_on` says `device` does the normalisation.
    pub fn rank_pipeline_onto(
        &self,
        slice: RankSlice,
        log: bool,
        device: &Device,
        upload: Option<super::pipeline::Upload>,
    ) -> RankData {
        let tower = slice.tower;
        let crop = if self.config.random_crop {
            Crop::OPENCLIP_TRAIN
        } else {
            Crop::Centre
        };
        // Decoded images become the tower's input size, within the data's limits.
        let transform = || {
            ImageTransform::clip(self.image_shape.1, crop).with_limits(self.config.image_limits())
        };
        let (order, materialiser) = match self.config.kind {
            DataKind::Synthetic => (
                SampleOrder::Sequential { next: 0 },
                Materialiser::Synthetic(self.synthetic.clone(), tower),
            ),
            DataKind::FashionMnist => {
                let set = self.fashion.clone().expect("loaded for this kind");
                (
                    SampleOrder::permuted(set.len() as u64, self.seed_of(Seeded::Order)),
                    Materialiser::FashionMnist(set, transform(), tower),
                )
            }
            DataKind::Csv => {
                let rows = self.rows.clone().expect("read for this kind");
                (
                    SampleOrder::permuted(rows.len() as u64, self.seed_of(Seeded::Order)),
                    Materialiser::Rows(rows, transform(), tower),
                )
            }
            DataKind::Webdataset => {
                let mut streams: Vec<GlobalStream> = self
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(i, (paths, _))| {
                        let mut stream = GlobalStream::new(
                            paths.clone(),
                            OrderConfig {
                                seed: self.seed_of(Seeded::ShardSet(i)),
                                shuffle_buffer: self.config.shuffle_buffer,
                                resample: self.config.resample,
                            },
                        );
                        stream.log = log;
                        stream
                    })
                    .collect();
                let order = if streams.len() == 1 {
                    SampleOrder::Shards(Box::new(streams.remove(0)))
                } else {
                    let weights: Vec<f64> = self.shards.iter().map(|s| s.1).collect();
                    SampleOrder::mix(streams, &weights, self.seed_of(Seeded::Order))
                };
                let materialiser = match tower {
                    Tower::Image => Materialiser::ShardImages(transform(), self.cache.clone()),
                    Tower::Text => Materialiser::ShardCaptions,
                };
                (order, materialiser)
            }
        };
        let assembler = Assembler {
            tower,
            image_shape: self.image_shape,
            norm: transform().norm(),
            bytes_to_device: self.config.normalise_on.on_device(device),
            tokenizer: self.captions.clone(),
            context: self.context,
            upload,
        };
        RankData::spawn(
            order,
            slice.offset,
            slice.len,
            slice.global_batch,
            Arc::new(materialiser),
            assembler,
            PipelineConfig {
                workers: self.config.workers,
                prefetch: self.config.prefetch,
                seed: self.seed_of(Seeded::Augmentation),
                start_step: slice.start_step as u64,
            },
        )
    }
}

/// `DIR/NAME.rank-R.EXT` for `DIR/NAME.EXT`: a file of world rank `rank`'s own.
fn per_process(path: &Path, rank: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "cache".into(), |s| s.to_string_lossy().into_owned());
    let name = match path.extension() {
        Some(ext) => format!("{stem}.rank-{rank}.{}", ext.to_string_lossy()),
        None => format!("{stem}.rank-{rank}"),
    };
    path.with_file_name(name)
}
