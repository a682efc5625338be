//! Runs every parity case under `DIR/cases` (or those whose names start with one of the prefixes).
//!
//! ```text
//! cargo run --release --example parity -- tests/fixtures/parity [NAME_PREFIX...] [--dtype f32|bf16|f16] [--weights float|int8]
//! ```
//! Prints one line per case and a last line `N passed, M failed`; exits non-zero if any case fails.
//! With `--dtype bf16` (or f16) every model is loaded at that precision, and with `--weights
//! int8` the DiT's and the text encoder's linear layers are int8; either is checked against the
//! same f32 references at its own tolerance, which each line prints.

use chitu_parity::{list_cases, run_case_as, Format, Precision, Weights};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: parity DIR [NAME_PREFIX...] [--dtype f32|bf16|f16] [--weights float|int8]";

/// Removes `--name VALUE` (or `--name=VALUE`) from `args` and parses the value; `Ok(None)` when
/// the flag is absent.
fn take_flag<T: std::str::FromStr>(args: &mut Vec<String>, name: &str) -> Result<Option<T>, String>
where
    T::Err: std::fmt::Display,
{
    let eq = format!("{name}=");
    let Some(i) = args.iter().position(|a| a == name || a.starts_with(&eq)) else {
        return Ok(None);
    };
    let (value, taken) = match args[i].strip_prefix(&eq) {
        Some(v) => (Some(v.to_owned()), 1),
        None => (args.get(i + 1).cloned(), 2),
    };
    args.drain(i..(i + taken).min(args.len()));
    let value = value.ok_or_else(|| format!("{name} needs a value\n{USAGE}"))?;
    value.parse::<T>().map(Some).map_err(|e| format!("{name}: {e}"))
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let flags = take_flag::<Precision>(&mut args, "--dtype")
        .and_then(|p| Ok((p, take_flag::<Weights>(&mut args, "--weights")?)));
    let format = match flags {
        Ok((p, w)) => Format::new(p.unwrap_or_default(), w.unwrap_or_default()),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
        let report = run_case_as::<chitu::DefaultBackend>(&dir, name, &device, format);
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
