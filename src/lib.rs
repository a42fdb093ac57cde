//! mmpipe: contrastive image–text (CLIP) pretraining with the image encoder and the text
//! encoder on separate groups of devices.
//!
//! Data flows one way: [`topology`] → [`plan`] → [`comm`] → [`model`] / [`loss`] →
//! [`train`], with [`data`] → [`train`]; [`eval`] scores models and [`report`] draws runs.

pub mod bench;
pub mod comm;
pub mod data;
pub mod durable;
pub mod error;
pub mod eval;
pub mod loss;
pub mod model;
pub mod plan;
pub mod report;
pub mod topology;
pub mod train;

pub use error::{Error, Result};
