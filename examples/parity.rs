//! Runs every parity case under `DIR/cases` (or those whose names start with one of the prefixes).
//!
//! ```text
//! cargo run --release --example parity -- tests/fixtures/parity [NAME_PREFIX...] [--dtype f32|bf16|f16]
//! ```
//! Prints one line per case and a last line `N passed, M failed`; exits non-zero if any case fails.
//! With `--dtype bf16` (or f16) every model is loaded at that precision and checked against the
//! same f32 references at the reduced-precision tolerance, which each line prints.

use chitu_parity::{list_cases, run_case_as, Precision};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: parity DIR [NAME_PREFIX...] [--dtype f32|bf16|f16]";

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut precision = Precision::F32;
    if let Some(i) = args.iter().position(|a| a == "--dtype" || a.starts_with("--dtype=")) {
        let value = match args[i].strip_prefix("--dtype=") {
            Some(v) => Some(v.to_owned()),
            None => args.get(i + 1).cloned(),
        };
        let taken = if args[i].contains('=') { 1 } else { 2 };
        match value.as_deref().map(str::parse::<Precision>) {
            Some(Ok(p)) => precision = p,
            Some(Err(e)) => {
                eprintln!("error: --dtype: {e}");
                return ExitCode::from(2);
            }
            None => {
                eprintln!("error: --dtype needs a value\n{USAGE}");
                return ExitCode::from(2);
            }
        }
        args.drain(i..(i + taken).min(args.len()));
    }
    let mut args = args.into_iter();
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("{USAGE}");
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
        let report = run_case_as::<chitu::DefaultBackend>(&dir, name, &device, precision);
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
