//! The `chitu` binary on the embedded model: files written, MP4 decodable with the right frames.

use crate::common;
use common::{decode_mp4, generate};

#[test]
fn generate_on_the_embedded_model_writes_a_playable_video() {
    let out = tempfile::tempdir().unwrap();
    let args = ["--prompt", "A cat walking on grass", "--seed", "3", "--steps", "4"];
    let run = generate(&[&args[..], &["--png-frames"]].concat(), out.path());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stem = "a_cat_walking_on_grass_seed3_step4";
    let printed = String::from_utf8_lossy(&run.stdout);
    for ext in ["mp4", "png", "json"] {
        let p = out.path().join(format!("{stem}.{ext}"));
        assert!(p.exists(), "missing {}", p.display());
        assert!(printed.contains(&p.display().to_string()));
    }
    assert!(out.path().join(format!("{stem}_0008.png")).exists());
    assert_eq!(decode_mp4(&out.path().join(format!("{stem}.mp4"))), (9, 64, 64));

    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(format!("{stem}.json"))).unwrap()).unwrap();
    assert_eq!(sidecar["params"]["seed"], 3);
    assert!(sidecar["timings_s"]["denoise"].as_f64().unwrap() > 0.0);

    // The same seed gives the same video bytes.
    let again = tempfile::tempdir().unwrap();
    let run2 = generate(&args, again.path());
    assert!(run2.status.success());
    assert_eq!(
        std::fs::read(out.path().join(format!("{stem}.mp4"))).unwrap(),
        std::fs::read(again.path().join(format!("{stem}.mp4"))).unwrap()
    );
}

#[test]
fn bad_requests_fail_before_work_with_a_message() {
    let out = tempfile::tempdir().unwrap();
    for (flag, value, needle) in [
        ("--frames", "6", "4k+1"),
        ("--height", "40", "16"),
        ("--steps", "0", "steps"),
        ("--solver", "heun", "solver"),
    ] {
        let run = generate(&["--prompt", "x", flag, value], out.path());
        assert!(!run.status.success());
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}
