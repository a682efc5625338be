//! This crate's parity cases: the DiT forward references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances.

#[test]
fn dit_forward_cases_match_the_references() {
    chitu_parity::assert_cases_pass(&["dit_"]);
}
