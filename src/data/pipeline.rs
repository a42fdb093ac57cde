//! One rank's data: a reader thread walks the global order and keeps the rank's slice of
//! every global batch, worker threads decode and transform those samples while the tower
//! computes, and an assembler puts them back in order into batches, a bounded number
//! ahead. A sample that fails to decode keeps its slot, marked invalid, so both modalities
//! keep the same positions; the step then drops the pair on every rank.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::cache::ImageCache;
use super::fashion_mnist::FashionMnist;
use super::order::{first_report, GlobalStream, SkipCounts};
use super::shards::{ShardSample, SkipCause};
use super::synthetic::Stream;
use super::tokenizer::TextTokenizer;
use super::transform::ImageTransform;
use super::SyntheticSource;
use crate::error::{Error, Result};
use crate::model::{PixelNorm, TowerInput};
use crate::topology::Tower;

/// A sample of the global order, before its rank reads it.
#[derive(Debug, Clone)]
pub enum SampleRef {
    /// Sample `i` of an indexed source (the synthetic stream, Fashion-MNIST).
    Index(u64),
    Shard(ShardSample),
}

impl SampleRef {
    pub fn key(&self) -> String {
        match self {
            SampleRef::Index(i) => i.to_string(),
            SampleRef::Shard(s) => s.key.clone(),
        }
    }

    /// What the sample is, wherever its shard is mounted: the shard's file name and the
    /// sample's key in it (WebDataset keys repeat across shards), or its index.
    pub fn identity(&self) -> String {
        match self {
            SampleRef::Index(i) => i.to_string(),
            SampleRef::Shard(s) => format!(
                "{}#{}",
                s.shard.file_name().map_or_else(
                    || s.shard.display().to_string(),
                    |n| n.to_string_lossy().into_owned()
                ),
                s.key
            ),
        }
    }
}

/// Where the global order comes from.
pub enum SampleOrder {
    /// An endless indexed source: sample `i` is position `i` (the synthetic set).
    Sequential {
        next: u64,
    },
    /// `len` indexed samples, in a seeded permutation per epoch.
    Permuted {
        len: u64,
        seed: u64,
        position: u64,
        permutation: Vec<u64>,
    },
    Shards(Box<GlobalStream>),
    /// Several shard sets, one drawn per sample by weight with a seeded generator.
    Mix {
        streams: Vec<GlobalStream>,
        /// Cumulative weights, normalised to end at 1.
        cumulative: Vec<f64>,
        rng: Box<rand::rngs::StdRng>,
    },
}

impl SampleOrder {
    pub fn permuted(len: u64, seed: u64) -> Self {
        SampleOrder::Permuted {
            len,
            seed,
            position: 0,
            permutation: Vec::new(),
        }
    }

    pub fn draw(&mut self) -> Result<SampleRef> {
        match self {
            SampleOrder::Sequential { next } => {
                *next += 1;
                Ok(SampleRef::Index(*next - 1))
            }
            SampleOrder::Permuted {
                len,
                seed,
                position,
                permutation,
            } => {
                if *len == 0 {
                    return Err(Error::Msg("the source holds no samples".into()));
                }
                let at = *position % *len;
                if at == 0 || permutation.is_empty() {
                    use rand::seq::SliceRandom;
                    use rand::SeedableRng;
                    let epoch = *position / *len;
                    let mut rng = rand::rngs::StdRng::seed_from_u64(
                        *seed ^ (epoch + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    );
                    *permutation = (0..*len).collect();
                    permutation.shuffle(&mut rng);
                }
                *position += 1;
                Ok(SampleRef::Index(permutation[at as usize]))
            }
            SampleOrder::Shards(s) => Ok(SampleRef::Shard(s.next_sample()?)),
            SampleOrder::Mix {
                streams,
                cumulative,
                rng,
            } => {
                use rand::Rng;
                let u: f64 = rng.random();
                let pick = cumulative
                    .iter()
                    .position(|&c| u < c)
                    .unwrap_or(streams.len() - 1);
                Ok(SampleRef::Shard(streams[pick].next_sample()?))
            }
        }
    }

    /// A mixture of shard sets drawn with probabilities proportional to `weights`.
    pub fn mix(streams: Vec<GlobalStream>, weights: &[f64], seed: u64) -> Self {
        use rand::SeedableRng;
        let total: f64 = weights.iter().sum();
        let mut at = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                at += w / total;
                at
            })
            .collect();
        SampleOrder::Mix {
            streams,
            cumulative,
            rng: Box::new(rand::rngs::StdRng::seed_from_u64(
                seed ^ 0x0005_EED0_F5A3_B1E5,
            )),
        }
    }

    /// Skips `n` samples: resuming at a recorded position.
    pub fn skip(&mut self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.draw()?;
        }
        Ok(())
    }

    fn skipped(&self) -> SkipCounts {
        match self {
            SampleOrder::Sequential { .. } | SampleOrder::Permuted { .. } => SkipCounts::default(),
            SampleOrder::Shards(s) => s.skipped.clone(),
            SampleOrder::Mix { streams, .. } => {
                let mut all = SkipCounts::default();
                for s in streams {
                    all.merge(&s.skipped);
                }
                all
            }
        }
    }
}

