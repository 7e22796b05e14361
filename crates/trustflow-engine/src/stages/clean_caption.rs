//! The `clean_caption` stage: the caption cleaning of the TRUST method (strip HTML,
//! URLs, handles, digits and punctuation, collapse whitespace, cap the length) and a
//! flag for captions that are missing or empty once cleaned.

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, AsArray, BooleanBuilder, StringArrayType, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use regex::{Captures, Regex, Replacer};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Stage, StageConfig, StageOutput, require_column};
use crate::columns::CAPTION;
use crate::error::{Error, Result};

/// Output column: the cleaned caption, null when missing.
pub const CAPTION_CLEAN: &str = "caption_clean";
/// Output column: true when the caption is null or too short once cleaned.
pub const CAPTION_MISSING: &str = "caption_missing";

/// Quarantine reason for a null caption.
pub const REASON_MISSING: &str = "caption is missing";
/// Quarantine reason for a caption that cleaning left empty.
pub const REASON_EMPTY: &str = "caption is empty after cleaning";

const ACCEPTED: [DataType; 3] = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View];

/// One kind of noise removed from captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CaptionRule {
    /// `http://`, `https://`, `ftp://` and `www.` links, up to the next whitespace.
    Urls,
    /// HTML tags and comments; entities such as `&amp;` and `&#39;` are decoded.
    Html,
    /// `@user.name` handles and whole e-mail addresses.
    Handles,
    /// Unicode decimal digits.
    Digits,
    /// Every character that is not a letter, number or whitespace (symbols and emoji
    /// included) becomes a space; an apostrophe between letters is dropped.
    Punctuation,
}

impl CaptionRule {
    /// Every rule: the default `strip` list.
    pub const ALL: [CaptionRule; 5] = [
        Self::Urls,
        Self::Html,
        Self::Handles,
        Self::Digits,
        Self::Punctuation,
    ];
}

/// What to do with a caption that is null or too short once cleaned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// Keep the row with `caption_missing = true` and a null `caption_clean`.
    #[default]
    Mark,
    /// Send the row to quarantine.
    Quarantine,
}

/// Settings of the `clean_caption` stage. Every field is optional; the defaults are
/// those of [`Default`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CleanCaptionConfig {
    /// Noise to remove. Default: all of `urls`, `html`, `handles`, `digits`,
    /// `punctuation` (always applied in the order html, urls, handles, digits,
    /// punctuation, whatever the order listed here).
    pub strip: Vec<CaptionRule>,
    /// Lowercase the cleaned caption. Default false.
    pub lowercase: bool,
    /// Longest cleaned caption kept, in characters; longer text is cut at the last
    /// whitespace before the limit (or at the limit inside one long word). Default 1000.
    #[schemars(range(min = 1))]
    pub max_chars: usize,
    /// Cleaned captions with fewer characters than this count as missing. Default 1.
    pub min_chars: usize,
    /// What to do with missing captions: `mark` them (default) or `quarantine` them.
    pub on_missing: OnMissing,
}

impl Default for CleanCaptionConfig {
    fn default() -> Self {
        Self {
            strip: CaptionRule::ALL.to_vec(),
            lowercase: false,
            max_chars: 1000,
            min_chars: 1,
            on_missing: OnMissing::Mark,
        }
    }
}

impl CleanCaptionConfig {
    fn strips(&self, rule: CaptionRule) -> bool {
        self.strip.contains(&rule)
    }
}

impl StageConfig for CleanCaptionConfig {
    fn validate(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, message: String| problems.push((field.into(), message));
        if self.max_chars == 0 {
            problem("max_chars", "must be greater than 0".into());
        }
        if self.min_chars > self.max_chars {
            let (min, max) = (self.min_chars, self.max_chars);
            problem(
                "min_chars",
                format!("is {min} but max_chars is {max}; no caption could be kept"),
            );
        }
        for (i, rule) in self.strip.iter().enumerate() {
            if self.strip[..i].contains(rule) {
                // The Debug names are the single-word serde names, capitalised.
                let name = format!("{rule:?}").to_lowercase();
                problem("strip", format!("`{name}` is listed more than once"));
            }
        }
        problems
    }

