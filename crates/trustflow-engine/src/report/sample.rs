//! What the report reads from the shards, within a fixed budget so that a folder of a
//! million rows costs what a folder of a hundred thousand does.
//!
//! - Counts (rows in, out, quarantined, reasons) come from the manifests: exact, no
//!   data read.
//! - Trust figures and galleries come from at most `max_rows` output rows, read as
//!   whole row groups spread evenly over the folder's shards (all of them when the
//!   folder is smaller), and only the narrow columns: id, caption, pseudo-label,
//!   weight, similarity, label. The galleries keep the `n` lowest and highest weights
//!   seen, so they are exact when every row was read.
//! - Quarantine samples: quarantine shards are read in order, narrow columns again,
//!   until every reason has its samples or `max_rows` rows were read.
//! - Images are read last and only for the rows shown: one selective read per row
//!   group, a few rows at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float32Type, Int64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
    RowSelector,
};
use serde::Serialize;

use super::thumb::{Thumbnail, thumbnail};
use crate::columns::{CAPTION, ERROR, ERROR_STAGE, ID, IMAGE, LABEL};
use crate::error::{Error, Result};
use crate::models::image::ImageSettings;
use crate::sink::reason_key;
use crate::stages::caption::{CAPTION_FINAL, CAPTION_SOURCE, SOURCE_GENERATED};
use crate::stages::clean_caption::CAPTION_CLEAN;
use crate::stages::clip_score::CLIP_SIMILARITY;
use crate::stages::pseudo_label::{PSEUDO_LABEL, PSEUDO_LABEL_NAME, PSEUDO_PROB};
use crate::stages::uncertainty::PSEUDO_WEIGHT;

/// Where a row lives, so its image can be fetched in a second, narrow read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RowAt {
    pub file: usize,
    pub row_group: usize,
    pub row: usize,
}

/// One row as the page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Card {
    pub id: Option<String>,
    pub caption: Option<String>,
    /// The source's caption as it came, when the shown one (cleaned or generated)
    /// differs from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_raw: Option<String>,
    /// The caption was written by the captioner (`caption_source: generated`).
    pub caption_generated: bool,
    /// The caption's bytes were not UTF-8; `caption` shows them lossily.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub caption_not_utf8: bool,
    pub pseudo_label: Option<i64>,
    pub pseudo_label_name: Option<String>,
    pub pseudo_prob: Option<f32>,
    pub weight: Option<f32>,
    pub similarity: Option<f32>,
    pub label: Option<i64>,
    /// Quarantine cards: `stage: reason` as the row's error says it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub thumbnail: Option<Thumbnail>,
    /// Why there is no thumbnail (the decoder's message, or no image column).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_thumbnail: Option<String>,
    #[serde(skip)]
    pub(crate) at: Option<RowAt>,
}

impl Card {
    /// An empty card for row `row` of row group `row_group` of file `file`.
    fn located(file: usize, row_group: usize, row: usize) -> Card {
        Card {
            at: Some(RowAt {
                file,
                row_group,
                row,
            }),
            ..Card::default()
        }
    }
}

/// The narrow columns of one trusted row, kept for every row read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrustRow {
    pub weight: Option<f32>,
    pub similarity: Option<f32>,
    pub pseudo_label: Option<i64>,
    pub label: Option<i64>,
}

/// A Parquet file opened once, its footer kept for the reads that follow.
pub(crate) struct ShardFile {
    pub path: PathBuf,
    meta: ArrowReaderMetadata,
    /// The file's name for a canonical column, where it differs (a quarantine shard
    /// keeps its input's names: the manifest's `source_columns`).
    names: BTreeMap<String, String>,
}