/// One sample as its tower takes it.
pub enum Item {
    /// Normalised `[3, size, size]` floats (the synthetic set draws them so).
    Pixels(Vec<f32>),
    /// Decoded `[size, size, 3]` RGB bytes, cropped and resized, not yet normalised.
    Bytes(Vec<u8>),
    Caption(String),
}

/// Turns samples of the rank's modality into items: reads and decodes images, or reads
/// captions. Runs on the worker threads.
pub enum Materialiser {
    /// With a cache, decoded squares are kept for later epochs.
    ShardImages(ImageTransform, Option<Arc<ImageCache>>),
    ShardCaptions,
    Synthetic(Arc<SyntheticSource>, Tower),
    FashionMnist(Arc<FashionMnist>, ImageTransform, Tower),
    /// Rows of a CSV/TSV: an image file and its caption.
    Rows(Arc<Vec<(PathBuf, String)>>, ImageTransform, Tower),
    /// Captions of indexed samples that panic at one index: the unit tests' stand-in for a
    /// decoder bug.
    #[cfg(test)]
    PanicsAt(u64),
}

impl Materialiser {
    /// `seed` drives this sample's random augmentation (the same on a replay).
    pub fn item(&self, sample: &SampleRef, seed: u64) -> std::result::Result<Item, SkipCause> {
        match (self, sample) {
            #[cfg(test)]
            (Materialiser::PanicsAt(at), SampleRef::Index(i)) => {
                assert_ne!(i, at, "a decoder bug");
                Ok(Item::Caption(format!("sample {i}")))
            }
            (Materialiser::ShardImages(t, cache), SampleRef::Shard(s)) => {
                let member = s.image().ok_or(SkipCause::MissingImage)?;
                let read = || s.read(member).map_err(|_| SkipCause::UnreadableShard);
                let pixels = match cache {
                    None => t.apply_bytes(&read()?, seed).map_err(|e| e.cause()),
                    Some(cache) => {
                        let id = format!("{}#{}", s.shard.display(), s.key);
                        let square = match cache.get(&id) {
                            Some(square) => square,
                            None => {
                                let square =
                                    t.square(&read()?, cache.side).map_err(|e| e.cause())?;
                                cache.put(&id, &square);
                                square
                            }
                        };
                        t.crop_rgb(cache.side as u32, cache.side as u32, square, seed)
                            .map_err(|_| SkipCause::CorruptImage)
                    }
                };
                pixels.map(Item::Bytes)
            }
            (Materialiser::ShardCaptions, SampleRef::Shard(s)) => {
                let member = s.caption().ok_or(SkipCause::MissingCaption)?;
                let bytes = s.read(member).map_err(|_| SkipCause::UnreadableShard)?;
                let text = String::from_utf8(bytes).map_err(|_| SkipCause::EmptyCaption)?;
                let text = text.trim();
                if text.is_empty() {
                    Err(SkipCause::EmptyCaption)
                } else {
                    Ok(Item::Caption(text.to_string()))
                }
            }
            (Materialiser::Synthetic(source, Tower::Image), SampleRef::Index(i)) => {
                let s = source.shapes.sample(Stream::Train, *i);
                Ok(Item::Pixels(source.shapes.render(&s)))
            }
            (Materialiser::Synthetic(source, Tower::Text), SampleRef::Index(i)) => {
                Ok(Item::Caption(source.caption(Stream::Train, *i)))
            }
            (Materialiser::FashionMnist(set, t, Tower::Image), SampleRef::Index(i)) => {
                let side = super::fashion_mnist::SIDE as u32;
                t.crop_rgb(side, side, set.rgb(*i as usize), seed)
                    .map(Item::Bytes)
                    .map_err(|_| SkipCause::CorruptImage)
            }
            (Materialiser::Rows(rows, t, Tower::Image), SampleRef::Index(i)) => {
                let bytes =
                    std::fs::read(&rows[*i as usize].0).map_err(|_| SkipCause::MissingImage)?;
                t.apply_bytes(&bytes, seed)
                    .map(Item::Bytes)
                    .map_err(|e| e.cause())
            }
            (Materialiser::Rows(rows, _, Tower::Text), SampleRef::Index(i)) => {
                let caption = rows[*i as usize].1.trim();
                if caption.is_empty() {
                    Err(SkipCause::EmptyCaption)
                } else {
                    Ok(Item::Caption(caption.to_string()))
                }
            }
            (Materialiser::FashionMnist(set, _, Tower::Text), SampleRef::Index(i)) => {
                // The template varies with the draw, not only with the image.
                Ok(Item::Caption(
                    set.caption(*i as usize, (seed >> 33) as usize),
                ))
            }
            _ => Err(SkipCause::UnreadableShard),
        }
    }
}