    fn build(&self, name: String, _base: &std::path::Path) -> Result<Arc<dyn Stage>> {
        Ok(Arc::new(CleanCaptionStage::new(name, self.clone())?))
    }
}

/// The compiled patterns, shared by every caller.
struct Patterns {
    tag: Regex,
    entity: Regex,
    url: Regex,
    email: Regex,
    handle: Regex,
    digit: Regex,
    punctuation: Regex,
}

impl Patterns {
    fn compile() -> std::result::Result<Self, regex::Error> {
        Ok(Self {
            // A tag must start with a letter (or `/`, `!--`), so "a < b" and "<3" stay.
            tag: Regex::new(r"(?s)<!--.*?-->|</?[A-Za-z][^<>]*>")?,
            entity: Regex::new(r"&(#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|amp|lt|gt|quot|apos|nbsp);")?,
            url: Regex::new(r"(?i)\b(?:(?:https?|ftp)://|www\.)\S*")?,
            email: Regex::new(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")?,
            // `\B` keeps "a@b" (no boundary before `@` only when preceded by a non-word
            // char or the start); dots only inside the handle, not a sentence's last one.
            handle: Regex::new(r"\B@\w+(?:\.\w+)*")?,
            // Marks attached to a digit (keycap sequences) go with it.
            digit: Regex::new(r"\d[\p{M}\x{200C}\x{200D}]*")?,
            // Runs of characters that are not letters, numbers, marks or whitespace,
            // with the marks and joiners attached to them (emoji variation selectors,
            // ZWJ sequences); marks and joiners inside words (Indic scripts) stay.
            punctuation: Regex::new(
                r"(?:[^\p{L}\p{N}\p{M}\s\x{200C}\x{200D}][\p{M}\x{200C}\x{200D}]*)+",
            )?,
        })
    }
}

static PATTERNS: LazyLock<std::result::Result<Patterns, regex::Error>> =
    LazyLock::new(Patterns::compile);

/// Clean one caption with `config` (see [`CaptionRule`] for what each rule removes).
/// Order: HTML, URLs, handles, digits, punctuation, lowercase, whitespace collapse,
/// `max_chars` cut.
pub fn clean_caption(text: &str, config: &CleanCaptionConfig) -> String {
    let mut text = text.to_string();
    // The patterns are constant and a test checks they compile; `CleanCaptionStage::new`
    // refuses to build if they did not, so only whitespace handling runs without them.
    if let Ok(p) = PATTERNS.as_ref() {
        if config.strips(CaptionRule::Html) {
            replace_all(&mut text, &p.tag, " ");
            replace_all(&mut text, &p.entity, decode_entity);
        }
        if config.strips(CaptionRule::Urls) {
            replace_all(&mut text, &p.url, " ");
        }
        if config.strips(CaptionRule::Handles) {
            replace_all(&mut text, &p.email, " ");
            replace_all(&mut text, &p.handle, " ");
        }
        if config.strips(CaptionRule::Digits) {
            replace_all(&mut text, &p.digit, "");
        }
        if config.strips(CaptionRule::Punctuation) {
            text = strip_punctuation(&p.punctuation, &text);
        }
    }
    if config.lowercase {
        text = text.to_lowercase();
    }
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate_chars(&text, config.max_chars).to_string()
}

/// Replace in place, reallocating only when something matched.
fn replace_all(text: &mut String, pattern: &Regex, with: impl Replacer) {
    let replaced = match pattern.replace_all(text, with) {
        Cow::Owned(new) => Some(new),
        Cow::Borrowed(_) => None,
    };
    if let Some(new) = replaced {
        *text = new;
    }
}

fn decode_entity(caps: &Captures<'_>) -> String {
    let name = &caps[1];
    let decoded = match name {
        "amp" => Some('&'),
        "lt" => Some('<'),
        "gt" => Some('>'),
        "quot" => Some('"'),
        "apos" => Some('\''),
        "nbsp" => Some('\u{a0}'),
        _ => {
            let code = match name.strip_prefix("#x").or_else(|| name.strip_prefix("#X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => name.strip_prefix('#').and_then(|dec| dec.parse().ok()),
            };
            // Invalid code points (surrogates, > U+10FFFF) decode to nothing.
            code.and_then(char::from_u32)
        }
    };
    decoded.map(String::from).unwrap_or_default()
}

/// Replace punctuation runs by a space, except a lone apostrophe between two letters,
/// which is dropped so "don't" becomes "dont" rather than "don t".
fn strip_punctuation(pattern: &Regex, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for m in pattern.find_iter(text) {
        out.push_str(&text[last..m.start()]);
        // Neighbours of a maximal run are letters, numbers, marks or whitespace.
        let is_letter = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace() && !c.is_numeric());
        let apostrophe = matches!(m.as_str(), "'" | "\u{2019}");
        if !(apostrophe
            && is_letter(text[..m.start()].chars().next_back())
            && is_letter(text[m.end()..].chars().next()))
        {
            out.push(' ');
        }
        last = m.end();
    }
    out.push_str(&text[last..]);
    out
}

/// Cut whitespace-collapsed `text` to at most `max_chars` characters, at the last
/// space that keeps whole words if there is one, else inside the word.
fn truncate_chars(text: &str, max_chars: usize) -> &str {
    let Some((limit, next)) = text.char_indices().nth(max_chars) else {
        return text;
    };
    let head = &text[..limit];
    if next == ' ' {
        return head;
    }
    match head.rfind(' ') {
        Some(space) if space > 0 => &head[..space],
        _ => head,
    }
}

/// The built `clean_caption` stage.
#[derive(Debug)]
pub struct CleanCaptionStage {
    name: String,
    config: CleanCaptionConfig,
}

impl CleanCaptionStage {
    /// Build the stage; fails only if the cleaning patterns do not compile.
    pub fn new(name: String, config: CleanCaptionConfig) -> Result<Self> {
        let compiled = PATTERNS.as_ref().map(|_| ());
        compiled
            .map_err(|e| Error::stage(&name, format!("caption patterns do not compile: {e}")))?;
        Ok(Self { name, config })
    }

