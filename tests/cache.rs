//! FlexCache through the Generator: the First Block Cache reference, neutral settings, the
//! quality gate, per-expert state, and the CLI flags.

use chitu::cache::{CacheConfig, FirstBlockCacheConfig};
use chitu::pipeline::{DiffusionBackend, DiffusionTask, DiffusionUserParams, Generator};
use chitu::{default_device, DefaultBackend as B};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn tiny() -> Generator<B> {
    Generator::new(DiffusionBackend::embedded_tiny(&default_device()).unwrap())
}

#[test]
fn first_block_cache_matches_diffusers() {
    // The case holds both the cached and the uncached diffusers run; they differ by about 3%, so
    // a cache that never skipped (or always did) would fail one of the two comparisons.
    let report = chitu_parity::run_case::<B>(&fixtures(), "pipeline_t2v_wan21_first_block_cache", &default_device());
    assert!(report.passed(), "{report}");
}

#[test]
fn neutral_settings_leave_the_video_unchanged() {
    let generator = tiny();
    let params = DiffusionUserParams::tiny("A cat walking on grass");
    let neutral = CacheConfig::neutral();
    for config in neutral {
        let p = DiffusionUserParams {
            cache: Some(config.clone()),
            ..params.clone()
        };
        let (task, check) = generator.generate_checked(p).unwrap();
        let stats = task.cache_stats().unwrap();
        assert_eq!(stats.calls, 20, "{}", config.name());
        assert_eq!(stats.full_computes, 20, "{}", config.name());
        assert_eq!(check.max_abs_latent_diff, 0.0, "{}", config.name());
        assert_eq!(check.psnr_db, f64::INFINITY, "{}", config.name());
        assert_eq!(check.block_speedup(), 1.0);
    }
}

#[test]
fn the_quality_gate_reports_what_reuse_costs() {
    let generator = tiny();
    let p = DiffusionUserParams {
        cache: Some(CacheConfig::from_name("taylorseer").unwrap()),
        ..DiffusionUserParams::tiny("A cat walking on grass")
    };
    let (task, check) = generator.generate_checked(p).unwrap();
    // Ten steps, interval 5 from step 3: computes 0, 1, 2, 4, 9 for each branch.
    let stats = task.cache_stats().unwrap();
    assert_eq!((stats.calls, stats.full_computes), (20, 10));
    assert_eq!(check.block_speedup(), 2.0);
    assert!(check.max_abs_latent_diff > 0.0);
    assert!(check.psnr_db.is_finite() && check.psnr_db > 10.0, "{check}");
    let text = check.to_string();
    assert!(text.contains("PSNR") && text.contains("taylorseer"), "{text}");

    let plain = DiffusionTask::<B>::from_user_request(DiffusionUserParams::tiny("x")).unwrap();
    let plain = generator.run(plain).unwrap();
    assert!(generator
        .cache_check(&plain)
        .unwrap_err()
        .to_string()
        .contains("no cache"));
}

#[test]
fn each_expert_keeps_its_own_cache() {
    let dir = fixtures().join("models/wan22");
    let generator = Generator::new(DiffusionBackend::<B>::from_dir(&dir, &default_device()).unwrap());
    let p = DiffusionUserParams {
        prompt: "A cat walking on grass".into(),
        height: 32,
        width: 32,
        num_frames: 5,
        num_inference_steps: 6,
        max_sequence_length: 16,
        cache: Some(CacheConfig::FirstBlockCache(FirstBlockCacheConfig {
            threshold: 1e9,
            ..Default::default()
        })),
        ..DiffusionUserParams::default()
    };
    let task = generator.run(DiffusionTask::from_user_request(p).unwrap()).unwrap();
    // With every skip allowed, only the first call of each (expert, branch) computes all blocks.
    let stats = task.cache_stats().unwrap();
    assert_eq!((stats.calls, stats.full_computes), (12, 4));
}

#[test]
fn the_cli_runs_the_check_and_refuses_unknown_policies() {
    let out = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_chitu"))
            .args([
                "generate",
                "--embedded",
                "tiny",
                "--prompt",
                "A cat walking on grass",
                "--steps",
                "4",
                "--out",
            ])
            .arg(out.path())
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = run(&[
        "--cache",
        r#"{"policy": "pab", "warmup": 1, "cooldown": 0}"#,
        "--cache-check",
    ]);
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{stderr}");
    assert!(stderr.contains("frames PSNR"), "{stderr}");
    let json = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    assert_eq!(meta["params"]["cache"]["policy"], "pab");
    assert_eq!(meta["cache_check"]["uncached_block_evals"], 16);
    assert!(meta["cache_check"]["block_speedup"].as_f64().unwrap() > 1.0);

    let bad = run(&["--cache", "fastcache"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown cache policy"));
    let bad = run(&["--cache", "pab", "--cache-threshold", "0.1"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no threshold"));
}