impl ShardFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::default())
            .map_err(|e| Error::parquet(path, e))?;
        Ok(ShardFile {
            path: path.to_path_buf(),
            meta,
            names: BTreeMap::new(),
        })
    }

    /// This file, whose canonical columns are stored under `names`.
    pub fn with_names(mut self, names: BTreeMap<String, String>) -> Self {
        self.names = names;
        self
    }

    /// The file's name for canonical column `logical`.
    fn name<'a>(&'a self, logical: &'a str) -> &'a str {
        self.names.get(logical).map_or(logical, String::as_str)
    }

    pub fn row_group_rows(&self) -> Vec<u64> {
        self.meta
            .metadata()
            .row_groups()
            .iter()
            .map(|rg| rg.num_rows().max(0) as u64)
            .collect()
    }

    fn has(&self, column: &str) -> bool {
        self.meta.schema().index_of(column).is_ok()
    }

    /// Read `columns` (those present) of one row group, `selection` rows of it (all
    /// when `None`), `batch_rows` at a time.
    fn read(
        &self,
        row_group: usize,
        columns: &[&str],
        selection: Option<RowSelection>,
        batch_rows: usize,
        mut each: impl FnMut(&RecordBatch) -> Result<bool>,
    ) -> Result<()> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone());
        let schema = builder.schema().clone();
        let roots: Vec<usize> = columns
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let mut builder = builder
            .with_projection(mask)
            .with_row_groups(vec![row_group])
            .with_batch_size(batch_rows.max(1));
        if let Some(selection) = selection {
            builder = builder.with_row_selection(selection);
        }
        let reader = builder.build().map_err(|e| Error::parquet(&self.path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| Error::Arrow {
                context: format!("{} (row group {row_group})", self.path.display()),
                source: e,
            })?;
            if !each(&batch)? {
                break;
            }
        }
        Ok(())
    }
}

/// Row groups to read: `(file, row_group, rows)`, spread evenly over `sizes` (in folder
/// order) so that at most `budget` rows are read. A row group is taken whenever the
/// rows taken so far fall behind the budget's share of the rows passed, so a folder
/// of many shards is sampled from start to end, not from its first shards.
pub(crate) fn spread(sizes: &[(usize, usize, u64)], budget: u64) -> Vec<(usize, usize, u64)> {
    let total: u64 = sizes.iter().map(|s| s.2).sum();
    if total <= budget {
        return sizes.iter().filter(|s| s.2 > 0).copied().collect();
    }
    let mut chosen = Vec::new();
    let (mut passed, mut taken) = (0u128, 0u64);
    for &(file, rg, rows) in sizes {
        passed += u128::from(rows);
        let due = passed * u128::from(budget) / u128::from(total);
        // A row group larger than what is left of the budget is read in part.
        let take = rows.min(budget - taken);
        if take > 0 && u128::from(taken) + u128::from(take) / 2 <= due {
            chosen.push((file, rg, take));
            taken += take;
        }
    }
    chosen
}

/// The `n` rows with the smallest (or largest) key seen so far.
pub(crate) struct Extremes {
    n: usize,
    largest: bool,
    cards: Vec<(f32, Card)>,
}

impl Extremes {
    pub fn new(n: usize, largest: bool) -> Self {
        Extremes {
            n,
            largest,
            cards: Vec::with_capacity(n + 1),
        }
    }

    /// Whether a row with key `key` would enter (checked before the card is built).
    pub fn wants(&self, key: f32) -> bool {
        if self.n == 0 || key.is_nan() {
            return false;
        }
        match self.cards.last() {
            Some((worst, _)) if self.cards.len() >= self.n => {
                if self.largest {
                    key > *worst
                } else {
                    key < *worst
                }
            }
            _ => true,
        }
    }

    pub fn offer(&mut self, key: f32, card: Card) {
        if !self.wants(key) {
            return;
        }
        // Best first; ties keep the earlier row first.
        let at = self.cards.partition_point(|(k, _)| match self.largest {
            true => *k >= key,
            false => *k <= key,
        });
        self.cards.insert(at, (key, card));
        self.cards.truncate(self.n);
    }

    pub fn into_cards(self) -> Vec<Card> {
        self.cards.into_iter().map(|(_, c)| c).collect()
    }
}

/// Up to `n` cards, the first met in reading order (reading order is already spread
/// over the folder).
pub(crate) fn push_capped(cards: &mut Vec<Card>, n: usize, card: impl FnOnce() -> Card) {
    if cards.len() < n {
        cards.push(card());
    }
}

