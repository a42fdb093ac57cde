//! Which pairs of a step's global batch every rank trains on: the pairs whose image and
//! caption both materialised, with the image and text ranks checked to have read the same
//! samples.

use candle_core::{Device, Tensor};

use crate::comm::rendezvous::stable_hash;
use crate::comm::RankComms;
use crate::error::{Error, Result};
use crate::topology::layout::FeatureLayout;
use crate::topology::Tower;

/// What a rank could read of its slice of a step's batch.
#[derive(Debug, Clone, Copy)]
pub struct Readable<'a> {
    /// The step (named when the ranks disagree).
    pub step: u64,
    /// False where the sample could not be used.
    pub valid: &'a [bool],
    /// The samples' keys (as the data pipeline names them, the same on the image and the
    /// text side), checked across the modalities; empty: not checked.
    pub keys: &'a [String],
}

impl<'a> Readable<'a> {
    /// Validity alone, no keys to check.
    pub fn valid_only(valid: &'a [bool]) -> Self {
        Readable {
            step: 0,
            valid,
            keys: &[],
        }
    }
}

/// The pairs a step trains on, as this rank sees them.
#[derive(Debug, Clone)]
pub struct Pairs {
    /// Where every rank's kept rows sit in the world all-gather.
    pub layout: FeatureLayout,
    /// Per tower this rank holds (image first).
    pub sides: Vec<PairSide>,
}

/// The kept pairs of one of this rank's slices.
#[derive(Debug, Clone)]
pub struct PairSide {
    /// The slice's first row in the kept global batch.
    pub offset: usize,
    /// The rows of the slice that are kept; None: all of them.
    pub kept: Option<Vec<u32>>,
}

/// One of a rank's slices of the batch: its tower, and its rows of the global batch.
pub struct Slice {
    pub tower: Tower,
    pub offset: usize,
    pub len: usize,
}

/// Agrees with every rank on the pairs of this step (a world all-gather of two u32 per
/// sample: validity and a hash of the sample's key). A pair stays only if its image and
/// its caption both materialised; the image and text ranks must have read the same sample
/// at every position, or the step stops, naming it. None: fewer than two pairs are left,
/// and the step has no loss (every rank decides alike, from the same gathered validity).
/// `me` and `reads` hold one entry per tower this rank holds, image first.
pub fn agree_on_pairs(
    comms: &RankComms,
    layout: &FeatureLayout,
    me: &[Slice],
    reads: &[Readable],
) -> Result<Option<Pairs>> {
    // Bit 0: usable; bit 1: a key to compare. Then the key's hash.
    let mut mine: Vec<u32> = Vec::new();
    for read in reads {
        mine.extend(read.valid.iter().enumerate().flat_map(|(i, &v)| {
            let key = read.keys.get(i);
            let hash = key.map_or(0, |k| stable_hash(k.as_bytes()) as u32);
            [u32::from(v) | u32::from(key.is_some()) << 1, hash]
        }));
    }
    let rows = mine.len() / 2;
    let mine = Tensor::from_vec(mine, (rows, 2), &Device::Cpu)?;
    let gathered = comms.world.all_gather_rows(&mine, &layout.world_rows())?;
    let side =
        |tower| -> Result<Vec<Vec<u32>>> { Ok(layout.select(&gathered, tower)?.to_vec2::<u32>()?) };
    let (image, text) = (side(Tower::Image)?, side(Tower::Text)?);
    if let Some(at) = (0..image.len())
        .find(|&i| image[i][0] & 2 != 0 && text[i][0] & 2 != 0 && image[i][1] != text[i][1])
    {
        let here = me
            .iter()
            .zip(reads)
            .find(|(s, _)| (s.offset..s.offset + s.len).contains(&at))
            .map(|(s, read)| {
                format!(
                    " (this rank's {} replica read `{}`)",
                    s.tower,
                    read.keys[at - s.offset]
                )
            })
            .unwrap_or_default();
        return Err(Error::Step {
            step: reads[0].step,
            message: format!(
                "the image and text ranks read different samples at position {at} of the global \
                 batch (key hashes {:08x} and {:08x}){here}: every rank must read the same shards \
                 in the same order (the same --shards, with the same contents, on every node)",
                image[at][1], text[at][1]
            ),
        });
    }
    let pair: Vec<bool> = image
        .iter()
        .zip(&text)
        .map(|(a, b)| a[0] & 1 != 0 && b[0] & 1 != 0)
        .collect();
    let kept = |from: usize, len: usize| pair[from..from + len].iter().filter(|&&p| p).count();
    if kept(0, pair.len()) < 2 {
        return Ok(None);
    }
    let rows: Vec<usize> = layout
        .slices()
        .iter()
        .map(|&(_, from, len)| kept(from, len))
        .collect();
    let sides = me
        .iter()
        .map(|s| PairSide {
            offset: kept(0, s.offset),
            kept: Some(
                (0..s.len)
                    .filter(|&i| pair[s.offset + i])
                    .map(|i| i as u32)
                    .collect(),
            ),
        })
        .collect();
    Ok(Some(Pairs {
        layout: layout.with_rows(&rows),
        sides,
    }))
}