    fn clean_all<'a>(&self, captions: impl StringArrayType<'a>, rows: usize) -> StageOutput {
        let mut clean = StringBuilder::with_capacity(rows, rows * 64);
        let mut missing = BooleanBuilder::with_capacity(rows);
        let mut rejected = Vec::new();
        for (row, caption) in captions.iter().enumerate() {
            let outcome = match caption {
                None => Err(REASON_MISSING.to_string()),
                Some(text) => {
                    let cleaned = clean_caption(text, &self.config);
                    let chars = cleaned.chars().count();
                    if chars >= self.config.min_chars {
                        Ok(cleaned)
                    } else if chars == 0 {
                        Err(REASON_EMPTY.to_string())
                    } else {
                        Err(format!(
                            "caption is too short after cleaning ({chars} characters, \
                             minimum {})",
                            self.config.min_chars
                        ))
                    }
                }
            };
            match outcome {
                Ok(cleaned) => {
                    clean.append_value(cleaned);
                    missing.append_value(false);
                }
                Err(reason) => {
                    clean.append_null();
                    missing.append_value(true);
                    if self.config.on_missing == OnMissing::Quarantine {
                        rejected.push((row, reason));
                    }
                }
            }
        }
        StageOutput {
            columns: vec![
                Arc::new(clean.finish()) as ArrayRef,
                Arc::new(missing.finish()),
            ],
            rejected,
        }
    }
}

impl Stage for CleanCaptionStage {
    fn name(&self) -> &str {
        &self.name
    }

    fn output_fields(&self, input: &Schema) -> Result<Vec<Field>> {
        require_column(&self.name, input, CAPTION, &ACCEPTED)?;
        Ok(vec![
            Field::new(CAPTION_CLEAN, DataType::Utf8, true),
            Field::new(CAPTION_MISSING, DataType::Boolean, false),
        ])
    }

