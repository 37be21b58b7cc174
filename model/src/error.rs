//! Typed errors of the model crate: every one names the file and the problem.

use std::path::PathBuf;

/// Anything that can go wrong while loading, training or saving a model, adapter or data set.
///
/// Messages are written for the person at the terminal: they name the file (and line or
/// tensor) and say what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The caller stopped training (the node was paused or interrupted).
    #[error("training stopped after {steps} steps")]
    Cancelled { steps: usize },
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not found{hint}", path.display())]
    NotFound { path: PathBuf, hint: String },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("{}: unsupported model: {problem}", path.display())]
    Unsupported { path: PathBuf, problem: String },
    #[error("{}: not a valid safetensors file: {problem}", path.display())]
    Safetensors { path: PathBuf, problem: String },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?}", path.display())]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("{}: tensor `{name}` has dtype {dtype}, expected a float type (F32, F16, BF16, F64)", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{}:{line}: {problem}", path.display())]
    DataLine {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("{}: adapter does not fit the model: {problem}", path.display())]
    AdapterMismatch { path: PathBuf, problem: String },
    #[error("tokenizer {}: {problem}", path.display())]
    Tokenizer { path: PathBuf, problem: String },
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::NotFound {
                path,
                hint: String::new(),
            }
        } else {
            ModelError::Io { path, source }
        }
    }

    /// Names `path` in an error that was raised without one.
    pub(crate) fn with_path(self, path: &std::path::Path) -> Self {
        match self {
            ModelError::Safetensors { problem, .. } => ModelError::Safetensors {
                path: path.to_path_buf(),
                problem,
            },
            other => other,
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, problem: impl Into<String>) -> Self {
        ModelError::Invalid {
            path: path.into(),
            problem: problem.into(),
        }
    }
}
