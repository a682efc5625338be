//! Image-to-video through the `chitu` binary on the Wan2.2 TI2V-5B and I2V-A14B fixture models:
//! videos from a picture (fitted to the request size when it has another), and each bad request
//! refused with a message naming it, before any work and without a file left in `--out`.

use std::path::{Path, PathBuf};

use crate::common;
use common::{decode_mp4, generate};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

fn picture(name: &str) -> String {
    fixtures().join("images").join(name).display().to_string()
}

const SMALL: [&str; 6] = ["--frames", "5", "--steps", "2", "--max-sequence-length", "24"];

fn run_ok(args: &[&str]) -> (tempfile::TempDir, serde_json::Value) {
    let out = tempfile::tempdir().unwrap();
    let run = generate(args, out.path());
    assert!(
        run.status.success(),
        "{args:?}:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let meta = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .expect("a sidecar");
    let meta = serde_json::from_str(&std::fs::read_to_string(meta).unwrap()).unwrap();
    (out, meta)
}

fn mp4_in(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "mp4"))
        .expect("an mp4")
}

#[test]
fn ti2v_and_i2v_make_videos_from_a_picture() {
    let ti2v = model("wan22_ti2v");
    let img = picture("ti2v_public.png");
    let mut args = vec![
        "--model-dir",
        &ti2v,
        "--prompt",
        "a cat",
        "--height",
        "64",
        "--width",
        "64",
        "--image",
        &img,
    ];
    args.extend(SMALL);
    let (out, meta) = run_ok(&args);
    assert_eq!(decode_mp4(&mp4_in(out.path())), (5, 64, 64));
    assert!(
        meta["params"]["image"].as_str().unwrap().ends_with("ti2v_public.png"),
        "{meta}"
    );

    // Every cache policy takes frame 0's own timestep through its DiT calls.
    for cache in ["teacache", "pab", "first_block_cache", "taylorseer"] {
        let mut with_cache = args[..args.len() - SMALL.len()].to_vec();
        with_cache.extend([
            "--frames",
            "5",
            "--steps",
            "6",
            "--max-sequence-length",
            "24",
            "--cache",
            cache,
        ]);
        run_ok(&with_cache);
    }

    // The same model without a picture is text-to-video.
    let without: Vec<&str> = args.iter().copied().filter(|a| *a != "--image" && *a != img).collect();
    run_ok(&without);

    // I2V-A14B from its 32x32 picture at 64x48: scaled to cover and center-cropped; at
    // low-mem 3, the inactive expert and the text encoder off the device, the decode tiled.
    let i2v = model("wan22_i2v");
    let img = picture("i2v_public.png");
    let last = picture("ti2v_public.png");
    let mut args = vec![
        "--model-dir",
        &i2v,
        "--prompt",
        "a cat",
        "--height",
        "48",
        "--width",
        "64",
        "--image",
        &img,
        "--last-image",
        &last,
        "--low-mem",
        "3",
    ];
    args.extend(SMALL);
    let (out, _) = run_ok(&args);
    assert_eq!(decode_mp4(&mp4_in(out.path())), (5, 64, 48));
}

fn assert_refused(args: &[&str], needles: &[&str]) {
    let out = tempfile::tempdir().unwrap();
    let run = generate(args, out.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{args:?} succeeded:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: no {needle:?} in\n{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(left.is_empty(), "{args:?} left files in --out");
}

#[test]
fn bad_image_requests_are_refused_naming_the_problem() {
    let (ti2v, i2v, t2v) = (model("wan22_ti2v"), model("wan22_i2v"), model("wan21"));
    let img = picture("i2v_public.png");
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG but not really").unwrap();
    let corrupt = corrupt.display().to_string();
    let missing = dir.path().join("missing.png").display().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--model-dir", &ti2v, "--image", &missing], vec!["missing.png"]),
        (
            vec!["--model-dir", &ti2v, "--image", &corrupt],
            vec!["corrupt.png", "not a readable PNG or JPEG"],
        ),
        // A 32x32 picture for a 64x64 request with resizing off.
        (
            vec![
                "--model-dir",
                &ti2v,
                "--image",
                &img,
                "--no-resize",
                "--height",
                "64",
                "--width",
                "64",
            ],
            vec!["32x32", "64x64", "resizing is off"],
        ),
        // TI2V sizes are multiples of 32 (16x VAE, 2x patch).
        (
            vec!["--model-dir", &ti2v, "--height", "48", "--width", "64"],
            vec!["height 48", "multiples of 32"],
        ),
        (
            vec!["--model-dir", &t2v, "--image", &img],
            vec!["text-to-video", "takes no image"],
        ),
        (vec!["--model-dir", &i2v], vec!["image-to-video", "--image"]),
        (
            vec!["--model-dir", &ti2v, "--image", &img, "--last-image", &img],
            vec!["last image", "I2V-A14B"],
        ),
    ];
    for (args, needles) in cases {
        let mut args = args;
        args.extend(["--prompt", "x"]);
        args.extend(SMALL);
        if !args.contains(&"--height") {
            args.extend(["--height", "64", "--width", "64"]);
        }
        assert_refused(&args, &needles);
    }
}
