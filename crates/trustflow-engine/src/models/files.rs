//! Where a model stage finds its files: an export folder (`model:`) whose standard file
//! names can each be overridden by an explicit path. Each model stage declares its own
//! files once with [`model_files!`] (the setting, its name inside the folder, whether
//! the folder may be left out without it), giving a settings block that its config
//! flattens, as it does [`SessionConfig`](super::onnx::SessionConfig). Resolving,
//! looking up and checking those paths is written once, in [`ModelFiles`].

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Make every relative path relative to `base` (the pipeline file's folder).
pub fn resolve_against<'a>(base: &Path, paths: impl IntoIterator<Item = &'a mut Option<String>>) {
    for path in paths.into_iter().flatten() {
        if Path::new(path.as_str()).is_relative() {
            *path = base.join(path.as_str()).to_string_lossy().into_owned();
        }
    }
}

/// Paths and names that are set but blank, as (field, message) problems, as stage
/// configs' `validate` returns them.
pub fn blank_fields(fields: &[(&str, &Option<String>)]) -> Vec<(String, String)> {
    fields
        .iter()
        .filter(|(_, v)| v.as_deref().is_some_and(|p| p.trim().is_empty()))
        .map(|(field, _)| (field.to_string(), "must not be empty".to_string()))
        .collect()
}

/// One path setting of a model stage besides `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSlot {
    /// The setting, as written in the pipeline file.
    pub field: &'static str,
    /// The file's name inside the export folder; None for a path that is never looked
    /// up there (e.g. `pseudo_label`'s `head`).
    pub in_folder: Option<&'static str>,
    /// `model` may be left out only when this path is given.
    pub needed: bool,
}

/// A stage's model-file settings: the export folder `model` and the paths that
/// override its files (or stand on their own). Implemented by [`model_files!`]; the
/// provided methods are the logic every model stage shares.
pub trait ModelFiles {
    /// Every path setting but `model`, in declaration order.
    const SLOTS: &'static [FileSlot];

    /// The export folder (`model`).
    fn folder(&self) -> &Option<String>;

    /// The values of [`Self::SLOTS`], in the same order.
    fn values(&self) -> Vec<&Option<String>>;

    /// `model` and every other path setting, for rewriting in place.
    fn paths_mut(&mut self) -> Vec<&mut Option<String>>;

    /// Make every relative path relative to `base` (the pipeline file's folder).
    fn resolve_paths(&mut self, base: &Path) {
        resolve_against(base, self.paths_mut());
    }

    /// The file of setting `field`: its explicit path if given, else its name inside
    /// the export folder; None when neither is set.
    fn file(&self, field: &str) -> Option<PathBuf> {
        // Field names come from the stage's own code: an unknown one is a typo there.
        debug_assert!(
            Self::SLOTS.iter().any(|s| s.field == field),
            "`{field}` is not a file setting of this stage"
        );
        let (slot, value) = Self::SLOTS
            .iter()
            .zip(self.values())
            .find(|(slot, _)| slot.field == field)?;
        match (value, self.folder(), slot.in_folder) {
            (Some(path), _, _) => Some(PathBuf::from(path)),
            (None, Some(folder), Some(name)) => Some(Path::new(folder).join(name)),
            _ => None,
        }
    }

    /// [`Self::file`], or else the bare file name: a stage built from a config that
    /// was never validated then fails on that file not being found.
    fn file_or_name(&self, field: &str) -> PathBuf {
        self.file(field).unwrap_or_else(|| {
            let name = Self::SLOTS
                .iter()
                .find(|s| s.field == field)
                .and_then(|s| s.in_folder);
            PathBuf::from(name.unwrap_or(field))
        })
    }

