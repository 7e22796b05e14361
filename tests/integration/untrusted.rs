//! Rows are untrusted: paths that escape their root, captions that are not UTF-8, null
//! labels and ids. Each is quarantined with its reason; nothing outside the root is read.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Int64Array, StringArray, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use arrow::record_batch::RecordBatch;
use common::*;

fn png(side: u32, noisy: bool) -> Vec<u8> {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        if noisy {
            let v = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)).wrapping_mul(2_654_435_761);
            image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
        } else {
            image::Rgb([x as u8, y as u8, 128])
        }
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn run_and_collect(
    dir: &Path,
    shard_dir: &Path,
    extra: &str,
) -> (Vec<String>, BTreeMap<String, (String, String)>) {
    let out = dir.join("out");
    let yaml = format!(
        "source:\n  paths: [\"{}\"]\n{extra}stages:\n  - type: decode\nsink:\n  path: \"{}\"\n",
        shard_dir.display(),
        out.display()
    );
    let file = pipeline(dir, "p.yaml", &yaml);
    run_ok(&["run", "--quiet", file.to_str().unwrap()]);
    let r = report(&out);
    assert_eq!(r["invariant_holds"], true, "{r}");
    (
        ids(&read_parquet(&out.join("shard.parquet"))),
        quarantined(&out),
    )
}

#[test]
fn path_images_stay_inside_their_root() {
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = dir.path().join("shards");
    std::fs::create_dir_all(shard_dir.join("imgs")).unwrap();
    std::fs::write(shard_dir.join("imgs/ok.png"), png(16, false)).unwrap();
    std::fs::write(shard_dir.join("imgs/big.png"), png(64, true)).unwrap();
    std::fs::write(dir.path().join("outside.png"), png(16, false)).unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("outside.png"),
        shard_dir.join("imgs/link.png"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        shard_dir.join("imgs/ok.png"),
        shard_dir.join("imgs/inner-link.png"),
    )
    .unwrap();
    assert!(
        std::fs::metadata(shard_dir.join("imgs/big.png"))
            .unwrap()
            .len()
            > 4096
    );

    let rows: Vec<(&str, Option<&str>)> = vec![
        ("ok", Some("imgs/ok.png")),
        ("inner_link", Some("imgs/inner-link.png")),
        ("dotdot", Some("../outside.png")),
        ("sneaky_dotdot", Some("imgs/../../outside.png")),
        ("absolute", Some("/etc/hostname")),
        ("symlink_out", Some("imgs/link.png")),
        ("missing", Some("imgs/missing.png")),
        ("empty_path", Some("")),
        ("too_big", Some("imgs/big.png")),
        ("folder", Some("imgs")),
        ("null_path", None),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    write_parquet(&shard_dir.join("shard.parquet"), &batch);

    let (out_ids, q) = run_and_collect(
        dir.path(),
        &shard_dir.join("shard.parquet"),
        "  image_layout: path\n  max_image_file_bytes: 4096\n",
    );
    assert_eq!(out_ids, vec!["ok", "inner_link"]);
    let expect = [
        ("dotdot", "source", "contains `..`"),
        ("sneaky_dotdot", "source", "contains `..`"),
        ("absolute", "source", "is absolute"),
        ("symlink_out", "source", "leads outside"),
        ("missing", "source", "cannot be opened"),
        ("empty_path", "source", "image path is empty"),
        ("too_big", "source", "over the limit of 4096"),
        ("folder", "source", "is not a file"),
        ("null_path", "decode", "image is null"),
    ];
    for (id, stage, reason) in expect {
        let (s, e) = q
            .get(id)
            .unwrap_or_else(|| panic!("{id} not quarantined: {q:?}"));
        assert_eq!(s, stage, "{id}: {e}");
        assert!(e.contains(reason), "{id}: `{e}` should mention `{reason}`");
    }
    assert_eq!(q.len(), expect.len());
}

#[test]
fn bad_captions_null_labels_and_null_ids_are_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = dir.path().join("shards");
    std::fs::create_dir_all(&shard_dir).unwrap();
    let img = png(16, false);
    let n = 5;
    // Captions stored as binary, the way some crawls store them.
    let captions: Vec<Option<&[u8]>> = vec![
        Some(b"a cat on a mat"),
        Some(&[0xff, 0xfe, 0x41]),
        Some(b"a dog"),
        None,
        Some(b"a bird"),
    ];
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("image", DataType::Binary, true),
        Field::new("caption", DataType::Binary, true),
        Field::new("label", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec![
                Some("good"),
                Some("latin1"),
                Some("nolabel"),
                Some("nocaption"),
                None,
            ])) as ArrayRef,
            Arc::new(BinaryArray::from_iter_values(
                (0..n).map(|_| img.as_slice()),
            )),
            Arc::new(BinaryArray::from(captions)),
            Arc::new(Int64Array::from(vec![
                Some(1),
                Some(2),
                None,
                Some(3),
                Some(4),
            ])),
        ],
    )
    .unwrap();
    write_parquet(&shard_dir.join("shard.parquet"), &batch);
    let (out_ids, q) = run_and_collect(dir.path(), &shard_dir.join("shard.parquet"), "");
    assert_eq!(
        out_ids,
        vec!["good", "nocaption"],
        "a null caption is not an error here"
    );
    assert!(q["latin1"].1.contains("not valid UTF-8"), "{q:?}");
    assert!(q["nolabel"].1.contains("label is null"), "{q:?}");
    // The quarantine holds rows as they came: the null id is still null there.
    let null_id = q
        .iter()
        .find(|(id, _)| id.starts_with("<null id"))
        .unwrap_or_else(|| panic!("the null-id row: {q:?}"));
    assert!(null_id.1.1.contains("id is null"), "{q:?}");
    assert_eq!(q.len(), 3);

    // `null_labels: keep` lets unlabelled rows through.
    let dir2 = tempfile::tempdir().unwrap();
    let (out_ids, _) = run_and_collect(
        dir2.path(),
        &shard_dir.join("shard.parquet"),
        "  null_labels: keep\n",
    );
    assert!(out_ids.contains(&"nolabel".to_string()));
}

