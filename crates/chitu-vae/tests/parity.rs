//! This crate's parity cases: the VAE encode and decode references in the committed fixtures, made with
//! diffusers/transformers, at their own tolerances. The same
//! references hold at bf16 and f16 weights, at the reduced-precision tolerance.

#[test]
fn vae_encode_and_decode_cases_match_the_references() {
    // `vae_` is Wan2.1's VAE, `vae22_` Wan2.2's.
    chitu_parity::assert_cases_pass(&["vae_", "vae22_"]);
    chitu_parity::assert_cases_pass_at_reduced_precision(&["vae_", "vae22_"]);
}
