//! Where a model stage finds its files: an export folder (`model:`) whose standard file
//! names can each be overridden by an explicit path. One place for resolving, looking
//! up and checking those paths, shared by every model stage's config.

use std::path::{Path, PathBuf};

/// Make every relative path relative to `base` (the pipeline file's folder).
pub fn resolve_against<'a>(base: &Path, paths: impl IntoIterator<Item = &'a mut Option<String>>) {
    for path in paths.into_iter().flatten() {
        if Path::new(path.as_str()).is_relative() {
            *path = base.join(path.as_str()).to_string_lossy().into_owned();
        }
    }
}

/// The explicit path if given, else `default_name` inside the export folder; None when
/// neither is set.
pub fn lookup(
    explicit: &Option<String>,
    folder: &Option<String>,
    default_name: &str,
) -> Option<PathBuf> {
    match (explicit, folder) {
        (Some(path), _) => Some(PathBuf::from(path)),
        (None, Some(folder)) => Some(Path::new(folder).join(default_name)),
        (None, None) => None,
    }
}

/// `model` is required unless every one of `files` is given. Like every check here,
/// returns (field, message) problems, as stage configs' `validate` does.
pub fn require_folder_or_files(
    model: &Option<String>,
    files: &[(&str, &Option<String>)],
) -> Vec<(String, String)> {
    if model.is_some() {
        return Vec::new();
    }
    let missing: Vec<&str> = files
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    (!missing.is_empty())
        .then(|| {
            (
                "model".to_string(),
                format!(
                    "is required (an export folder) unless every file is given; missing: {}",
                    missing.join(", ")
                ),
            )
        })
        .into_iter()
        .collect()
}

/// Paths and names that are set but blank.
pub fn blank_fields(fields: &[(&str, &Option<String>)]) -> Vec<(String, String)> {
    fields
        .iter()
        .filter(|(_, v)| v.as_deref().is_some_and(|p| p.trim().is_empty()))
        .map(|(field, _)| (field.to_string(), "must not be empty".to_string()))
        .collect()
}
