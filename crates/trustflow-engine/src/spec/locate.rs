//! Field path -> (line, column) in the YAML text, so that errors found after parsing
//! (semantic checks, or serde errors whose location was lost in buffering) still point
//! at the right line. Paths look like serde_path_to_error's: `stages[1].max_pixels`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

use crate::error::{SpecIssue, SpecLocation};

#[derive(Debug, Clone, Default)]
pub struct Locations {
    by_path: HashMap<String, (usize, usize)>,
    /// The scalar values (not keys) whose text holds a `$`, in file order: what
    /// `${NAME}` interpolation works on.
    dollar_scalars: Vec<DollarScalar>,
    /// Field path -> index in `dollar_scalars`.
    dollar_by_path: HashMap<String, usize>,
}

/// A scalar value holding a `$`, as written in the file.
#[derive(Debug, Clone)]
pub struct DollarScalar {
    /// Its field path (`stages[1].model`).
    pub path: String,
    /// Line and column (1-based) where the scalar starts.
    pub at: (usize, usize),
    /// Its source text in the file: with its quotes; a block scalar's content lines
    /// only (from the first one's indentation to the last line break), not its header.
    pub bytes: Range<usize>,
    /// Written plain (unquoted, not a block): its type comes from its text.
    pub plain: bool,
    /// A literal (`|`) or folded (`>`) block.
    pub block: bool,
    /// Its value once YAML has read it (quotes and escapes resolved).
    pub value: String,
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        expecting_key: bool,
    },
    Seq {
        path: String,
        index: usize,
    },
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl Locations {
    /// Index every key and sequence item of `text`. Malformed YAML yields what was
    /// indexed before the error (the parse error itself is reported by serde).
    pub fn index(text: &str) -> Self {
        let mut by_path = HashMap::new();
        let mut dollar_scalars = Vec::new();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let at = (span.start.line(), span.start.col() + 1);
            let opens = matches!(event, Event::MappingStart(..) | Event::SequenceStart(..));
            match event {
                Event::Scalar(..)
                | Event::Alias(..)
                | Event::MappingStart(..)
                | Event::SequenceStart(..) => {
                    // A scalar in key position names the next field.
                    if let (
                        Some(Frame::Map {
                            path,
                            key,
                            expecting_key,
                        }),
                        Event::Scalar(v, ..),
                    ) = (stack.last_mut(), &event)
                        && *expecting_key
                    {
                        let field = join(path, v);
                        by_path.entry(field).or_insert(at);
                        *key = Some(v.to_string());
                        *expecting_key = false;
                        continue;
                    }
                    // An alias in key position (`*k: v`) names a field we cannot spell
                    // here; it must still take the key's turn.
                    if let (
                        Some(Frame::Map {
                            key, expecting_key, ..
                        }),
                        Event::Alias(..),
                    ) = (stack.last_mut(), &event)
                        && *expecting_key
                    {
                        *key = Some("*".into());
                        *expecting_key = false;
                        continue;
                    }
                    let value_path = match stack.last() {
                        Some(Frame::Map { path, key, .. }) => {
                            join(path, key.as_deref().unwrap_or("?"))
                        }
                        Some(Frame::Seq { path, index }) => format!("{path}[{index}]"),
                        None => String::new(),
                    };
                    by_path.entry(value_path.clone()).or_insert(at);
                    if let Event::Scalar(v, style, ..) = &event
                        && v.contains('$')
                        && let Some(bytes) = span.byte_range()
                    {
                        dollar_scalars.push(DollarScalar {
                            path: value_path.clone(),
                            at,
                            bytes,
                            plain: *style == ScalarStyle::Plain,
                            block: matches!(style, ScalarStyle::Literal | ScalarStyle::Folded),
                            value: v.to_string(),
                        });
                    }
                    if opens {
                        stack.push(match event {
                            Event::MappingStart(..) => Frame::Map {
                                path: value_path,
                                key: None,
                                expecting_key: true,
                            },
                            _ => Frame::Seq {
                                path: value_path,
                                index: 0,
                            },
                        });
                    } else {
                        value_done(&mut stack);
                    }
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    value_done(&mut stack);
                }
                _ => {}
            }
        }
        let dollar_by_path = dollar_scalars
            .iter()
            .enumerate()
            .map(|(i, s): (usize, &DollarScalar)| (s.path.clone(), i))
            .collect();
        Locations {
            by_path,
            dollar_scalars,
            dollar_by_path,
        }
    }

    /// The scalar values holding a `$`, in file order.
    pub fn dollar_scalars(&self) -> &[DollarScalar] {
        &self.dollar_scalars
    }

    /// The scalar value at `path`, if it holds a `$`.
    pub fn dollar_scalar(&self, path: &str) -> Option<&DollarScalar> {
        self.dollar_by_path
            .get(path)
            .and_then(|&i| self.dollar_scalars.get(i))
    }

    /// Line and column (1-based) of `path`, or of its nearest located ancestor.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(at) = self.by_path.get(p) {
                return Some(*at);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    pub fn issue(&self, file: &Path, field: &str, message: impl Into<String>) -> SpecIssue {
        let at = self.find(field);
        SpecIssue {
            location: SpecLocation {
                file: file.to_path_buf(),
                field: field.to_string(),
                line: at.map(|a| a.0),
                column: at.map(|a| a.1),
            },
            message: message.into(),
        }
    }
}

fn value_done(stack: &mut [Frame]) {
    match stack.last_mut() {
        Some(Frame::Map { expecting_key, .. }) => *expecting_key = true,
        Some(Frame::Seq { index, .. }) => *index += 1,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_items_and_nearest_ancestor() {
        let text = "source:\n  paths: [a, b]\nstages:\n  - type: decode\n    workers: 2\n  - type: clean_caption\n    name: clean\n";
        let loc = Locations::index(text);
        assert_eq!(loc.find("source"), Some((1, 1)));
        assert_eq!(loc.find("source.paths"), Some((2, 3)));
        assert_eq!(loc.find("source.paths[1]"), Some((2, 14)));
        assert_eq!(loc.find("stages[0].workers"), Some((5, 5)));
        assert_eq!(loc.find("stages[1].name"), Some((7, 5)));
        assert_eq!(loc.find("stages[1]"), Some((6, 5)));
        // Unknown paths fall back to the closest parent that exists.
        assert_eq!(loc.find("stages[1].nope.deeper"), Some((6, 5)));
        assert_eq!(loc.find("runtime"), None);
    }
}
