//! The library's one error type. Every variant carries what the user needs to find the
//! problem: the file and field for bad input, the group and rank for a failed collective.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A file that is not valid TOML for its schema (unknown field, wrong type, syntax).
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },

    /// A value that parses but makes no sense, named by its field.
    #[error("{}: `{field}`: {message}", path.display())]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },

    /// A peer left (returned, failed or panicked) before a collective completed.
    #[error(
        "collective `{op}` in group `{group}`: rank {peer} of {size} left before it completed"
    )]
    PeerLost {
        op: &'static str,
        group: String,
        peer: usize,
        size: usize,
    },

    #[error("collective `{op}` in group `{group}`: rank {peer} of {size} did not answer within {secs} s")]
    PeerTimeout {
        op: &'static str,
        group: String,
        peer: usize,
        size: usize,
        secs: f64,
    },

    #[error("collective `{op}` in group `{group}`: {message}")]
    Collective {
        op: &'static str,
        group: String,
        message: String,
    },

    #[error("rank {rank}: {message}")]
    Rank { rank: usize, message: String },

    /// A file whose contents are wrong as a whole (not one field of a config: see
    /// [`Error::Invalid`]), named with the problem.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },

    /// The launcher's environment (torchrun's or Slurm's variables) does not describe a
    /// run; `variable` is the one at fault.
    #[error("{message}")]
    Launcher { variable: String, message: String },

    /// The rendezvous between a run's processes failed; `peer` is whom it was with (rank
    /// 0's address, or a rank).
    #[error("rendezvous: {message}")]
    Rendezvous { peer: String, message: String },

    /// A training step that cannot go on (the data, or the run diverged).
    #[error("step {step}: {message}")]
    Step { step: u64, message: String },

    /// The GPU, its driver, NVRTC or NCCL failed (not a peer's collective: see
    /// [`Error::Collective`]).
    #[error("CUDA: {0}")]
    Cuda(String),

    /// What this build cannot do without a cargo feature.
    #[error("{message}")]
    NeedsFeature {
        feature: &'static str,
        message: String,
    },

    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn invalid(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// True for errors that only report that some other rank failed first.
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, Error::PeerLost { .. } | Error::PeerTimeout { .. })
    }
}

/// Reads a TOML file into a schema type, naming the file in every error.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses TOML text; `origin` names where it came from (a path, or a built-in name).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &std::path::Path,
) -> Result<T> {
    toml::from_str(text).map_err(|e| Error::Parse {
        path: origin.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}