/// Column readers that accept the types a shard may hold for a logical column.
pub(crate) struct Columns<'a> {
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    pub fn new(batch: &'a RecordBatch) -> Self {
        Columns { batch }
    }

    fn column(&self, name: &str) -> Option<&'a ArrayRef> {
        self.batch.column_by_name(name)
    }

    pub fn f32(&self, name: &str) -> Option<Vec<Option<f32>>> {
        let col = self.column(name)?;
        let cast = arrow::compute::cast(col, &DataType::Float32).ok()?;
        Some(cast.as_primitive::<Float32Type>().iter().collect())
    }

    pub fn i64(&self, name: &str) -> Option<Vec<Option<i64>>> {
        let col = self.column(name)?;
        let cast = arrow::compute::cast(col, &DataType::Int64).ok()?;
        Some(cast.as_primitive::<Int64Type>().iter().collect())
    }

    /// A text column (a binary one holds text that may not be UTF-8), read lazily.
    pub fn text(&self, name: &str) -> Option<Text> {
        let col = self.column(name)?;
        Some(match col.data_type() {
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
                let bytes = arrow::compute::cast(col, &DataType::LargeBinary).ok()?;
                Text::Bytes(bytes.as_binary::<i64>().clone())
            }
            _ => {
                let text = arrow::compute::cast(col, &DataType::Utf8).ok()?;
                Text::Utf8(text.as_string::<i32>().clone())
            }
        })
    }

    pub fn bytes(&self, name: &str) -> Option<Vec<Option<Vec<u8>>>> {
        let col = self.column(name)?;
        let own = |v: Option<&[u8]>| v.map(<[u8]>::to_vec);
        Some(match col.data_type() {
            DataType::Binary => col.as_binary::<i32>().iter().map(own).collect(),
            DataType::LargeBinary => col.as_binary::<i64>().iter().map(own).collect(),
            DataType::BinaryView => col.as_binary_view().iter().map(own).collect(),
            _ => return None,
        })
    }
}

/// A text column of a batch; a value becomes a `String` only when a card needs it.
pub(crate) enum Text {
    Utf8(arrow::array::StringArray),
    Bytes(arrow::array::LargeBinaryArray),
}

impl Text {
    /// Row `i`, with bytes that are not UTF-8 decoded lossily and flagged (`true`).
    fn get(&self, i: usize) -> Option<(String, bool)> {
        match self {
            Text::Utf8(a) => a.is_valid(i).then(|| (a.value(i).to_string(), false)),
            Text::Bytes(a) => a.is_valid(i).then(|| {
                let b = a.value(i);
                match std::str::from_utf8(b) {
                    Ok(s) => (s.to_string(), false),
                    Err(_) => (String::from_utf8_lossy(b).into_owned(), true),
                }
            }),
        }
    }

    /// Whether row `i` holds `value`.
    fn is(&self, i: usize, value: &str) -> bool {
        match self {
            Text::Utf8(a) => a.is_valid(i) && a.value(i) == value,
            Text::Bytes(a) => a.is_valid(i) && a.value(i) == value.as_bytes(),
        }
    }
}

/// The caption column a page should show: the final caption when the captioner ran,
/// else the cleaned one, else the raw one.
fn caption_column(file: &ShardFile) -> &'static str {
    [CAPTION_FINAL, CAPTION_CLEAN, CAPTION]
        .into_iter()
        .find(|c| file.has(c))
        .unwrap_or(CAPTION)
}

/// What the output shards gave within the budget.
pub(crate) struct OutputSample {
    pub rows_total: u64,
    pub rows_read: u64,
    pub row_groups_total: usize,
    pub row_groups_read: usize,
    pub rows: Vec<TrustRow>,
    pub class_names: BTreeMap<i64, String>,
    pub has_weight: bool,
    pub has_similarity: bool,
    pub has_label: bool,
    pub lowest: Vec<Card>,
    pub highest: Vec<Card>,
    pub generated: Vec<Card>,
    /// Rows as read, for folders without weights.
    pub sample: Vec<Card>,
}