/// Moves an assembled batch onto the device its step runs on, on the assembler's thread,
/// so that the copy overlaps the step before (`comm::upload`).
pub type Upload = Box<dyn FnMut(TowerInput) -> Result<TowerInput> + Send>;

/// Stacks a batch's items into the tower's input.
pub struct Assembler {
    pub tower: Tower,
    /// `[channels, size, size]` of an image.
    pub image_shape: (usize, usize, usize),
    /// What decoded images' bytes become: floats here, or on the device after the upload.
    pub norm: PixelNorm,
    /// Decoded images leave as `[n, size, size, 3]` bytes (`TowerInput::Pixels`), a
    /// quarter of the floats' bytes, for the step to normalise on its device.
    pub bytes_to_device: bool,
    pub tokenizer: Arc<TextTokenizer>,
    pub context: usize,
    /// Where batches go once assembled; None: they stay on the CPU.
    pub upload: Option<Upload>,
}

impl Assembler {
    /// Items drawn as normalised floats: stacked, zeros for an invalid slot.
    fn floats(&self, items: Vec<Option<Item>>) -> Result<TowerInput> {
        let (c, h, w) = self.image_shape;
        let n = items.len();
        let mut pixels = Vec::with_capacity(n * c * h * w);
        for item in items {
            match item {
                Some(Item::Pixels(p)) if p.len() == c * h * w => pixels.extend(p),
                _ => pixels.resize(pixels.len() + c * h * w, 0.0),
            }
        }
        Ok(TowerInput::Images(Tensor::from_vec(
            pixels,
            (n, c, h, w),
            &Device::Cpu,
        )?))
    }

    fn input(&self, items: Vec<Option<Item>>) -> Result<TowerInput> {
        let n = items.len();
        match self.tower {
            Tower::Image => {
                let (c, h, w) = self.image_shape;
                // The synthetic set draws floats; every other source decodes bytes (a
                // batch with no valid item goes as bytes too: the decoders' kind).
                if items.iter().any(|i| matches!(i, Some(Item::Pixels(_)))) {
                    return self.floats(items);
                }
                // An invalid slot (its pair is dropped from the loss) is a black image:
                // the same values either way the bytes are normalised.
                let black = vec![0u8; h * w * 3];
                fn slot<'a>(item: &'a Option<Item>, black: &'a [u8], ok: bool) -> &'a [u8] {
                    match item {
                        Some(Item::Bytes(b)) if ok && b.len() == black.len() => b,
                        _ => black,
                    }
                }
                let slot = |item| slot(item, &black, c == 3);
                if self.bytes_to_device {
                    let mut bytes = Vec::with_capacity(n * h * w * 3);
                    for item in &items {
                        bytes.extend_from_slice(slot(item));
                    }
                    Ok(TowerInput::Pixels {
                        bytes: Tensor::from_vec(bytes, (n, h, w, 3), &Device::Cpu)?,
                        norm: self.norm,
                    })
                } else {
                    let mut pixels = Vec::with_capacity(n * c * h * w);
                    for item in &items {
                        self.norm.extend_chw(slot(item), &mut pixels);
                    }
                    Ok(TowerInput::Images(Tensor::from_vec(
                        pixels,
                        (n, c, h, w),
                        &Device::Cpu,
                    )?))
                }
            }
            Tower::Text => {
                let captions: Vec<String> = items
                    .into_iter()
                    .map(|i| match i {
                        Some(Item::Caption(c)) => c,
                        _ => String::new(),
                    })
                    .collect();
                self.tokenizer
                    .caption_input(&captions, self.context, &Device::Cpu)
            }
        }
    }
}

