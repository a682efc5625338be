//! Runs every parity case under `DIR/cases` (or those whose names start with one of the prefixes).
//!
//! ```text
//! cargo run --release --example parity -- tests/fixtures/parity [NAME_PREFIX...]
//! ```
//! Prints one line per case and a last line `N passed, M failed`; exits non-zero if any case fails.

use chitu_parity::{list_cases, run_case};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: parity DIR [NAME_PREFIX...]");
        return ExitCode::from(2);
    };
    let prefixes: Vec<String> = args.collect();
    let names = match list_cases(&dir, &prefixes) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let device = chitu::default_device();
    let (mut passed, mut failed) = (0usize, 0usize);
    for name in &names {
        let report = run_case::<chitu::DefaultBackend>(&dir, name, &device);
        println!("{report}");
        if report.passed() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