/// Read the output shards `files` (folder order) within `budget` rows, keeping `n`
/// cards per gallery.
pub(crate) fn sample_outputs(files: &[ShardFile], budget: u64, n: usize) -> Result<OutputSample> {
    let mut sizes = Vec::new();
    for (f, file) in files.iter().enumerate() {
        for (rg, rows) in file.row_group_rows().into_iter().enumerate() {
            sizes.push((f, rg, rows));
        }
    }
    let chosen = spread(&sizes, budget);
    let has = |c: &str| files.iter().any(|f| f.has(c));
    let mut out = OutputSample {
        rows_total: sizes.iter().map(|s| s.2).sum(),
        rows_read: 0,
        row_groups_total: sizes.len(),
        row_groups_read: chosen.len(),
        rows: Vec::new(),
        class_names: BTreeMap::new(),
        has_weight: has(PSEUDO_WEIGHT),
        has_similarity: has(CLIP_SIMILARITY),
        has_label: has(LABEL),
        lowest: Vec::new(),
        highest: Vec::new(),
        generated: Vec::new(),
        sample: Vec::new(),
    };
    let mut lowest = Extremes::new(n, false);
    let mut highest = Extremes::new(n, true);
    for (f, rg, limit) in chosen {
        let file = &files[f];
        let caption = caption_column(file);
        let columns = [
            ID,
            caption,
            CAPTION,
            CAPTION_SOURCE,
            PSEUDO_LABEL,
            PSEUDO_LABEL_NAME,
            PSEUDO_PROB,
            PSEUDO_WEIGHT,
            CLIP_SIMILARITY,
            LABEL,
        ];
        let mut row = 0usize;
        file.read(rg, &columns, None, 8192, |batch| {
            let c = Columns::new(batch);
            let len = batch.num_rows().min((limit as usize).saturating_sub(row));
            let ids = c.text(ID);
            let captions = c.text(caption);
            let raw = if caption == CAPTION {
                None
            } else {
                c.text(CAPTION)
            };
            let sources = c.text(CAPTION_SOURCE);
            let labels = c.i64(LABEL);
            let pseudo = c.i64(PSEUDO_LABEL);
            let names = c.text(PSEUDO_LABEL_NAME);
            let probs = c.f32(PSEUDO_PROB);
            let weights = c.f32(PSEUDO_WEIGHT);
            let sims = c.f32(CLIP_SIMILARITY);
            let at = |v: &Option<Vec<Option<f32>>>, i: usize| v.as_ref().and_then(|v| v[i]);
            let at_i = |v: &Option<Vec<Option<i64>>>, i: usize| v.as_ref().and_then(|v| v[i]);
            let at_s = |v: &Option<Text>, i: usize| v.as_ref().and_then(|t| t.get(i));
            for i in 0..len {
                let trust = TrustRow {
                    weight: at(&weights, i),
                    similarity: at(&sims, i),
                    pseudo_label: at_i(&pseudo, i),
                    label: at_i(&labels, i),
                };
                out.rows.push(trust);
                if let Some(k) = trust.pseudo_label
                    && !out.class_names.contains_key(&k)
                    && let Some((name, _)) = at_s(&names, i)
                {
                    out.class_names.insert(k, name);
                }
                let generated = sources.as_ref().is_some_and(|t| t.is(i, SOURCE_GENERATED));
                let card = || {
                    let caption = at_s(&captions, i);
                    let raw = at_s(&raw, i).map(|r| r.0);
                    Card {
                        id: at_s(&ids, i).map(|(s, _)| s),
                        caption_not_utf8: caption.as_ref().is_some_and(|c| c.1),
                        caption_raw: raw.filter(|r| Some(r) != caption.as_ref().map(|c| &c.0)),
                        caption: caption.map(|c| c.0),
                        caption_generated: generated,
                        pseudo_label: trust.pseudo_label,
                        pseudo_label_name: at_s(&names, i).map(|(s, _)| s),
                        pseudo_prob: at(&probs, i),
                        weight: trust.weight,
                        similarity: trust.similarity,
                        label: trust.label,
                        ..Card::located(f, rg, row + i)
                    }
                };
                if let Some(w) = trust.weight {
                    if lowest.wants(w) {
                        lowest.offer(w, card());
                    }
                    if highest.wants(w) {
                        highest.offer(w, card());
                    }
                }
                if generated {
                    push_capped(&mut out.generated, n, card);
                }
                if weights.is_none() {
                    push_capped(&mut out.sample, n, card);
                }
            }
            row += len;
            out.rows_read += len as u64;
            Ok(row < limit as usize)
        })?;
    }
    out.lowest = lowest.into_cards();
    out.highest = highest.into_cards();
    Ok(out)
}

