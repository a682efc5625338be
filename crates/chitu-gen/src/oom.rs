//! Device out-of-memory as a typed error.
//!
//! burn's CUDA backend reports a failed allocation (cubecl's `BufferTooBig`, or `OutOfMemory` at a
//! kernel launch) by panicking inside the tensor op. Each stage runs under a guard that turns
//! exactly those panics into [`GenError::OutOfMemory`] naming the stage; any other panic goes on
//! unwinding. The task that hit it cannot continue (its latents may be half-updated).

use crate::GenError;
use std::any::Any;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

/// Whether a panic message is an allocation failure of the device.
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out of memory",
        "out-of-memory",
        "out_of_memory",
        "outofmemory",
        "can't allocate buffer",
        "buffertoobig",
    ]
    .iter()
    .any(|needle| m.contains(needle))
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        String::new()
    }
}

/// Runs `f`, turning an out-of-memory panic into [`GenError::OutOfMemory`] for `stage`.
pub(crate) fn guard<T>(stage: impl FnOnce() -> String, f: impl FnOnce() -> Result<T, GenError>) -> Result<T, GenError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = message(payload.as_ref());
            if is_out_of_memory(&msg) {
                Err(GenError::OutOfMemory {
                    stage: stage(),
                    detail: msg.lines().next().unwrap_or_default().to_string(),
                })
            } else {
                resume_unwind(payload)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_failures_become_typed_errors() {
        let oom = guard(
            || "denoise step 3".into(),
            || -> Result<(), GenError> {
                panic!("called `Result::unwrap()` on an `Err` value: BufferTooBig {{ size: 1 }}")
            },
        );
        match oom {
            Err(GenError::OutOfMemory { stage, detail }) => {
                assert_eq!(stage, "denoise step 3");
                assert!(detail.contains("BufferTooBig"));
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        // The message names the stage; the CLI adds its own hint (`chitu::cli::hint`).
        let e = GenError::OutOfMemory {
            stage: "VAE decode".into(),
            detail: "can't allocate buffer of size: 8".into(),
        };
        assert!(e.to_string().contains("VAE decode"), "{e}");
        assert!(guard(|| "x".into(), || Ok::<_, GenError>(5)).unwrap() == 5);
    }

    #[test]
    fn other_panics_keep_unwinding() {
        let r = catch_unwind(|| {
            guard(
                || "x".into(),
                || -> Result<(), GenError> { panic!("index out of bounds") },
            )
        });
        assert!(r.is_err());
        assert!(is_out_of_memory("An out-of-memory error happened during launch"));
        assert!(is_out_of_memory("CUDA_ERROR_OUT_OF_MEMORY"));
        assert!(!is_out_of_memory("shape mismatch"));
    }
}
