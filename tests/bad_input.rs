//! Bad requests and bad model folders through the `chitu` binary: each fails with a non-zero exit
//! and a message that names the problem, before allocating what it asks for, and leaves no file
//! in `--out`.

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

use crate::common;
use common::generate;

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity/models")
        .join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A copy of fixture model `name` with `edit` applied to it.
fn model_with(name: &str, edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture_model(name), dir.path());
    edit(dir.path());
    dir
}

/// Rewrites `file` with every value of tensor `key` set to NaN.
fn poison(file: &Path, key: &str) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let nan: Vec<u8> = f32::NAN.to_le_bytes().repeat(st.tensor(key).unwrap().data().len() / 4);
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| match k == key {
            true => {
                let poisoned = TensorView::new(v.dtype(), v.shape().to_vec(), &nan).unwrap();
                (k, poisoned)
            }
            false => (k, v),
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

/// Rewrites `file` with tensor `key` stored as I32 (the same bytes, another dtype).
fn retype_as_int(file: &Path, key: &str) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| match k == key {
            true => {
                let int = TensorView::new(safetensors::Dtype::I32, v.shape().to_vec(), v.data()).unwrap();
                (k, int)
            }
            false => (k, v),
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

fn edit_json(file: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(file, json.to_string()).unwrap();
}

/// Files in `dir`, hidden ones (temporaries) included.
fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn assert_refused(args: &[&str], out: &Path, needles: &[&str]) {
    let run = generate(args, out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{args:?} succeeded:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: no {needle:?} in\n{stderr}");
    }
    assert!(files_in(out).is_empty(), "{args:?} left {:?} in --out", files_in(out));
}

#[test]
fn bad_requests_are_refused_naming_the_problem() {
    let small = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2"];
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // A 1 TB noise tensor: refused before any allocation.
        (
            vec!["--height", "65536", "--width", "65536", "--frames", "1001"],
            vec!["too large", "65536"],
        ),
        // Beyond the model's RoPE tables, though small enough to allocate.
        (vec!["--height", "16400", "--width", "32"], vec!["RoPE", "1024"]),
        // Overflowing sizes are an error, not a `capacity overflow` panic.
        (vec!["--height", "18446744073709551600"], vec!["too large"]),
        (
            vec!["--max-sequence-length", "100000"],
            vec!["model_max_length", "100000"],
        ),
        (vec!["--frames", "6"], vec!["4k+1"]),
        (vec!["--height", "40"], vec!["multiples of 16"]),
        (vec!["--steps", "0"], vec!["num_inference_steps"]),
        (vec!["--guidance=-1"], vec!["guidance_scale"]),
        (vec!["--solver", "foo"], vec!["--solver", "unipc", "dpm++", "euler"]),
        // A low-noise guidance on a one-expert model is refused, not silently recorded.
        (vec!["--guidance-2", "3"], vec!["guidance_scale_2", "one expert"]),
        (vec!["--cache", "fastcache"], vec!["cache"]),
        (vec!["--low-mem", "4"], vec!["low-mem"]),
        (vec!["--dtype", "fp8"], vec!["--dtype", "fp8", "bf16"]),
        // Within every limit of the model, but 7.8 TB at its decode: refused up front, with a
        // size that would fit.
        (
            vec!["--height", "16000", "--width", "16000", "--frames", "1001"],
            vec!["needs about", "VAE decode", "available", "would fit"],
        ),
        (vec!["--vae-dtype", "int8"], vec!["--vae-dtype", "int8", "f16"]),
    ];
    for (args, needles) in cases {
        let out = tempfile::tempdir().unwrap();
        // The small defaults, less the flags the case sets itself (clap refuses repeats).
        let sets = |flag: &str| args.iter().any(|a| a.split('=').next() == Some(flag));
        let defaults = small.chunks(2).filter(|pair| !sets(pair[0])).flatten().copied();
        let all: Vec<&str> = ["--prompt", "x"]
            .into_iter()
            .chain(defaults)
            .chain(args.iter().copied())
            .collect();
        assert_refused(&all, &out.path().join("out"), &needles);
    }
}

#[test]
fn output_folders_that_cannot_take_files_fail_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a_file");
    std::fs::write(&file, b"").unwrap();
    for out in [Path::new("/proc/chitu-out"), file.as_path(), &file.join("below")] {
        let run = generate(&["--prompt", "x", "--steps", "1"], out);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{out:?}: {stderr}");
        assert!(stderr.contains(&*out.to_string_lossy()), "{out:?}: {stderr}");
        // Refused before the model ran: no progress was reported.
        assert!(
            !stderr.contains("text encode") && !stderr.contains("generating"),
            "{stderr}"
        );
    }
}