/// Quarantine samples per reason.
pub(crate) struct QuarantineSample {
    pub rows_read: u64,
    pub samples: BTreeMap<String, Vec<Card>>,
}

/// Read quarantine shards in order until each of `wanted` reasons has `n` samples or
/// `budget` rows were read.
pub(crate) fn sample_quarantine(
    files: &[ShardFile],
    wanted: &BTreeSet<String>,
    budget: u64,
    n: usize,
) -> Result<QuarantineSample> {
    let mut out = QuarantineSample {
        rows_read: 0,
        samples: BTreeMap::new(),
    };
    let full = |s: &BTreeMap<String, Vec<Card>>| {
        wanted
            .iter()
            .all(|r| s.get(r).is_some_and(|v| v.len() >= n))
    };
    'files: for (f, file) in files.iter().enumerate() {
        for rg in 0..file.row_group_rows().len() {
            if out.rows_read >= budget || full(&out.samples) {
                break 'files;
            }
            let mut row = 0usize;
            let (id, caption) = (file.name(ID), file.name(CAPTION));
            file.read(
                rg,
                &[id, caption, ERROR_STAGE, ERROR],
                None,
                8192,
                |batch| {
                    let c = Columns::new(batch);
                    let (Some(stages), Some(errors)) = (c.text(ERROR_STAGE), c.text(ERROR)) else {
                        return Err(Error::input(
                            &file.path,
                            "quarantine shard lacks error_stage/error columns",
                        ));
                    };
                    let ids = c.text(id);
                    let captions = c.text(caption);
                    for i in 0..batch.num_rows() {
                        let stage = stages.get(i).unwrap_or_default().0;
                        let error = errors.get(i).unwrap_or_default().0;
                        let samples = out.samples.entry(reason_key(&stage, &error)).or_default();
                        push_capped(samples, n, || {
                            let caption = captions.as_ref().and_then(|t| t.get(i));
                            Card {
                                id: ids.as_ref().and_then(|t| t.get(i)).map(|s| s.0),
                                caption_not_utf8: caption.as_ref().is_some_and(|c| c.1),
                                caption: caption.map(|c| c.0),
                                reason: Some(format!("{stage}: {error}")),
                                ..Card::located(f, rg, row + i)
                            }
                        });
                    }
                    row += batch.num_rows();
                    out.rows_read += batch.num_rows() as u64;
                    Ok(out.rows_read < budget)
                },
            )?;
        }
    }
    Ok(out)
}

