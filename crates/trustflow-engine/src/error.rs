//! Library errors. Whole-run problems are `Error`s and stop a run before (or instead
//! of) any output; bad rows are never errors, they go to quarantine (see `stages`).

use std::path::PathBuf;

/// Where in a pipeline file something is: the file, the field path, and the
/// 1-based line and column when the YAML parser could tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecLocation {
    pub file: PathBuf,
    pub field: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl std::fmt::Display for SpecLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        Ok(())
    }
}

/// One problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecIssue {
    pub location: SpecLocation,
    pub message: String,
}

impl SpecIssue {
    /// A problem with the file as a whole (unreadable, not YAML), with no field.
    pub fn whole_file(path: &std::path::Path, message: String) -> Self {
        SpecIssue {
            location: SpecLocation {
                file: path.to_path_buf(),
                field: String::new(),
                line: None,
                column: None,
            },
            message,
        }
    }
}

impl std::fmt::Display for SpecIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// All problems found in a pipeline file, reported together (like `vector validate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecIssues(pub Vec<SpecIssue>);

impl std::fmt::Display for SpecIssues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in pipeline file",
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.0 {
            write!(f, "\n  - {issue}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Spec(SpecIssues),

    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An input shard's data could not be read (corrupt page, vanished file). With
    /// `source.on_unreadable: quarantine` the run records it and goes on.
    #[error("{path}: cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },

    #[error("stage `{stage}`: {message}")]
    Stage { stage: String, message: String },

    #[error("writing {path}: {message}")]
    Output { path: PathBuf, message: String },

    #[error("run cancelled by signal; completed shards are kept, the rest were discarded")]
    Cancelled,

    /// The run finished, but skipped input shards it could not read (listed in its
    /// report).
    #[error(
        "{skipped} input shard(s) could not be read and were skipped; the report lists \
         them with the reason (repair or remove them, then rerun: finished shards are kept)"
    )]
    Incomplete { skipped: usize },

    /// A setting, argument or input that cannot work (the message says which, and what
    /// is expected).
    #[error("{0}")]
    Invalid(String),

    /// Something the machine lacks: a library, an environment variable, a device.
    #[error("{0}")]
    Environment(String),

    /// A helper program (such as a benchmark's Python baseline) could not run or failed.
    #[error("{program}: {message}")]
    Program { program: PathBuf, message: String },

    /// An Arrow operation failed on data the engine built itself.
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },

    /// A Parquet file could not be read or decoded.
    #[error("{path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// Reading a shard through DataFusion failed.
    #[error("{path}: {source}")]
    Scan {
        path: PathBuf,
        #[source]
        source: datafusion::error::DataFusionError,
    },

    /// The output is being written by another run (a lock or lease held): retrying at
    /// once cannot help (exit code 2, which the cluster runner does not retry).
    #[error("{path}: {message}")]
    Busy { path: PathBuf, message: String },

    /// A part's shard list (`--shards`) was planned for another pipeline, or names
    /// shards that are not the part's: retrying cannot help, the job must be planned
    /// again (exit code 2, which the cluster runner does not retry).
    #[error("{path}: {message}")]
    StalePlan { path: PathBuf, message: String },

    /// A broken invariant of the engine itself (a bug, not a user error).
    #[error("internal error (please report it): {0}")]
    Internal(String),
}

impl Error {
    /// The process exit code this error ends a command with: 130 cancelled by a signal,
    /// 3 finished with unreadable input shards skipped, 2 a stale shard list (plan
    /// again) or an output another run is writing, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Cancelled => 130,
            Error::Incomplete { .. } => 3,
            Error::StalePlan { .. } | Error::Busy { .. } => 2,
            _ => 1,
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn input(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            message: message.into(),
        }
    }

    pub fn parquet(path: impl Into<PathBuf>, source: parquet::errors::ParquetError) -> Self {
        Error::Parquet {
            path: path.into(),
            source,
        }
    }

    pub fn output(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Output {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub fn stage(stage: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Stage {
            stage: stage.into(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
