//! A `chitu serve` process on loopback for the tests, and a small HTTP/1.1 client over
//! `TcpStream` (bounded by timeouts: a hung server fails the test instead of stalling it).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A long job on the embedded model: hundreds of steps at 128x128 take seconds, long enough to
/// be cancelled, killed or stopped while it runs.
pub const LONG: &str = r#"{"prompt": "a long one", "steps": 1000, "height": 128, "width": 128, "frames": 17}"#;

/// A short job: a few tenths of a second.
pub const SHORT: &str = r#"{"prompt": "a short one", "steps": 2}"#;

/// A running `chitu serve`, killed when dropped.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its `--data` folder.
    pub data: PathBuf,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `chitu serve --port 0 --data DATA ARGS...` (on the embedded tiny model unless
    /// `args` choose one) and waits for its address.
    pub fn start(data: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chitu"))
            .args(["serve", "--port", "0", "--data"])
            .arg(data)
            .args(super::tiny_unless_chosen(args))
            .args(args)
            .env_remove("CHITU_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chitu serve starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_default();
        let addr = line.trim().strip_prefix("listening on http://").map(str::to_string);
        let Some(addr) = addr else {
            let _ = child.kill();
            panic!(
                "no address from chitu serve: {line:?}; stderr: {}",
                stderr.lock().unwrap()
            );
        };
        Server {
            child,
            addr,
            data: data.to_path_buf(),
            stderr,
        }
    }

    /// What it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits (at most `within`) for the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        // The shell's own `kill`: no procps needed.
        Command::new("sh")
            .args(["-c", &format!("kill -TERM {}", self.child.id())])
            .status()
            .unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// One request, answered whole.
    pub fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
        http(&self.addr, method, path, headers, body)
    }

    /// GET `path`.
    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], None)
    }

    /// POST `body` to `/v1/videos`.
    pub fn post(&self, body: &str) -> Reply {
        self.call(
            "POST",
            "/v1/videos",
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
    }

    /// Submits `body`, which must be accepted; returns the id.
    pub fn submit(&self, body: &str) -> String {
        let r = self.post(body);
        assert_eq!(r.status, 202, "{body}: {}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// The job's status.
    pub fn job(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/videos/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    /// Polls until the job's state is one of `states` (at most `within`); returns its status.
    pub fn wait_for(&self, id: &str, states: &[&str], within: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let job = self.job(id);
            if states.contains(&job["state"].as_str().unwrap_or("")) {
                return job;
            }
            assert!(
                t0.elapsed() < within,
                "{id} still {} after {within:?}, not {states:?}; stderr: {}",
                job["state"],
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until a job runs a denoise step.
    pub fn wait_denoising(&self, id: &str, within: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let job = self.wait_for(id, &["running"], within);
            if job["stage"] == "denoise" && job["step"].as_u64() > Some(0) {
                return job;
            }
            assert!(t0.elapsed() < within, "{id} did not start denoising: {job}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The SSE stream of a job, read until it ends (at most `within`): (event, data) pairs.
    pub fn events(&self, id: &str, within: Duration) -> Vec<(String, Value)> {
        let mut stream = connect(&self.addr, within);
        let req = format!(
            "GET /v1/videos/{id}/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n",
            self.addr
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader);
        assert_eq!(status, 200);
        assert!(header(&headers, "content-type").is_some_and(|v| v.starts_with("text/event-stream")));
        let mut text = String::new();
        let mut events = Vec::new();
        let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let piece = match chunked {
                true => match read_chunk(&mut reader) {
                    Some(p) => p,
                    None => break,
                },
                false => {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    line.into_bytes()
                }
            };
            text.push_str(&String::from_utf8_lossy(&piece));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let mut kind = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(k) = line.strip_prefix("event:") {
                        kind = k.trim().to_string();
                    } else if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                }
                if !data.is_empty() {
                    events.push((kind, serde_json::from_str(&data).unwrap()));
                }
            }
        }
        events
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer.
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn connect(addr: &str, timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    stream
}

fn read_head(reader: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let status = status.unwrap_or_else(|| panic!("no status line: {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    reader.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut buf = vec![0; n + 2];
    reader.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
    let mut stream = connect(addr, Duration::from_secs(60));
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    // A server may answer (413) and close before the whole body is sent.
    let _ = stream.write_all(&bytes);
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader);
    let mut body = Vec::new();
    if header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else {
        let _ = reader.read_to_end(&mut body);
    }
    Reply { status, headers, body }
}
