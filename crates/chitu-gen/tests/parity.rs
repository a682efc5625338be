//! This crate's parity cases: the whole-pipeline references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances.

#[test]
fn whole_pipeline_cases_match_the_references() {
    chitu_parity::assert_cases_pass(&["pipeline_"]);
}