#[test]
fn hf_struct_falls_back_to_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let shard_dir = dir.path().join("shards");
    std::fs::create_dir_all(&shard_dir).unwrap();
    std::fs::write(shard_dir.join("f.png"), png(20, false)).unwrap();
    let img = png(12, false);
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let st = StructArray::new(
        fields.clone(),
        vec![
            Arc::new(BinaryArray::from(vec![Some(img.as_slice()), None, None])) as ArrayRef,
            Arc::new(StringArray::from(vec![
                Some("ignored.png"),
                Some("f.png"),
                Some("../x.png"),
            ])),
        ],
        None,
    );
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Struct(fields), true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["inline", "by_path", "escape"])) as ArrayRef,
            Arc::new(st),
        ],
    )
    .unwrap();
    write_parquet(&shard_dir.join("shard.parquet"), &batch);
    let out = dir.path().join("out");
    let (out_ids, q) = run_and_collect(dir.path(), &shard_dir.join("shard.parquet"), "");
    assert_eq!(out_ids, vec!["inline", "by_path"]);
    assert!(q["escape"].1.contains("contains `..`"));
    let b = read_parquet(&out.join("shard.parquet"));
    let widths = b.column_by_name("width").unwrap();
    let widths = widths
        .as_any()
        .downcast_ref::<arrow::array::UInt32Array>()
        .unwrap();
    assert_eq!(
        widths.values(),
        &[12, 20],
        "inline bytes win, else the file is read"
    );
}