    /// The needed settings left unset while `model` is unset too: the files the export
    /// folder would have provided.
    fn missing(&self) -> Vec<&'static str> {
        if self.folder().is_some() {
            return Vec::new();
        }
        Self::SLOTS
            .iter()
            .zip(self.values())
            .filter(|(slot, value)| slot.needed && value.is_none())
            .map(|(slot, _)| slot.field)
            .collect()
    }

    /// Path settings (`model` first) that are set but blank.
    fn blank(&self) -> Vec<(String, String)> {
        let fields: Vec<(&str, &Option<String>)> = std::iter::once(("model", self.folder()))
            .chain(Self::SLOTS.iter().map(|s| s.field).zip(self.values()))
            .collect();
        blank_fields(&fields)
    }

    /// The usual checks, as (field, message): `model` is required unless every needed
    /// file is given, and no path is blank.
    fn validate(&self) -> Vec<(String, String)> {
        let missing = self.missing();
        let required = (!missing.is_empty()).then(|| {
            (
                "model".to_string(),
                format!(
                    "is required (an export folder) unless every file is given; missing: {}",
                    missing.join(", ")
                ),
            )
        });
        required.into_iter().chain(self.blank()).collect()
    }

    /// Fails when `model` is set but is not a folder; `expected` says what the folder
    /// should be and hold.
    fn check_folder(&self, expected: &str) -> Result<()> {
        match self.folder() {
            Some(folder) if !Path::new(folder).is_dir() => Err(Error::input(
                folder,
                format!(
                    "model folder not found (expected {expected}; a relative path is resolved \
                     against the pipeline file's folder)"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// Declares a stage's model-file settings block: a struct with `model` and one
/// `Option<String>` per path setting (docs kept, every one `#[serde(default)]`), and its
/// [`ModelFiles`] implementation. Each path is one of
/// - `field: needed "name"`: the folder's file `name`; without `model`, it must be given;
/// - `field: optional "name"`: the folder's file `name`, which may be absent;
/// - `field: path`: a path of its own, never looked up in the folder.
macro_rules! model_files {
    (@slot $field:ident needed $name:literal) => {
        $crate::models::files::FileSlot {
            field: stringify!($field),
            in_folder: Some($name),
            needed: true,
        }
    };
    (@slot $field:ident optional $name:literal) => {
        $crate::models::files::FileSlot {
            field: stringify!($field),
            in_folder: Some($name),
            needed: false,
        }
    };
    (@slot $field:ident path) => {
        $crate::models::files::FileSlot {
            field: stringify!($field),
            in_folder: None,
            needed: false,
        }
    };
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(#[$model_doc:meta])*
            model,
            $(
                $(#[$doc:meta])*
                $field:ident: $kind:ident $($file:literal)?,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug,
            Clone,
            Default,
            PartialEq,
            serde::Serialize,
            serde::Deserialize,
            schemars::JsonSchema,
        )]
        pub struct $name {
            $(#[$model_doc])*
            #[serde(default)]
            pub model: Option<String>,
            $(
                $(#[$doc])*
                #[serde(default)]
                pub $field: Option<String>,
            )*
        }

        impl $name {
            /// Every file from the export folder `model`.
            pub fn in_folder(model: impl Into<String>) -> Self {
                Self {
                    model: Some(model.into()),
                    ..Self::default()
                }
            }
        }

        impl $crate::models::files::ModelFiles for $name {
            const SLOTS: &'static [$crate::models::files::FileSlot] =
                &[$($crate::models::files::model_files!(@slot $field $kind $($file)?)),*];

            fn folder(&self) -> &Option<String> {
                &self.model
            }

            fn values(&self) -> Vec<&Option<String>> {
                vec![$(&self.$field),*]
            }

            fn paths_mut(&mut self) -> Vec<&mut Option<String>> {
                vec![&mut self.model, $(&mut self.$field),*]
            }
        }
    };
}
pub(crate) use model_files;

#[cfg(test)]
mod tests {
    use super::*;

    model_files! {
        /// Files of a test stage.
        pub struct TestFiles {
            /// The export folder.
            model,
            /// A file the folder must hold.
            weights: needed "weights.onnx",
            /// A file the folder may hold.
            extra: optional "extra.json",
            /// A path of its own.
            side: path,
        }
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn files_come_from_the_folder_unless_given() {
        let mut files = TestFiles {
            extra: some("/abs/extra.json"),
            side: some("side.bin"),
            ..TestFiles::in_folder("export")
        };
        files.resolve_paths(Path::new("/pipes"));
        assert_eq!(files.model.as_deref(), Some("/pipes/export"));
        assert_eq!(files.side.as_deref(), Some("/pipes/side.bin"));
        assert_eq!(
            files.file("weights"),
            Some("/pipes/export/weights.onnx".into())
        );
        assert_eq!(files.file("extra"), Some("/abs/extra.json".into()));
        assert_eq!(files.file("side"), Some("/pipes/side.bin".into()));
        files.side = None;
        assert_eq!(files.file("side"), None, "never looked up in the folder");
        files.model = None;
        assert_eq!(files.file("weights"), None);
        assert_eq!(files.file_or_name("weights"), PathBuf::from("weights.onnx"));
        assert_eq!(files.file_or_name("side"), PathBuf::from("side"));
    }

    #[test]
    fn checks_name_the_setting() {
        let mut files = TestFiles::default();
        assert_eq!(files.missing(), ["weights"]);
        let problems = files.validate();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "model");
        assert!(problems[0].1.ends_with("missing: weights"), "{problems:?}");
        files.weights = some("w.onnx");
        assert!(files.validate().is_empty());
        files.model = some(" ");
        files.side = some("");
        let fields: Vec<String> = files.validate().into_iter().map(|p| p.0).collect();
        assert_eq!(fields, ["model", "side"]);
        let err = files.check_folder("a test folder").unwrap_err().to_string();
        assert!(
            err.contains("model folder not found (expected a test folder;"),
            "{err}"
        );
        files.model = None;
        assert!(files.check_folder("a test folder").is_ok());
    }

    #[test]
    fn the_block_reads_and_describes_its_settings() {
        let files: TestFiles =
            serde_json::from_value(serde_json::json!({"model": "m", "side": "s"})).unwrap();
        assert_eq!(
            (files.model.as_deref(), files.side.as_deref()),
            (Some("m"), Some("s"))
        );
        let keys = crate::fields::schema_property_names::<TestFiles>();
        assert_eq!(keys, ["model", "weights", "extra", "side"]);
        let fields: Vec<&str> = TestFiles::SLOTS.iter().map(|s| s.field).collect();
        assert_eq!(fields, ["weights", "extra", "side"]);
    }
}