/// One global batch's slice for this rank.
pub struct Batch {
    pub step: u64,
    pub input: TowerInput,
    /// False where the sample could not be used (the pair is dropped on every rank).
    pub valid: Vec<bool>,
    /// The samples' identities (shard file name and key, or index): the same on the image
    /// and the text side.
    pub keys: Vec<String>,
    /// Samples this rank could not materialise in this batch, by cause.
    pub failed: SkipCounts,
    /// Left out by the order so far (headers: missing members, truncated shards).
    pub skipped_by_order: SkipCounts,
    /// Global samples consumed after this batch: where a resume starts.
    pub position: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct PipelineConfig {
    pub workers: usize,
    /// Batches ready ahead of the step.
    pub prefetch: usize,
    /// Mixed into each sample's augmentation seed.
    pub seed: u64,
    /// The first step to produce: a resume replays the order up to it (headers only).
    pub start_step: u64,
}

struct Job {
    step: u64,
    slot: usize,
    sample: SampleRef,
    seed: u64,
}

enum ToAssembler {
    Meta {
        step: u64,
        keys: Vec<String>,
        skipped: SkipCounts,
        position: u64,
    },
    Done {
        step: u64,
        slot: usize,
        item: std::result::Result<Item, SkipCause>,
    },
    Failed(Error),
}

/// This rank's batches, produced ahead on background threads.
pub struct RankData {
    batches: Receiver<Result<Batch>>,
    /// One ticket per batch in flight (being read, decoded, or ready): the reader takes
    /// one before each batch and the step returns it, so the pipeline runs at most
    /// `prefetch` batches ahead however fast decoding is.
    tickets: Receiver<()>,
}

impl RankData {
    /// Starts the threads. `offset..offset+len` is the rank's slice of each global batch of
    /// `global_batch` samples.
    pub fn spawn(
        mut order: SampleOrder,
        offset: usize,
        len: usize,
        global_batch: usize,
        materialiser: Arc<Materialiser>,
        assembler: Assembler,
        cfg: PipelineConfig,
    ) -> Self {
        let workers = cfg.workers.max(1);
        let prefetch = cfg.prefetch.max(1);
        let (jobs_tx, jobs_rx) = bounded::<Job>(prefetch * len.max(1));
        let (to_asm, from_workers) = unbounded::<ToAssembler>();
        let (batches_tx, batches) = unbounded::<Result<Batch>>();
        let (tickets_tx, tickets) = bounded::<()>(prefetch);

        let reader_out = to_asm.clone();
        let start = cfg.start_step;
        thread::spawn(move || {
            if let Err(e) = order.skip(start * global_batch as u64) {
                let _ = reader_out.send(ToAssembler::Failed(e));
                return;
            }
            for step in start.. {
                if tickets_tx.send(()).is_err() {
                    return;
                }
                let mut keys = Vec::with_capacity(len);
                for pos in 0..global_batch {
                    let sample = match order.draw() {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = reader_out.send(ToAssembler::Failed(e));
                            return;
                        }
                    };
                    if pos < offset || pos >= offset + len {
                        continue;
                    }
                    keys.push(sample.identity());
                    let index = step * global_batch as u64 + pos as u64;
                    let seed = cfg.seed ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D);
                    let job = Job {
                        step,
                        slot: pos - offset,
                        sample,
                        seed,
                    };
                    if jobs_tx.send(job).is_err() {
                        return;
                    }
                }
                let meta = ToAssembler::Meta {
                    step,
                    keys,
                    skipped: order.skipped(),
                    position: (step + 1) * global_batch as u64,
                };
                if reader_out.send(meta).is_err() {
                    return;
                }
            }
        });

