//! This crate's parity cases: the text encoder references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances.

#[test]
fn text_encoder_cases_match_the_references() {
    chitu_parity::assert_cases_pass(&["text_"]);
}
