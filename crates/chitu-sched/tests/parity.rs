//! This crate's parity cases: the scheduler references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances.

#[test]
fn scheduler_cases_match_the_references() {
    chitu_parity::assert_cases_pass(&["scheduler_"]);
}
