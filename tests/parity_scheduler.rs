//! Scheduler parity against diffusers 0.42: every `scheduler_*` case in the bundled fixtures.

use chitu::{default_device, DefaultBackend};
use chitu_parity::{list_cases, run_case, scheduler::replay, Case};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

#[test]
fn every_scheduler_case_passes() {
    let names = list_cases(&fixtures(), &["scheduler".to_string()]).unwrap();
    assert!(names.len() >= 3, "expected the three scheduler cases, found {names:?}");
    for name in names {
        let report = run_case::<DefaultBackend>(&fixtures(), &name, &default_device());
        assert!(report.passed(), "{report}");
    }
}

#[test]
fn timesteps_and_sigmas_are_bit_exact() {
    for name in list_cases(&fixtures(), &["scheduler".to_string()]).unwrap() {
        let case = Case::load(&fixtures(), &name).unwrap();
        let run = replay::<DefaultBackend>(&case, &default_device()).unwrap();
        let want_t = case.tensor("timesteps").unwrap().as_f32("timesteps").unwrap();
        let want_s = case.tensor("sigmas").unwrap().as_f32("sigmas").unwrap();
        let got_t: Vec<f32> = run.timesteps.iter().map(|&t| t as f32).collect();
        let got_s: Vec<f32> = run.sigmas.iter().map(|&s| s as f32).collect();
        assert_eq!(got_t, want_t, "{name}: timesteps");
        assert_eq!(got_s, want_s, "{name}: sigmas");
    }
}