    fn process(&self, batch: &RecordBatch) -> Result<StageOutput> {
        let schema = batch.schema();
        require_column(&self.name, &schema, CAPTION, &ACCEPTED)?;
        let column = batch
            .column_by_name(CAPTION)
            .ok_or_else(|| Error::stage(&self.name, format!("batch lacks column `{CAPTION}`")))?;
        let rows = batch.num_rows();
        Ok(match column.data_type() {
            DataType::Utf8 => self.clean_all(column.as_string::<i32>(), rows),
            DataType::LargeUtf8 => self.clean_all(column.as_string::<i64>(), rows),
            DataType::Utf8View => self.clean_all(column.as_string_view(), rows),
            other => {
                return Err(Error::stage(
                    &self.name,
                    format!("input column `{CAPTION}` has unexpected type {other}"),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::{StageKind, StageSpec};
    use arrow::array::{Array, LargeStringArray, StringArray, StringViewArray};
    use proptest::prelude::*;

    fn only(rules: &[CaptionRule]) -> CleanCaptionConfig {
        CleanCaptionConfig {
            strip: rules.to_vec(),
            ..CleanCaptionConfig::default()
        }
    }

    fn clean(text: &str) -> String {
        clean_caption(text, &CleanCaptionConfig::default())
    }

    #[test]
    fn patterns_compile() {
        assert!(PATTERNS.as_ref().is_ok());
    }

    #[test]
    fn default_config_cleans_the_reference_example() {
        assert_eq!(
            clean("Check <b>this</b> out: https://x.co/a?b=1 by @jo_doe!! 2024 &amp; more"),
            "Check this out by more"
        );
    }

    #[test]
    fn html_tags_removed_and_entities_decoded() {
        let html = only(&[CaptionRule::Html]);
        assert_eq!(
            clean_caption(
                "<p>Hello&nbsp;<i>world</i></p><br/>Line&#39;s &lt;tag&gt; &quot;q&quot; \
                 &apos;a&apos; &#x41;&#66;<img src=\"x.png\" alt='y'>end<!-- note -->.",
                &html
            ),
            "Hello world Line's <tag> \"q\" 'a' AB end ."
        );
        // Decoded once only, and text that merely looks like comparison stays.
        assert_eq!(
            clean_caption("&amp;lt; a < b and c > d, I <3 you", &html),
            "&lt; a < b and c > d, I <3 you"
        );
        assert_eq!(
            clean_caption("bad &#xD800; &#99999999; ok", &html),
            "bad &#99999999; ok"
        );
        // Tags go before URLs are looked for, so the link text survives.
        assert_eq!(clean("<a href=\"https://x.co\">link</a>"), "link");
    }

    #[test]
    fn urls_removed_up_to_whitespace() {
        let urls = only(&[CaptionRule::Urls]);
        assert_eq!(
            clean_caption(
                "see https://a.b/c?d=1, http://x.y FTP://files.org/z and www.example.com/page end",
                &urls
            ),
            "see and end"
        );
        // `www.` must start a word.
        assert_eq!(clean_caption("awww.so cute", &urls), "awww.so cute");
    }

    #[test]
    fn handles_and_emails_removed() {
        let handles = only(&[CaptionRule::Handles]);
        assert_eq!(
            clean_caption(
                "thanks @jo_doe and @mary.smith. mail me: jo.doe+tag@example.co.uk or a@b",
                &handles
            ),
            "thanks and . mail me: or a@b"
        );
    }

    #[test]
    fn unicode_digits_removed() {
        let digits = only(&[CaptionRule::Digits]);
        assert_eq!(
            clean_caption("Room 101, floor ٣ and ５, ½ cup, covid19", &digits),
            "Room , floor and , ½ cup, covid"
        );
    }

    #[test]
    fn punctuation_symbols_and_apostrophes() {
        let punct = only(&[CaptionRule::Punctuation]);
        assert_eq!(
            clean_caption(
                "Don't stop—it’s rock'n'roll! ‘quoted’ 'edge' 50% off #tag a+b=c ~x~",
                &punct
            ),
            "Dont stop its rocknroll quoted edge 50 off tag a b c x"
        );
    }

    #[test]
    fn unicode_text_is_kept() {
        assert_eq!(
            clean("Café déjà vu — 東京タワー、綺麗！ naïve Ærø"),
            "Café déjà vu 東京タワー 綺麗 naïve Ærø"
        );
        // Decomposed accents and Indic vowel signs / viramas are marks inside words.
        assert_eq!(clean("e\u{301}te\u{301}!"), "e\u{301}te\u{301}");
        assert_eq!(clean("नमस्ते दुनिया!"), "नमस्ते दुनिया");
        assert_eq!(clean("Привет, мир"), "Привет мир");
    }

    #[test]
    fn emoji_removed() {
        assert_eq!(
            clean("Great day 😀🎉 at the beach 🏖️ ❤️ 👨‍👩‍👧 👍🏽! 1️⃣"),
            "Great day at the beach"
        );
    }

    #[test]
    fn lowercase_when_asked() {
        let config = CleanCaptionConfig {
            lowercase: true,
            ..CleanCaptionConfig::default()
        };
        assert_eq!(
            clean_caption("HELLO World ÉCOLE İ", &config),
            "hello world école i\u{307}"
        );
    }

    #[test]
    fn whitespace_collapsed_and_trimmed() {
        assert_eq!(
            clean_caption("  a\t\tb\n\nc\u{a0}d \u{2003} ", &only(&[])),
            "a b c d"
        );
        // No rule listed: nothing but whitespace changes.
        assert_eq!(
            clean_caption("Visit  https://x.co @jo 2024!", &only(&[])),
            "Visit https://x.co @jo 2024!"
        );
    }

    #[test]
    fn max_chars_cuts_at_word_boundary_or_limit() {
        let cut = |text: &str, max_chars| {
            clean_caption(
                text,
                &CleanCaptionConfig {
                    max_chars,
                    ..only(&[])
                },
            )
        };
        assert_eq!(cut("the quick brown fox", 12), "the quick");
        assert_eq!(cut("the quick brown fox", 9), "the quick");
        assert_eq!(cut("the quick brown fox", 10), "the quick");
        assert_eq!(cut("the quick brown fox", 3), "the");
        assert_eq!(cut("the quick brown fox", 2), "th");
        assert_eq!(cut("the quick brown fox", 19), "the quick brown fox");
        assert_eq!(cut("abcdefghij", 4), "abcd");
        assert_eq!(cut("日本語のテキスト", 3), "日本語");
        assert_eq!(cut("ééé ééé", 5), "ééé");
    }

    #[test]
    fn config_defaults_serde_and_schema() {
        let parsed: CleanCaptionConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, CleanCaptionConfig::default());
        assert_eq!(parsed.strip, CaptionRule::ALL.to_vec());
        assert_eq!((parsed.max_chars, parsed.min_chars), (1000, 1));
        assert_eq!(parsed.on_missing, OnMissing::Mark);
        assert!(!parsed.lowercase);
        let parsed: CleanCaptionConfig = serde_json::from_str(
            r#"{"strip": ["digits", "urls"], "lowercase": true, "on_missing": "quarantine"}"#,
        )
        .unwrap();
        assert_eq!(parsed.strip, vec![CaptionRule::Digits, CaptionRule::Urls]);
        assert_eq!(parsed.on_missing, OnMissing::Quarantine);
        assert!(serde_json::from_str::<CleanCaptionConfig>(r#"{"lower": true}"#).is_err());
        assert!(serde_json::from_str::<CleanCaptionConfig>(r#"{"strip": ["emoji"]}"#).is_err());

        let schema = serde_json::to_value(schemars::schema_for!(CleanCaptionConfig)).unwrap();
        for field in ["strip", "lowercase", "max_chars", "min_chars", "on_missing"] {
            let description = schema["properties"][field]["description"].as_str();
            assert!(description.is_some_and(|d| !d.is_empty()), "{field}");
        }
    }

    #[test]
    fn config_through_stage_spec() {
        let spec: StageSpec =
            serde_json::from_str(r#"{"type": "clean_caption", "name": "c", "max_chars": 7}"#)
                .unwrap();
        assert_eq!(
            spec.kind,
            StageKind::CleanCaption(CleanCaptionConfig {
                max_chars: 7,
                ..CleanCaptionConfig::default()
            })
        );
        assert_eq!(spec.build(std::path::Path::new(".")).unwrap().name(), "c");
    }

    #[test]
    fn validate_reports_problems() {
        assert!(CleanCaptionConfig::default().validate().is_empty());
        let bad = CleanCaptionConfig {
            max_chars: 0,
            strip: vec![CaptionRule::Urls, CaptionRule::Html, CaptionRule::Urls],
            ..CleanCaptionConfig::default()
        };
        assert_eq!(
            bad.validate(),
            vec![
                (
                    "max_chars".to_string(),
                    "must be greater than 0".to_string()
                ),
                (
                    "min_chars".to_string(),
                    "is 1 but max_chars is 0; no caption could be kept".to_string()
                ),
                (
                    "strip".to_string(),
                    "`urls` is listed more than once".to_string()
                ),
            ]
        );
    }

    fn captions() -> Vec<Option<&'static str>> {
        vec![
            Some("Hello, World!"),
            None,
            Some(""),
            Some("   \t "),
            Some("!!! 123 https://x.co"),
            Some("ok"),
        ]
    }

    fn batch(captions: ArrayRef) -> RecordBatch {
        let schema = Schema::new(vec![Field::new(
            CAPTION,
            captions.data_type().clone(),
            true,
        )]);
        RecordBatch::try_new(Arc::new(schema), vec![captions]).unwrap()
    }

    /// (`caption_clean`, `caption_missing`, rejected rows) of one run.
    type Outcome = (Vec<Option<String>>, Vec<bool>, Vec<(usize, String)>);

    fn run(config: CleanCaptionConfig, captions: ArrayRef) -> Outcome {
        let stage = CleanCaptionStage::new("clean".to_string(), config).unwrap();
        let batch = batch(captions);
        let fields = stage.output_fields(&batch.schema()).unwrap();
        let output = stage.process(&batch).unwrap();
        assert_eq!(output.columns.len(), 2);
        for (column, field) in output.columns.iter().zip(&fields) {
            assert_eq!(column.data_type(), field.data_type());
            assert_eq!(column.len(), batch.num_rows());
        }
        assert!(!fields[1].is_nullable());
        assert_eq!(output.columns[1].null_count(), 0);
        let clean = output.columns[0].as_string::<i32>();
        let missing = output.columns[1].as_boolean();
        (
            clean.iter().map(|v| v.map(str::to_string)).collect(),
            missing.iter().map(|v| v.unwrap_or(false)).collect(),
            output.rejected,
        )
    }

    #[test]
    fn stage_marks_missing_captions() {
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(captions())),
            Arc::new(LargeStringArray::from(captions())),
            Arc::new(StringViewArray::from(captions())),
        ];
        for array in arrays {
            let (clean, missing, rejected) = run(CleanCaptionConfig::default(), array);
            assert_eq!(
                clean,
                vec![
                    Some("Hello World".to_string()),
                    None,
                    None,
                    None,
                    None,
                    Some("ok".to_string())
                ]
            );
            assert_eq!(missing, vec![false, true, true, true, true, false]);
            assert!(rejected.is_empty());
        }
    }

    #[test]
    fn stage_quarantines_missing_captions() {
        let config = CleanCaptionConfig {
            on_missing: OnMissing::Quarantine,
            ..CleanCaptionConfig::default()
        };
        let (clean, missing, rejected) = run(config, Arc::new(StringArray::from(captions())));
        assert_eq!(clean[0].as_deref(), Some("Hello World"));
        assert_eq!(clean[5].as_deref(), Some("ok"));
        assert_eq!(missing, vec![false, true, true, true, true, false]);
        assert_eq!(
            rejected,
            vec![
                (1, REASON_MISSING.to_string()),
                (2, REASON_EMPTY.to_string()),
                (3, REASON_EMPTY.to_string()),
                (4, REASON_EMPTY.to_string()),
            ]
        );
    }

    #[test]
    fn stage_applies_min_chars() {
        let config = CleanCaptionConfig {
            min_chars: 3,
            on_missing: OnMissing::Quarantine,
            ..CleanCaptionConfig::default()
        };
        let (clean, missing, rejected) = run(
            config,
            Arc::new(StringArray::from(vec![Some("ok!"), Some("yes")])),
        );
        assert_eq!(clean, vec![None, Some("yes".to_string())]);
        assert_eq!(missing, vec![true, false]);
        assert_eq!(
            rejected,
            vec![(
                0,
                "caption is too short after cleaning (2 characters, minimum 3)".to_string()
            )]
        );
    }

    #[test]
    fn output_fields_reject_wrong_input() {
        let stage =
            CleanCaptionStage::new("clean".to_string(), CleanCaptionConfig::default()).unwrap();
        let schema = Schema::new(vec![Field::new("image", DataType::LargeBinary, true)]);
        let err = stage.output_fields(&schema).unwrap_err().to_string();
        assert!(
            err.contains("stage `clean`") && err.contains("`caption`"),
            "{err}"
        );
        let schema = Schema::new(vec![Field::new(CAPTION, DataType::Int64, true)]);
        assert!(stage.output_fields(&schema).is_err());
    }

    /// Strings that mix the constructs the rules look for.
    fn caption_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            any::<String>(),
            "[a-zA-Z0-9 ]{0,12}",
            Just("<b>".to_string()),
            Just("</a >".to_string()),
            Just("&amp;".to_string()),
            Just("&#x1F600;".to_string()),
            Just("&#48;".to_string()),
            Just("https://x.co/a?b=1".to_string()),
            Just("www.".to_string()),
            Just("@jo.doe".to_string()),
            Just("a@b.co".to_string()),
            Just("don't".to_string()),
            Just("1\u{fe0f}\u{20e3}".to_string()),
            Just("\u{a0}\t\n \u{3000}".to_string()),
            Just("e\u{301}".to_string()),
            Just("İ".to_string()),
        ];
        proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
    }

    fn config_strategy() -> impl Strategy<Value = CleanCaptionConfig> {
        (
            proptest::sample::subsequence(CaptionRule::ALL.to_vec(), 0..=5),
            any::<bool>(),
            1usize..60,
        )
            .prop_map(|(strip, lowercase, max_chars)| CleanCaptionConfig {
                strip,
                lowercase,
                max_chars,
                ..CleanCaptionConfig::default()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn cleaned_text_invariants(text in caption_strategy(), config in config_strategy()) {
            let out = clean_caption(&text, &config);
            prop_assert!(!out.contains("  "), "{:?}", out);
            prop_assert!(!out.starts_with(char::is_whitespace), "{:?}", out);
            prop_assert!(!out.ends_with(char::is_whitespace), "{:?}", out);
            prop_assert!(out.chars().count() <= config.max_chars, "{:?}", out);
            prop_assert!(!out.chars().any(|c| c.is_whitespace() && c != ' '), "{:?}", out);
            if config.strip.contains(&CaptionRule::Digits) {
                prop_assert!(!out.chars().any(|c| c.is_ascii_digit()), "{:?}", out);
            }
            // Cleaning is idempotent once every rule is applied.
            if config.strip.len() == CaptionRule::ALL.len() {
                prop_assert_eq!(clean_caption(&out, &config), out);
            }
        }

        #[test]
        fn arbitrary_strings_never_panic(text in any::<String>()) {
            let _ = clean(&text);
        }

        #[test]
        fn stage_never_panics(rows in proptest::collection::vec(proptest::option::of(caption_strategy()), 0..8)) {
            let array = StringArray::from(rows.iter().map(|r| r.as_deref()).collect::<Vec<_>>());
            let config = CleanCaptionConfig { on_missing: OnMissing::Quarantine, ..CleanCaptionConfig::default() };
            let (clean, missing, rejected) = run(config, Arc::new(array));
            prop_assert!(rejected.windows(2).all(|w| w[0].0 < w[1].0));
            for (row, value) in clean.iter().enumerate() {
                prop_assert_eq!(value.is_none(), missing[row]);
                prop_assert_eq!(missing[row], rejected.iter().any(|(i, _)| *i == row));
            }
        }
    }
}
