//! A real S3 server for tests: `moto_server` (PyPI `moto[server]`, installed by
//! scripts/setup.sh into `$TRUSTFLOW_MOTO_DIR`) on a free port of 127.0.0.1, started by
//! the test and killed when the handle drops (and, through the parent-death signal, if
//! the test process itself dies). A tiny HTTP client puts, gets and lists objects
//! behind the engine's back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The access key tests use; the secret is [`S3Server::SECRET`].
pub const ACCESS_KEY: &str = "AKIATRUSTFLOWTEST";

pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    /// A secret distinctive enough to search for in every output.
    pub const SECRET: &'static str = "tfSecret/9f8e7d6c5b4a-never-print-me";

    /// Start moto_server and wait until it answers. Panics with what to do when it is
    /// not installed: the tests that need it are part of the suite, not optional.
    pub fn start() -> S3Server {
        let dir = std::env::var_os("TRUSTFLOW_MOTO_DIR")
            .map(PathBuf::from)
            .expect(
                "TRUSTFLOW_MOTO_DIR is not set: `source scripts/setup.sh` installs moto_server \
             (the S3 test server) and sets it",
            );
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut command = Command::new("python3");
        command
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .env("PYTHONPATH", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().expect("start moto_server");
        let server = S3Server { child, port };
        let started = Instant::now();
        while server.request("GET", "/", &[]).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto_server did not answer on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a trustflow process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", Self::SECRET.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
    }

    /// Apply [`Self::env`] to a command, clearing any AWS setting of the caller's.
    pub fn configure<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env())
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = self
            .request("PUT", &format!("/{bucket}"), &[])
            .expect("create bucket");
        assert_eq!(status, 200, "create bucket {bucket}: {body:?}");
    }

    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        let (status, body) = self
            .request("PUT", &format!("/{bucket}/{key}"), bytes)
            .expect("put object");
        assert_eq!(status, 200, "put {bucket}/{key}: {body:?}");
    }

    /// Upload every file of `dir` (one level) under `prefix/`.
    pub fn put_dir(&self, bucket: &str, prefix: &str, dir: &Path) {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            let name = file
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            self.put(
                bucket,
                &format!("{prefix}/{name}"),
                &std::fs::read(&file).expect("read"),
            );
        }
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        match self.request("GET", &format!("/{bucket}/{key}"), &[]) {
            Ok((200, body)) => Some(body),
            Ok((404, _)) => None,
            Ok((status, body)) => panic!(
                "GET {bucket}/{key}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ),
            Err(e) => panic!("GET {bucket}/{key}: {e}"),
        }
    }

    /// Keys under `prefix` (all depths), sorted.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = self
            .request("GET", &format!("/{bucket}?prefix={prefix}"), &[])
            .expect("list");
        assert_eq!(status, 200, "list {bucket}/{prefix}");
        let mut keys = xml_values(&String::from_utf8_lossy(&body), "Key");
        keys.sort();
        keys
    }

    /// Download every object under `prefix/` into `dir` (flat, by last component).
    pub fn get_dir(&self, bucket: &str, prefix: &str, dir: &Path) {
        std::fs::create_dir_all(dir).expect("mkdir");
        for key in self.keys(bucket, &format!("{prefix}/")) {
            let name = key.rsplit('/').next().unwrap_or(&key).to_string();
            let bytes = self.get(bucket, &key).expect("get");
            std::fs::write(dir.join(name), bytes).expect("write");
        }
    }

    /// Multipart uploads started and neither completed nor aborted.
    pub fn pending_uploads(&self, bucket: &str) -> Vec<String> {
        let (status, body) = self
            .request("GET", &format!("/{bucket}?uploads"), &[])
            .expect("list uploads");
        assert_eq!(status, 200, "list uploads of {bucket}");
        xml_values(&String::from_utf8_lossy(&body), "UploadId")
    }

    /// One HTTP/1.1 request; (status, body). moto does not check signatures, but it
    /// reads the access key from the Authorization header to find the account and
    /// owner (anonymous requests may not read the engine's private objects).
    pub fn request(
        &self,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            stream,
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nAuthorization: AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )?;
        stream.write_all(body)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no HTTP header"))?;
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
        let mut payload = raw[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            payload = dechunk(&payload);
        }
        Ok((status, payload))
    }
}

/// `key` as a URL path: each `/`-separated segment percent-encoded (every byte but
/// the unreserved ones), so that any key can be put and fetched behind the engine's
/// back.
pub fn url_key(key: &str) -> String {
    key.split('/')
        .map(|segment| {
            segment
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// How the latency stand-in in front of a server behaves (scripts/s3_proxy.py).
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Added to every request, paid concurrently by concurrent requests.
    pub delay_ms: u64,
    /// Share of requests (0..1) failed before they reach the server.
    pub fail_share: f64,
    /// `slowdown` (503 SlowDown), `reset` (connection reset), or both, comma-separated.
    pub fail_kinds: String,
    pub seed: u64,
}

/// scripts/s3_proxy.py in front of an [`S3Server`]: every request pays a latency, and
/// a share of them can fail the way S3 fails. Stopped when dropped.
pub struct S3Proxy {
    child: Child,
    pub endpoint: String,
    stats_file: PathBuf,
    _dir: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A folder removed on drop (the proxy's stats file lives in it).
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl S3Server {
    /// Start the latency and fault stand-in in front of this server.
    pub fn behind_proxy(&self, options: &ProxyOptions) -> S3Proxy {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!(
            "trustflow-s3proxy-{}-{}",
            std::process::id(),
            self.port
        ));
        std::fs::create_dir_all(&dir).expect("proxy folder");
        let stats_file = dir.join(format!("stats-{}.json", options.seed));
        let script = crate::repo_root().join("scripts/s3_proxy.py");
        let mut command = Command::new("python3");
        command
            .arg(&script)
            .args(["--upstream", &self.endpoint()])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--delay-ms", &options.delay_ms.to_string()])
            .args(["--fail-share", &options.fail_share.to_string()])
            .args(["--seed", &options.seed.to_string()])
            .arg("--stats-file")
            .arg(&stats_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if !options.fail_kinds.is_empty() {
            command.args(["--fail-kinds", &options.fail_kinds]);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start scripts/s3_proxy.py");
        let stdout = child.stdout.take().expect("proxy stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the proxy's first line");
        let endpoint = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("the proxy said {line:?}, expected `listening URL`"))
            .to_string();
        S3Proxy {
            child,
            endpoint,
            stats_file,
            _dir: tempfile_dir::Dir(dir),
        }
    }
}

impl S3Proxy {
    /// The environment a trustflow process needs to reach the server through the proxy.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3Server::SECRET.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }

    /// Apply [`Self::env`] to a command, clearing any AWS setting of the caller's.
    pub fn configure<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env())
    }

    /// Stop the proxy (SIGTERM: it writes its final counts) and return its counts
    /// (`requests`, `forwarded`, `failed_slowdown`, `failed_reset`, ...).
    pub fn stop(&mut self) -> serde_json::Value {
        // SAFETY: a plain signal to our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.stats_file).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&data[..end]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}

/// The texts of every `<tag>...</tag>` in `xml`.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(after[..end].to_string());
        rest = &after[end + close.len()..];
    }
    out
}
