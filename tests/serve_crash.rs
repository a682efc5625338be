//! `kill -9` during a job, twice: finished jobs and their files survive, the interrupted job is
//! requeued once and then failed with the reason, and no half-written file is ever left.

use crate::common;
use common::decode_mp4;
use common::serve::{Server, LONG, SHORT};
use std::path::Path;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);

/// Every file under the job folders: complete outputs only, no temporaries.
fn files_under(videos: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for dir in std::fs::read_dir(videos).unwrap() {
        let dir = dir.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            names.push(format!("{}/{name}", dir.file_name().unwrap().to_string_lossy()));
        }
    }
    names.sort();
    names
}

#[test]
fn kill_9_during_a_job_then_restart() {
    let data = tempfile::tempdir().unwrap();
    let videos = data.path().join("videos");
    let mut server = Server::start(data.path(), &[]);
    let done = server.submit(SHORT);
    server.wait_for(&done, &["succeeded"], MINUTE);
    let long = server.submit(LONG);
    let queued = server.submit(SHORT);
    server.wait_denoising(&long, MINUTE);
    server.kill9();
    let expected = vec![
        format!("{done}/contact.png"),
        format!("{done}/meta.json"),
        format!("{done}/video.mp4"),
    ];
    assert_eq!(files_under(&videos), expected);

    let mut server = Server::start(data.path(), &[]);
    assert!(
        server.stderr().contains(&format!("{long} was running")),
        "{}",
        server.stderr()
    );
    // The finished job is listed and served as before.
    let job = server.job(&done);
    assert_eq!(job["state"], "succeeded");
    let mp4 = server.get(&format!("/v1/videos/{done}/video.mp4"));
    assert_eq!(mp4.status, 200);
    let copy = data.path().join("copy.mp4");
    std::fs::write(&copy, &mp4.body).unwrap();
    assert_eq!(decode_mp4(&copy), (9, 64, 64));
    // The interrupted job runs again, first: it was claimed before the one queued behind it.
    let again = server.wait_denoising(&long, MINUTE);
    assert_eq!(again["attempts"], 2);
    assert_eq!(server.job(&queued)["state"], "queued");
    server.kill9();
    assert_eq!(files_under(&videos), expected);

    let server = Server::start(data.path(), &[]);
    let failed = server.job(&long);
    assert_eq!(failed["state"], "failed");
    let reason = failed["error"].as_str().unwrap();
    assert!(reason.contains("stopped during this job 2 times"), "{reason}");
    // The job behind it was never lost: it runs now.
    server.wait_for(&queued, &["succeeded"], MINUTE);
    let all = server.get("/v1/videos?limit=10").json();
    let ids: Vec<&str> = all["videos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![queued.as_str(), long.as_str(), done.as_str()]);
    assert_eq!(
        server.get(&format!("/v1/videos/{done}/meta.json")).json()["id"],
        done.as_str()
    );
}