        for _ in 0..workers {
            let (jobs, out, m) = (jobs_rx.clone(), to_asm.clone(), materialiser.clone());
            thread::spawn(move || {
                while let Ok(job) = jobs.recv() {
                    // A decoder's panic costs this sample, not the worker (and so not the
                    // step, which would wait for its slot forever).
                    let item = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        m.item(&job.sample, job.seed)
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::warn!("decoding {} panicked: {what}", job.sample.identity());
                        Err(SkipCause::DecoderPanic)
                    });
                    if let Err(cause) = item.as_ref().map(|_| ()).map_err(|c| *c) {
                        let id = match &job.sample {
                            SampleRef::Shard(s) => format!("{}#{}", s.shard.display(), s.key),
                            SampleRef::Index(i) => i.to_string(),
                        };
                        if first_report(&id, cause) {
                            match &job.sample {
                                SampleRef::Shard(s) => tracing::warn!(
                                    "skipping {} in {}: {}",
                                    s.key,
                                    s.shard.display(),
                                    cause.describe()
                                ),
                                SampleRef::Index(i) => {
                                    tracing::warn!("skipping sample {i}: {}", cause.describe())
                                }
                            }
                        }
                    }
                    let done = ToAssembler::Done {
                        step: job.step,
                        slot: job.slot,
                        item,
                    };
                    if out.send(done).is_err() {
                        return;
                    }
                }
            });
        }
        drop(to_asm);

        thread::spawn(move || assemble(from_workers, batches_tx, assembler, len, start));
        RankData { batches, tickets }
    }

    /// The next batch; blocks while the workers are behind (the time the step waits for
    /// data).
    pub fn next(&self) -> Result<Batch> {
        let batch = self
            .batches
            .recv()
            .map_err(|_| Error::Msg("the data pipeline stopped".into()))?;
        // This batch is out of the pipeline: the reader may start another.
        let _ = self.tickets.try_recv();
        batch
    }
}

struct Partial {
    items: Vec<Option<std::result::Result<Item, SkipCause>>>,
    done: usize,
    meta: Option<(Vec<String>, SkipCounts, u64)>,
}

