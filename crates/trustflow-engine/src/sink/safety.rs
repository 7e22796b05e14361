//! Plan-time guards of the output folder: a run must never write over its own inputs,
//! nor let two inputs write the same output file. Both are decided on resolved paths
//! (symlinks and `..` followed), before any data is read, so `validate` refuses them
//! too.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use crate::columns::output_names;
use crate::error::{Error, Result};

/// `path` made absolute with symlinks resolved as far as it exists: the longest
/// existing ancestor is canonicalised and the rest appended (`..` applied lexically).
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest: Vec<Component<'_>> = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
        match (existing.parent(), existing.components().next_back()) {
            (Some(parent), Some(last)) => {
                rest.push(last);
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Refuse an output folder that is or contains the folder of an input shard, or lies
/// inside a folder the inputs are searched in (`roots`: the folders and glob bases
/// named in `source.paths`; a folder beside explicitly named files is fine, as nothing
/// searches it), and inputs whose output names collide. `inputs` are (stem, path).
pub fn check_outputs(
    out_dir: &Path,
    inputs: &[(String, PathBuf)],
    roots: &[PathBuf],
) -> Result<()> {
    if crate::storage::is_remote(out_dir) {
        check_remote_outputs(out_dir, inputs, roots)?;
        return check_names(inputs);
    }
    let out = resolve(out_dir);
    // `--out` replaces `sink.path` after `validate`'s own check of it.
    if let Some(file) = out.ancestors().find(|a| a.is_file()) {
        return Err(Error::input(
            out_dir,
            format!(
                "{} is a file; expected a folder for the output shards",
                file.display()
            ),
        ));
    }
    let refuse = |what: String| {
        Error::input(
            out_dir,
            format!(
                "the output folder (resolved: {}) {what}; a run there could overwrite or \
                 re-read its own inputs. Choose an output folder outside the inputs' folders",
                out.display()
            ),
        )
    };
    for (_, input) in inputs {
        let resolved = resolve(input);
        let Some(folder) = resolved.parent() else {
            continue;
        };
        if out == folder {
            return Err(refuse(format!(
                "is the folder of input shard {}",
                input.display()
            )));
        }
        if folder.starts_with(&out) {
            return Err(refuse(format!(
                "contains the folder of input shard {}",
                input.display()
            )));
        }
    }
    for root in roots {
        if out.starts_with(resolve(root)) {
            return Err(refuse(format!(
                "lies inside {}, where input shards are searched",
                root.display()
            )));
        }
    }
    check_names(inputs)
}

/// [`check_outputs`] for an output prefix in an object store: the same rules, on keys
/// (a store has no links or `..`). Local inputs cannot clash with it.
fn check_remote_outputs(
    out_dir: &Path,
    inputs: &[(String, PathBuf)],
    roots: &[PathBuf],
) -> Result<()> {
    use crate::storage::{ObjectUri, is_remote};
    let out = ObjectUri::of_path(out_dir)?.to_string();
    let within = |inner: &str, outer: &str| {
        inner == outer || inner.starts_with(&format!("{}/", outer.trim_end_matches('/')))
    };
    let refuse = |what: String| {
        Error::input(
            out_dir,
            format!(
                "the output prefix {what}; a run there could overwrite or re-read its own \
                 inputs. Choose an output prefix outside the inputs' prefixes"
            ),
        )
    };
    for (_, input) in inputs.iter().filter(|(_, p)| is_remote(p)) {
        let folder = ObjectUri::of_path(input)?.parent().to_string();
        if out == folder {
            return Err(refuse(format!(
                "is the prefix of input shard {}",
                input.display()
            )));
        }
        if within(&folder, &out) {
            return Err(refuse(format!(
                "contains the prefix of input shard {}",
                input.display()
            )));
        }
    }
    for root in roots.iter().filter(|r| is_remote(r)) {
        let root = ObjectUri::of_path(root)?.to_string();
        if within(&out, &root) {
            return Err(refuse(format!(
                "lies inside {root}, where input shards are searched"
            )));
        }
    }
    Ok(())
}

/// Two inputs may not write one output file.
fn check_names(inputs: &[(String, PathBuf)]) -> Result<()> {
    let mut taken: HashMap<String, &Path> = HashMap::new();
    for (stem, input) in inputs {
        for name in output_names(stem) {
            if let Some(first) = taken.insert(name.clone(), input) {
                return Err(Error::input(
                    input,
                    format!(
                        "its output `{name}` would also be written for input {}; outputs are \
                         named after the input's file stem, so rename one of the two",
                        first.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(paths: &[&Path]) -> Vec<(String, PathBuf)> {
        paths
            .iter()
            .map(|p| {
                let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
                (stem, p.to_path_buf())
            })
            .collect()
    }

    #[test]
    fn outputs_over_inputs_are_refused_through_dots_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let shard = data.join("a.parquet");
        std::fs::write(&shard, b"x").unwrap();
        let list = inputs(&[&shard]);
        for out in [data.clone(), data.join("sub/.."), dir.path().to_path_buf()] {
            let err = check_outputs(&out, &list, &[]).unwrap_err().to_string();
            assert!(err.contains("a.parquet"), "{out:?}: {err}");
        }
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        assert!(check_outputs(&link, &list, &[]).is_err());
        assert!(check_outputs(&dir.path().join("elsewhere/out"), &list, &[]).is_ok());
        // Beside a named file is fine; inside a searched folder is not.
        assert!(check_outputs(&data.join("out"), &list, &[]).is_ok());
        let err = check_outputs(&data.join("out"), &list, std::slice::from_ref(&data)).unwrap_err();
        assert!(err.to_string().contains("searched"), "{err}");
    }

    #[test]
    fn an_output_folder_at_or_under_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        for out in [file.clone(), file.join("out")] {
            let err = check_outputs(&out, &[], &[]).unwrap_err().to_string();
            assert!(err.contains("is a file"), "{err}");
        }
    }

    #[test]
    fn colliding_output_names_name_both_inputs() {
        let a = Path::new("/x/a/s.parquet");
        let b = Path::new("/x/b/s.quarantine.parquet");
        let c = Path::new("/x/c/s.parquet");
        let list = vec![
            ("s".to_string(), a.to_path_buf()),
            ("s.quarantine".to_string(), b.to_path_buf()),
        ];
        let err = check_outputs(Path::new("/y/out"), &list, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/a/s.parquet") && err.contains("/x/b/s.quarantine.parquet"),
            "{err}"
        );
        let err = check_outputs(Path::new("/y/out"), &inputs(&[a, c]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/x/a/s.parquet") && err.contains("/x/c/s.parquet"),
            "{err}"
        );
    }
}
