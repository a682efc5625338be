//! The runner itself: unsupported kinds fail loudly, broken case files are errors naming the file.

use chitu::{default_device, DefaultBackend};
use chitu_parity::{list_cases, run_case, Outcome};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

#[test]
fn unknown_kind_is_reported_unsupported_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cases")).unwrap();
    let st = fixtures().join("cases/scheduler_euler_flow.safetensors");
    std::fs::copy(&st, dir.path().join("cases/x.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("cases/x.json"),
        r#"{"kind": "teleport", "tensors": "x.safetensors", "tolerance": {"rel_l2": 1e-4}}"#,
    )
    .unwrap();
    let report = run_case::<DefaultBackend>(dir.path(), "x", &default_device());
    assert!(matches!(&report.outcome, Outcome::Unsupported(k) if k == "teleport"));
    assert!(!report.passed());
    assert_eq!(report.to_string(), "case x: unsupported kind teleport");
}

#[test]
fn corrupt_or_missing_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cases")).unwrap();
    std::fs::write(dir.path().join("cases/bad.json"), "{ not json").unwrap();
    let report = run_case::<DefaultBackend>(dir.path(), "bad", &default_device());
    assert!(!report.passed());
    assert!(report.to_string().contains("bad.json"), "{report}");

    std::fs::write(
        dir.path().join("cases/lost.json"),
        r#"{"kind": "scheduler", "tensors": "gone.safetensors", "tolerance": {"rel_l2": 1e-4}}"#,
    )
    .unwrap();
    let report = run_case::<DefaultBackend>(dir.path(), "lost", &default_device());
    assert!(report.to_string().contains("gone.safetensors"), "{report}");

    std::fs::write(dir.path().join("cases/junk.safetensors"), b"\x05\x00garbage").unwrap();
    std::fs::write(
        dir.path().join("cases/junk.json"),
        r#"{"kind": "scheduler", "tensors": "junk.safetensors", "tolerance": {"rel_l2": 1e-4}}"#,
    )
    .unwrap();
    let report = run_case::<DefaultBackend>(dir.path(), "junk", &default_device());
    assert!(report.to_string().contains("junk.safetensors"), "{report}");
}

#[test]
fn prefixes_select_cases() {
    let all = list_cases(&fixtures(), &[]).unwrap();
    let some = list_cases(&fixtures(), &["scheduler_u".to_string(), "vae_".to_string()]).unwrap();
    assert!(all.len() > some.len());
    assert!(some
        .iter()
        .all(|n| n.starts_with("scheduler_u") || n.starts_with("vae_")));
    assert!(list_cases(Path::new("/nonexistent/parity"), &[]).is_err());
}

#[test]
fn a_perturbed_reference_fails() {
    // Guards against a comparison that cannot fail: shift one reference value and the case must fail.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cases")).unwrap();
    let src = fixtures().join("cases");
    std::fs::copy(
        src.join("scheduler_euler_flow.json"),
        dir.path().join("cases/scheduler_euler_flow.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("scheduler_euler_flow.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec(), v.shape().to_vec()))
        .collect();
    for (name, data, _) in &mut tensors {
        if name == "trajectory" {
            let x = f32::from_le_bytes(data[..4].try_into().unwrap()) + 10.0;
            data[..4].copy_from_slice(&x.to_le_bytes());
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("cases/scheduler_euler_flow.safetensors")).unwrap();
    let report = run_case::<DefaultBackend>(dir.path(), "scheduler_euler_flow", &default_device());
    assert!(!report.passed(), "{report}");
}

#[test]
fn a_folder_or_prefix_with_no_case_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("cases")).unwrap();
    let e = list_cases(dir.path(), &[]).unwrap_err().to_string();
    assert!(e.contains("no case") && e.contains("cases"), "{e}");
    let e = list_cases(&fixtures(), &["nonesuch_".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nonesuch_"), "{e}");
}