fn assemble(
    from: Receiver<ToAssembler>,
    out: Sender<Result<Batch>>,
    mut assembler: Assembler,
    len: usize,
    start: u64,
) {
    let mut partial: BTreeMap<u64, Partial> = BTreeMap::new();
    let mut next = start;
    fn entry(partial: &mut BTreeMap<u64, Partial>, step: u64, len: usize) -> &mut Partial {
        partial.entry(step).or_insert_with(|| Partial {
            items: (0..len).map(|_| None).collect(),
            done: 0,
            meta: None,
        })
    }
    while let Ok(message) = from.recv() {
        match message {
            ToAssembler::Failed(e) => {
                let _ = out.send(Err(e));
                return;
            }
            ToAssembler::Meta {
                step,
                keys,
                skipped,
                position,
            } => entry(&mut partial, step, len).meta = Some((keys, skipped, position)),
            ToAssembler::Done { step, slot, item } => {
                let p = entry(&mut partial, step, len);
                p.items[slot] = Some(item);
                p.done += 1;
            }
        }
        while partial
            .get(&next)
            .is_some_and(|p| p.done == len && p.meta.is_some())
        {
            let p = partial.remove(&next).expect("checked above");
            let (keys, skipped_by_order, position) = p.meta.expect("checked above");
            let mut failed = SkipCounts::default();
            let mut valid = Vec::with_capacity(len);
            let items: Vec<Option<Item>> = p
                .items
                .into_iter()
                .map(|i| match i {
                    Some(Ok(item)) => {
                        valid.push(true);
                        Some(item)
                    }
                    Some(Err(cause)) => {
                        failed.add(cause, 1);
                        valid.push(false);
                        None
                    }
                    None => {
                        valid.push(false);
                        None
                    }
                })
                .collect();
            let input = assembler
                .input(items)
                .and_then(|input| match &mut assembler.upload {
                    Some(upload) => upload(input),
                    None => Ok(input),
                });
            let batch = input.map(|input| Batch {
                step: next,
                input,
                valid,
                keys,
                failed,
                skipped_by_order,
                position,
            });
            if out.send(batch).is_err() {
                return;
            }
            next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::transform::{CLIP_MEAN, CLIP_STD};

    /// A panic while a worker materialises a sample costs that sample, counted, and the
    /// batch still comes (it used to lose the job: the step waited forever).
    #[test]
    fn a_panicking_decoder_skips_its_sample_and_the_batch_still_comes() {
        let tokenizer = Arc::new(TextTokenizer::Words(crate::data::vocab::WordVocab::new([
            "sample", "0", "1", "2", "3",
        ])));
        let data = RankData::spawn(
            SampleOrder::Sequential { next: 0 },
            0,
            4,
            4,
            Arc::new(Materialiser::PanicsAt(2)),
            Assembler {
                tower: Tower::Text,
                image_shape: (3, 8, 8),
                norm: crate::data::transform::ImageTransform::clip(
                    8,
                    crate::data::transform::Crop::Centre,
                )
                .norm(),
                bytes_to_device: false,
                tokenizer,
                context: 8,
                upload: None,
            },
            PipelineConfig {
                workers: 2,
                prefetch: 1,
                seed: 0,
                start_step: 0,
            },
        );
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(data.next());
        });
        let batch = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the batch came")
            .unwrap();
        assert_eq!(batch.valid, vec![true, true, false, true]);
        assert_eq!(batch.failed.get(SkipCause::DecoderPanic), 1);
    }

    /// The same decoded items stacked as bytes and normalised afterwards (on the device)
    /// give the floats that normalising while stacking gives, bit for bit, an invalid
    /// slot included; the bytes are a quarter of the floats.
    #[test]
    fn bytes_normalised_later_equal_floats_normalised_while_stacked() {
        use crate::data::transform::{Crop, ImageTransform};
        let side = 5;
        let assembler = |bytes_to_device| Assembler {
            tower: Tower::Image,
            image_shape: (3, side, side),
            norm: ImageTransform::clip(side, Crop::Centre).norm(),
            bytes_to_device,
            tokenizer: Arc::new(TextTokenizer::Words(crate::data::vocab::WordVocab::new([
                "a",
            ]))),
            context: 4,
            upload: None,
        };
        let items = || {
            vec![
                Some(Item::Bytes(
                    (0..side * side * 3).map(|i| (i * 37 % 256) as u8).collect(),
                )),
                None,
                Some(Item::Bytes(vec![255; side * side * 3])),
                // The wrong size: invalid, as a missing item.
                Some(Item::Bytes(vec![7; 4])),
            ]
        };
        let host = assembler(false).input(items()).unwrap();
        let device = assembler(true).input(items()).unwrap();
        let TowerInput::Images(floats) = &host else {
            panic!("floats from the host's normalisation")
        };
        let TowerInput::Pixels { bytes, .. } = &device else {
            panic!("bytes for the device")
        };
        assert_eq!(floats.dims(), &[4, 3, side, side]);
        assert_eq!(bytes.dims(), &[4, side, side, 3]);
        assert_eq!(bytes.dtype(), candle_core::DType::U8);
        let TowerInput::Images(later) = device.normalised().unwrap() else {
            panic!("normalised into floats")
        };
        let (a, b) = (
            floats.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            later.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        // Sample 0, channel 1, pixel (row 2, column 3): byte (2·5 + 3)·3 + 1 = 40.
        let v = ((40 * 37 % 256) as f32 / 255.0 - CLIP_MEAN[1]) / CLIP_STD[1];
        assert!((a[side * side + 2 * side + 3] - v).abs() < 1e-5);
        // The invalid slots are black, as normalised black.
        for slot in [1, 3] {
            let black = -CLIP_MEAN[2] / CLIP_STD[2];
            let at = slot * 3 * side * side + 2 * side * side;
            assert!((a[at] - black).abs() < 1e-6, "slot {slot}");
        }
    }
}