/// A quarantined row is kept as it came: every column of its shard (mapped or not),
/// with its stored type and bytes, whichever step rejected it, so it can be repaired
/// and fed again as it is. Before, the quarantine held the canonical columns only,
/// with a null caption where the bytes were not UTF-8.
#[test]
fn the_quarantine_keeps_each_row_as_it_came_and_takes_it_back_repaired() {
    use arrow::array::{Array, AsArray, Float64Array};
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let good = png(16, false);
    let latin1: &[u8] = &[0x63, 0x61, 0x66, 0xe9];
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("image", DataType::Binary, true),
        Field::new("caption", DataType::Binary, true),
        Field::new("url", DataType::Utf8, true),
        Field::new("score", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["ok", "latin1", "broken"])) as ArrayRef,
            Arc::new(BinaryArray::from(vec![
                good.as_slice(),
                good.as_slice(),
                b"not an image".as_slice(),
            ])),
            Arc::new(BinaryArray::from(vec![
                b"a cat".as_slice(),
                latin1,
                b"a dog".as_slice(),
            ])),
            Arc::new(StringArray::from(vec!["u0", "u1", "u2"])),
            Arc::new(Float64Array::from(vec![0.5, 0.25, 0.125])),
        ],
    )
    .unwrap();
    write_parquet(&shards.join("shard.parquet"), &batch);
    let (kept, q) = run_and_collect(dir.path(), &shards, "");
    assert_eq!(kept, ["ok"]);
    assert!(
        q["latin1"].0 == "source" && q["broken"].0 == "decode",
        "{q:?}"
    );

    let quarantine = read_parquet(&dir.path().join("out/shard.quarantine.parquet"));
    let names: Vec<(String, DataType)> = quarantine
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let mut want: Vec<(String, DataType)> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    want.push(("error_stage".into(), DataType::Utf8));
    want.push(("error".into(), DataType::Utf8));
    assert_eq!(names, want, "every source column, with its stored type");
    let row = |id: &str| {
        (0..quarantine.num_rows())
            .find(|&i| quarantine.column(0).as_string::<i32>().value(i) == id)
            .unwrap_or_else(|| panic!("{id} in the quarantine"))
    };
    let captions = quarantine.column(2).as_binary::<i32>();
    assert_eq!(
        captions.value(row("latin1")),
        latin1,
        "the caption's own bytes"
    );
    let images = quarantine.column(1).as_binary::<i32>();
    assert_eq!(images.value(row("broken")), b"not an image");
    assert_eq!(images.value(row("latin1")), good.as_slice());
    let urls = quarantine.column(3).as_string::<i32>();
    assert_eq!(urls.value(row("broken")), "u2", "unmapped columns too");
    let scores = quarantine
        .column(4)
        .as_primitive::<arrow::datatypes::Float64Type>();
    assert_eq!(scores.value(row("latin1")), 0.25);

    // Repaired (a UTF-8 caption, a real image) and fed back as it is, reasons and all:
    // both rows now come out.
    let mut columns = quarantine.columns().to_vec();
    let fixed_images: Vec<&[u8]> = (0..quarantine.num_rows())
        .map(|_| good.as_slice())
        .collect();
    columns[1] = Arc::new(BinaryArray::from(fixed_images));
    let fixed_captions: Vec<&[u8]> = (0..quarantine.num_rows())
        .map(|_| b"fixed".as_slice())
        .collect();
    columns[2] = Arc::new(BinaryArray::from(fixed_captions));
    let repaired = RecordBatch::try_new(quarantine.schema(), columns).unwrap();
    let again = dir.path().join("again");
    let again_shards = again.join("shards");
    std::fs::create_dir_all(&again_shards).unwrap();
    write_parquet(&again_shards.join("shard.parquet"), &repaired);
    let (kept, q) = run_and_collect(&again, &again_shards, "");
    assert_eq!(kept.len(), 2, "{kept:?} {q:?}");
    assert!(q.is_empty(), "{q:?}");
    assert!(quarantine.column(2).null_count() == 0);
}
