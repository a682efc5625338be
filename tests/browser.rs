//! The page at `/` in a real browser: Debian's headless Chromium, driven over the DevTools
//! protocol by `tests/browser/page_check.mjs` (Node), submits through the form, waits until the
//! finished video plays in its `<video>` element, and saves a screenshot to
//! `target/tmp/serve_page.png`.
//!
//! Needs `chromium` and `node`; `.ci/run` installs Chromium and sets `CHITU_BROWSER_TEST=1`,
//! which turns a missing browser into a failure instead of a skip.

use crate::common;
use common::serve::Server;
use std::path::PathBuf;
use std::process::Command;

fn found(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_page_submits_a_job_and_plays_the_video() {
    let required = std::env::var("CHITU_BROWSER_TEST").is_ok_and(|v| v == "1");
    let browser = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    if !(found(&browser) && found("node")) {
        assert!(!required, "CHITU_BROWSER_TEST=1 but {browser} or node is missing");
        eprintln!("skipped: no {browser} or node (apt-get install chromium nodejs)");
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve_page.png");
    let _ = std::fs::remove_file(&shot);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/page_check.mjs");
    let out = Command::new("node")
        .arg(script)
        .arg(format!("http://{}/", server.addr))
        .arg(&shot)
        .arg(&browser)
        .output()
        .unwrap();
    let said = format!(
        "{}{}\nserver: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
    assert!(out.status.success(), "{said}");
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(png.len() > 10_000, "a near-empty screenshot: {} bytes", png.len());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["video"]["w"], 64, "{said}");
    eprintln!("screenshot: {}", shot.display());
    // The job the form sent is in the store as submitted.
    let list = server.get("/v1/videos?state=succeeded").json();
    assert_eq!(list["videos"][0]["request"]["prompt"], "A red fox in the snow");
    assert_eq!(list["videos"][0]["request"]["steps"], 6);
}
