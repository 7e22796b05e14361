//! Two writers on one output must never lose a shard: jobs of other widths on one
//! folder (`--part 0/2` while `--part 0/3` starts), two runs on one S3 prefix without
//! conditional writes, and a dead writer's lease taken over after its expiry.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use trustflow_testutil::s3::{ProxyOptions, S3Server};

const BUCKET: &str = "corpora";

fn spawn(mut command: Command, args: &[&str]) -> Child {
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait until `ready` holds, failing the test if `child` ends first.
fn wait_until(child: &mut Child, what: &str, ready: impl Fn() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{what}: timed out"
        );
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what}: the first writer ended ({status}) too early; make its corpus bigger");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "first writer failed: {}", text(&out));
    out
}

/// Every manifest under `dir` names data files that are there with its sizes.
fn assert_manifests_whole(dir: &Path) {
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".manifest.json") {
            continue;
        }
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        for key in ["output", "quarantine"] {
            let file = dir.join(m[key]["file"].as_str().unwrap());
            let size = std::fs::metadata(&file).map(|m| m.len()).ok();
            assert_eq!(
                size,
                m[key]["bytes"].as_u64(),
                "{} in {name}",
                file.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 0, "no manifest in {}", dir.display());
}

/// The output lock, taken by this test process as the first writer (as
/// `faults::a_second_writer_is_refused_while_the_folder_is_held` does): other tests'
/// children may hold a copy of a lock file's descriptor for an instant, so retry.
fn hold(out: &Path, part: (usize, usize)) -> trustflow_engine::sink::lock::OutputLock {
    let started = Instant::now();
    loop {
        match trustflow_engine::sink::lock::lock_output(out, Some(part)) {
            Ok(lock) => return lock,
            Err(e) if started.elapsed() > Duration::from_secs(10) => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_job_of_another_width_is_refused_on_disk_and_live_temporary_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let corpus_dir = dir.path().join("corpus");
    corpus(&corpus_dir, 60, 3, 8, 64);
    let (out, reference) = (dir.path().join("out"), dir.path().join("reference"));
    let p = pipeline(
        dir.path(),
        "p.yaml",
        &standard_pipeline(&corpus_dir, &out, ""),
    );
    let p = p.to_str().unwrap();
    run_ok(&["run", "--quiet", "--out", reference.to_str().unwrap(), p]);
    std::fs::create_dir_all(&out).unwrap();

    // This process plays part 1/2 of a running job: parts of another width are refused.
    let held = hold(&out, (1, 2));
    for other in ["0/3", "2/3"] {
        let second = bin()
            .args(["run", "--quiet", p, "--part", other])
            .output()
            .unwrap();
        assert_eq!(
            second.status.code(),
            Some(2),
            "part {other}: {}",
            text(&second)
        );
        assert_contains(&text(&second), &["a job of 2 part(s)", "job of 3"]);
    }
    // A live writer's temporary file (ours) is kept; a dead one's is removed.
    let dead = {
        let mut child = Command::new("true").spawn().unwrap();
        child.wait().unwrap();
        child.id()
    };
    let live_tmp = out.join(format!(".part-00000.parquet.{}.tmp", std::process::id()));
    let dead_tmp = out.join(format!(".part-00000.parquet.{dead}.tmp"));
    std::fs::write(&live_tmp, b"a live writer's").unwrap();
    std::fs::write(&dead_tmp, b"a dead writer's").unwrap();
    run_ok(&["run", "--quiet", p, "--part", "0/2"]);
    assert!(
        live_tmp.is_file(),
        "a live writer's temporary file was removed"
    );
    assert!(
        !dead_tmp.exists(),
        "a dead writer's temporary file was left"
    );
    drop(held);
    std::fs::remove_file(&live_tmp).unwrap();
    run_ok(&["run", "--quiet", p, "--part", "1/2"]);
    assert_eq!(all_outputs(&out), all_outputs(&reference));
    assert_manifests_whole(&out);
}

fn caption_pipeline(dir: &Path, name: &str, out: &str, storage: &str) -> std::path::PathBuf {
    pipeline(
        dir,
        name,
        &format!(
            "source:\n  paths: [\"s3://corpora/raw\"]\nstages:\n  - type: clean_caption\nsink:\n  path: \"{out}\"\nruntime:\n  batch_size: 8\n{storage}"
        ),
    )
}

#[test]
fn a_second_writer_on_an_s3_prefix_is_refused_without_conditional_writes() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("corpus");
    corpus(&local, 8 * 12, 12, 23, 56);
    server.put_dir(BUCKET, "raw", &local);
    let reference = caption_pipeline(dir.path(), "ref.yaml", "s3://corpora/ref", "");
    run_ok_with(
        trustflow(&server),
        &["run", "--quiet", reference.to_str().unwrap()],
    );

    // The first writer pays 40 ms a request and takes one shard at a time, so it is
    // still writing when the others start.
    let proxy = server.behind_proxy(&ProxyOptions {
        delay_ms: 40,
        ..ProxyOptions::default()
    });
    let slow_p = caption_pipeline(
        dir.path(),
        "slow.yaml",
        "s3://corpora/out",
        "storage:\n  read_ahead_shards: 1\n  uploads_in_flight: 1\n",
    );
    let p = caption_pipeline(dir.path(), "p.yaml", "s3://corpora/out", "");
    let p = p.to_str().unwrap();
    let mut slow = bin();
    proxy.configure(&mut slow);
    let mut first = spawn(slow, &["run", "--quiet", slow_p.to_str().unwrap()]);
    wait_until(&mut first, "the first writer taking its lease", || {
        server
            .keys(BUCKET, "out/.trustflow/writers/")
            .iter()
            .any(|k| k.ends_with(".beat"))
    });
    for args in [
        vec!["run", "--quiet", p],
        vec!["run", "--quiet", p, "--part", "0/3"],
    ] {
        let second = trustflow(&server).args(&args).output().unwrap();
        assert_eq!(second.status.code(), Some(2), "{args:?} beside a whole run");
        assert_contains(
            &text(&second),
            &["being written by another trustflow run", "a whole run"],
        );
    }
    finish(first);
    let (want, got) = (dir.path().join("want"), dir.path().join("got"));
    server.get_dir(BUCKET, "ref", &want);
    server.get_dir(BUCKET, "out", &got);
    assert_eq!(all_outputs(&got), all_outputs(&want));
    assert_manifests_whole(&got);
    assert!(server.pending_uploads(BUCKET).is_empty());
    assert!(
        !server
            .keys(BUCKET, "out/.trustflow/")
            .iter()
            .any(|k| k.contains("writers")),
        "leases left behind"
    );
}

#[test]
fn a_dead_writers_lease_refuses_until_it_expires_then_is_taken_over() {
    let server = S3Server::start();
    server.create_bucket(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("corpus");
    corpus(&local, 8 * 2, 2, 29, 56);
    server.put_dir(BUCKET, "raw", &local);
    // A writer of another machine that died without ending its lease.
    let lease = "out/.trustflow/writers/part-0-of-2--node-b--4242--001765000000000";
    server.put(BUCKET, &format!("{lease}.start"), b"");
    server.put(BUCKET, &format!("{lease}.beat"), b"");
    let p = caption_pipeline(
        dir.path(),
        "p.yaml",
        "s3://corpora/out",
        "storage:\n  lease_expiry_s: 4\n",
    );
    let refused = trustflow(&server)
        .args(["run", "--quiet", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    assert_contains(&text(&refused), &["part 0/2, pid 4242 on node-b", "4 s"]);
    std::thread::sleep(Duration::from_secs(5));
    run_ok_with(trustflow(&server), &["run", "--quiet", p.to_str().unwrap()]);
    assert!(
        !server
            .keys(BUCKET, "out/.trustflow/")
            .iter()
            .any(|k| k.contains("writers")),
        "the dead lease was not removed"
    );
}
