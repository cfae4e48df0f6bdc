//! The error type of the library: every failure a user can cause names what to fix.

use std::path::{Path, PathBuf};

/// Errors raised by genbackdoor. Each variant carries a message meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what they should be (corrupt, truncated, wrong kind).
    #[error("{path}: {msg}")]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// Two things that must fit together do not (a key and a model, a target and an output).
    #[error("{0}")]
    Mismatch(String),
    /// A configuration value or command-line argument is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A training loss became NaN or infinite.
    #[error("{what} became non-finite ({value}) at step {step}; the last good checkpoint is kept")]
    NonFinite {
        /// The quantity that diverged.
        what: String,
        /// Its value.
        value: f32,
        /// The training step at which it happened.
        step: usize,
    },
    /// A model produced NaN or infinite outputs.
    #[error("the model produced NaN or infinite outputs (are its weights damaged?)")]
    NonFiniteOutput,
    /// The user stopped the run (Ctrl-C) after a step.
    #[error("stopped at step {step}{}", match saved {
        Some(p) => format!("; checkpoint saved to {} (continue with `genbackdoor train --resume {}`)", p.display(), p.parent().map(|d| d.display().to_string()).unwrap_or_default()),
        None => "; this kind of run cannot be resumed".to_string(),
    })]
    Interrupted {
        /// The last completed step.
        step: usize,
        /// The checkpoint written, if the run can be resumed.
        saved: Option<PathBuf>,
    },
    /// An error inside the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A malformed-file error on `path`.
    pub fn format(path: &Path, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// Checks that a model's output holds only finite values ([`Error::NonFiniteOutput`] if not):
/// weights damaged into overflow must give an error, never images.
pub fn check_finite_output(x: &candle_core::Tensor) -> Result<()> {
    let finite = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    if finite {
        Ok(())
    } else {
        Err(Error::NonFiniteOutput)
    }
}