/// Fill in the thumbnails of `cards` from `files`: one selective read of the image
/// column per row group, `IMAGE_BATCH` rows at a time, each image decoded under
/// `settings` and shrunk to `max_side`.
pub(crate) fn attach_thumbnails(
    files: &[ShardFile],
    cards: &mut [&mut Card],
    max_side: u32,
    settings: &ImageSettings,
) -> Result<usize> {
    const IMAGE_BATCH: usize = 8;
    let mut by_group: BTreeMap<(usize, usize), BTreeSet<usize>> = BTreeMap::new();
    for card in cards.iter() {
        if let Some(at) = card.at {
            by_group
                .entry((at.file, at.row_group))
                .or_default()
                .insert(at.row);
        }
    }
    let mut images: BTreeMap<RowAt, std::result::Result<Thumbnail, String>> = BTreeMap::new();
    for ((f, rg), rows) in by_group {
        let file = &files[f];
        let image = file.name(IMAGE);
        if !file.has(image) {
            for row in rows {
                let at = RowAt {
                    file: f,
                    row_group: rg,
                    row,
                };
                images.insert(at, Err("the shard has no image column".into()));
            }
            continue;
        }
        let wanted: Vec<usize> = rows.into_iter().collect();
        let mut next = 0usize;
        file.read(
            rg,
            &[image],
            Some(selection(&wanted)),
            IMAGE_BATCH,
            |batch| {
                // An image stored as a path or a struct has no bytes to show here.
                let bytes = Columns::new(batch)
                    .bytes(image)
                    .unwrap_or_else(|| vec![None; batch.num_rows()]);
                for b in bytes {
                    let Some(&row) = wanted.get(next) else { break };
                    next += 1;
                    let thumb = match b {
                        Some(b) => thumbnail(&b, max_side, settings),
                        None => Err("no image bytes (null, or stored as a path)".into()),
                    };
                    images.insert(
                        RowAt {
                            file: f,
                            row_group: rg,
                            row,
                        },
                        thumb,
                    );
                }
                Ok(true)
            },
        )?;
    }
    let mut decoded = 0;
    for card in cards.iter_mut() {
        let Some(at) = card.at else { continue };
        match images.get(&at) {
            Some(Ok(t)) => {
                card.thumbnail = Some(t.clone());
                decoded += 1;
            }
            Some(Err(why)) => card.no_thumbnail = Some(why.clone()),
            None => card.no_thumbnail = Some("the row was not found again".into()),
        }
    }
    Ok(decoded)
}

/// A selection of the sorted, distinct `rows` of a row group.
fn selection(rows: &[usize]) -> RowSelection {
    let mut selectors = Vec::new();
    let mut at = 0usize;
    for &row in rows {
        if row > at {
            selectors.push(RowSelector::skip(row - at));
        }
        selectors.push(RowSelector::select(1));
        at = row + 1;
    }
    RowSelection::from(selectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_reads_everything_under_the_budget_and_spreads_over_it() {
        let sizes: Vec<(usize, usize, u64)> = (0..10).map(|f| (f, 0, 100)).collect();
        assert_eq!(spread(&sizes, 1_000).len(), 10);
        let chosen = spread(&sizes, 300);
        let taken: u64 = chosen.iter().map(|c| c.2).sum();
        assert_eq!(taken, 300);
        let files: Vec<usize> = chosen.iter().map(|c| c.0).collect();
        // Spread from start to end, not the first three shards.
        assert!(
            files[0] <= 2 && *files.last().expect("some") >= 7,
            "{files:?}"
        );
    }

    #[test]
    fn spread_caps_one_huge_row_group() {
        let chosen = spread(&[(0, 0, 1_000_000)], 1_000);
        assert_eq!(chosen, vec![(0, 0, 1_000)]);
    }

    fn card(id: &str) -> Card {
        Card {
            id: Some(id.into()),
            ..Card::default()
        }
    }

    #[test]
    fn extremes_keep_the_n_smallest_and_largest_in_order() {
        let mut low = Extremes::new(2, false);
        let mut high = Extremes::new(2, true);
        for (k, id) in [
            (0.5, "a"),
            (0.1, "b"),
            (0.9, "c"),
            (0.1, "d"),
            (f32::NAN, "e"),
        ] {
            low.offer(k, card(id));
            high.offer(k, card(id));
        }
        let ids = |e: Extremes| -> Vec<String> {
            e.into_cards().into_iter().filter_map(|c| c.id).collect()
        };
        assert_eq!(ids(low), ["b", "d"]);
        assert_eq!(ids(high), ["c", "a"]);
    }

    #[test]
    fn selection_takes_exactly_the_rows_asked_for() {
        let s = selection(&[2, 3, 7]);
        assert_eq!((s.row_count(), s.skipped_row_count()), (3, 5));
    }
}