#[test]
fn bad_model_folders_are_refused_naming_the_problem() {
    let nan_vae = model_with("wan21", |d| {
        poison(
            &d.join("vae/diffusion_pytorch_model.safetensors"),
            "decoder.conv_out.weight",
        )
    });
    let nan_text = model_with("wan21", |d| {
        poison(
            &d.join("text_encoder/model.safetensors"),
            "encoder.final_layer_norm.weight",
        )
    });
    let boundary = |r: serde_json::Value| {
        model_with("wan22", move |d| {
            edit_json(&d.join("model_index.json"), |j| j["boundary_ratio"] = r)
        })
    };
    let (too_big, negative, text) = (boundary(5.0.into()), boundary((-1.0).into()), boundary("nan".into()));
    let escape = model_with("wan21", |d| {
        let t = d.join("transformer");
        let index = serde_json::json!({
            "weight_map": {
                "proj_out.weight": "diffusion_pytorch_model.safetensors",
                "proj_out.bias": "../../../../etc/passwd",
            }
        });
        std::fs::write(
            t.join("diffusion_pytorch_model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
    });
    let int_weight = model_with("wan21", |d| {
        retype_as_int(
            &d.join("transformer/diffusion_pytorch_model.safetensors"),
            "proj_out.weight",
        )
    });
    let missing = tempfile::tempdir().unwrap();
    let cases: Vec<(&Path, Vec<&str>)> = vec![
        // An integer tensor cannot become a float weight, at any --dtype.
        (int_weight.path(), vec!["proj_out.weight", "I32", "cannot be converted"]),
        // A NaN VAE used to exit 0 with a black video.
        (nan_vae.path(), vec!["NaN", "decoded video", "VAE"]),
        // A NaN text encoder used to be blamed on the first denoise step.
        (nan_text.path(), vec!["NaN", "text encoder"]),
        (too_big.path(), vec!["boundary_ratio 5", "between 0 and 1"]),
        (negative.path(), vec!["boundary_ratio -1", "between 0 and 1"]),
        (text.path(), vec!["boundary_ratio", "not a number"]),
        (escape.path(), vec!["../../../../etc/passwd", "inside the model folder"]),
        (missing.path(), vec!["model_index.json"]),
    ];
    for (dir, needles) in cases {
        let out = tempfile::tempdir().unwrap();
        let args = [
            "--model-dir",
            &dir.to_string_lossy(),
            "--prompt",
            "x",
            "--height",
            "32",
            "--width",
            "32",
            "--frames",
            "5",
            "--steps",
            "2",
            "--max-sequence-length",
            "16",
        ];
        assert_refused(&args, out.path(), &needles);
    }
}

#[test]
fn a_prompt_can_come_from_a_file_and_a_batch_from_a_prompts_file() {
    let tmp = tempfile::tempdir().unwrap();
    let prompt = tmp.path().join("prompt.txt");
    // Characters a shell would mangle arrive as written.
    std::fs::write(&prompt, "a cat's \"quoted\" $HOME walk\n").unwrap();
    let out = tmp.path().join("one");
    let run = generate(&["--prompt-file", &prompt.to_string_lossy(), "--steps", "2"], &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let meta = std::fs::read_to_string(out.join("a_cat_s_quoted_home_walk_seed0_step2.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(meta["params"]["prompt"], "a cat's \"quoted\" $HOME walk");

    let batch = tmp.path().join("batch.txt");
    std::fs::write(
        &batch,
        "a red disc\n{\"prompt\": \"a blue square\", \"seed\": 3, \"steps\": 1}\n{\"prompt\": \"x\", \"colour\": 1}\n\n{not json\n",
    )
    .unwrap();
    let out = tmp.path().join("batch");
    let run = generate(&["--prompts-file", &batch.to_string_lossy(), "--steps", "2"], &out);
    let stderr = String::from_utf8_lossy(&run.stderr);
    // Two bad lines fail alone, and the run says which at the end.
    assert!(!run.status.success(), "{stderr}");
    assert!(
        stderr.contains("unknown field \"colour\"") && stderr.contains("not a JSON object"),
        "{stderr}"
    );
    assert!(stderr.contains("2 of 4 requests failed, on lines [3, 5]"), "{stderr}");
    let mut files = files_in(&out);
    files.sort();
    let want = ["line0001_a_red_disc_seed0_step2", "line0002_a_blue_square_seed3_step1"];
    let expected: Vec<String> = want
        .iter()
        .flat_map(|stem| ["json", "mp4", "png"].map(|ext| format!("{stem}.{ext}")))
        .collect();
    assert_eq!(files, expected);
}

#[test]
fn the_default_mode_prints_the_resolved_request_before_it_starts() {
    let out = tempfile::tempdir().unwrap();
    let run = common::generate_as_given(&["--prompt", "x", "--steps", "2"], out.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("generating 64x64, 9 frames, 2 steps") && stderr.contains("embedded-tiny"),
        "{stderr}"
    );
}

/// Ctrl-C stops at a step boundary: a non-zero exit that says so, and nothing in `--out`.
#[test]
fn ctrl_c_stops_at_a_step_boundary_and_writes_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let out = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chitu"))
        .args([
            "generate",
            "--embedded",
            "tiny",
            "--prompt",
            "x",
            "--steps",
            "100000",
            "--out",
        ])
        .arg(out.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // The request line comes once the model is loaded and the handler is in place.
    while !seen.contains("generating") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "chitu ended early:\n{seen}");
        seen.push_str(&line);
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "{seen}{rest}");
    assert!(
        rest.contains("interrupted") && rest.contains("denoise step"),
        "{seen}{rest}"
    );
    assert!(files_in(out.path()).is_empty(), "left {:?}", files_in(out.path()));
}

/// A transformer whose channels do not fit the folder's pipeline is refused at load, naming both:
/// wan21's folder, claiming to be image-to-video, has a 16-channel DiT that cannot take the 36.
#[test]
fn a_transformer_that_does_not_fit_the_pipeline_is_refused() {
    let dir = model_with("wan21", |d| {
        edit_json(&d.join("model_index.json"), |j| {
            j["_class_name"] = "WanImageToVideoPipeline".into()
        })
    });
    let out = tempfile::tempdir().unwrap();
    let img = fixture_model("../images/i2v_public.png");
    let args = [
        "--model-dir",
        &dir.path().to_string_lossy(),
        "--image",
        &img.to_string_lossy(),
        "--prompt",
        "x",
        "--height",
        "32",
        "--width",
        "32",
        "--frames",
        "5",
        "--steps",
        "2",
    ];
    assert_refused(&args, out.path(), &["takes 16 channels", "image-to-video", "needs 36"]);
}
