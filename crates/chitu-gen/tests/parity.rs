//! This crate's parity cases: the whole-pipeline references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances. The same
//! references hold at bf16 and f16 weights, at the reduced-precision tolerance.

#[test]
fn whole_pipeline_cases_match_the_references() {
    chitu_parity::assert_cases_pass(&["pipeline_"]);
    chitu_parity::assert_cases_pass_at_reduced_precision(&["pipeline_"]);
}

/// The same references with the DiTs' and the text encoder's linear layers in int8, at the int8
/// tolerance.
#[test]
fn whole_pipeline_cases_hold_with_int8_weights() {
    use chitu_parity::{Format, Precision, Weights};
    chitu_parity::assert_cases_pass_as(&["pipeline_"], Format::new(Precision::Bf16, Weights::Int8));
}
