//! This crate's parity cases: the DiT forward references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances. The same
//! references hold at bf16 and f16 weights, at the reduced-precision tolerance.

#[test]
fn dit_forward_cases_match_the_references() {
    chitu_parity::assert_cases_pass(&["dit_"]);
    chitu_parity::assert_cases_pass_at_reduced_precision(&["dit_"]);
}

/// The same references with the linear layers in int8, at the int8 tolerance.
#[test]
fn cases_hold_with_int8_weights() {
    use chitu_parity::{Format, Precision, Weights};
    chitu_parity::assert_cases_pass_as(&["dit_"], Format::new(Precision::Bf16, Weights::Int8));
}
