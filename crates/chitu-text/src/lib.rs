//! Text conditioning for Wan: prompt cleaning, the T5 tokenizer, and the UMT5 encoder.
//!
//! [`TextEncoder::encode_prompt`] gives what diffusers' `WanPipeline` feeds the DiT: encoder states
//! trimmed to each prompt's length and zero beyond it, `[B, max_len, d_model]`.
//!
//! Loading leaves the token table (a fifth of UMT5-XXL) in its safetensors file and reads the
//! rows each prompt uses ([`TokenTable`]).
//!
//! ```no_run
//! use burn_flex::Flex;
//! use chitu_text::TextEncoder;
//! # fn main() -> Result<(), chitu_text::TextError> {
//! let device = Default::default();
//! let enc = TextEncoder::<Flex>::from_pipeline_dir("Wan2.1-T2V-1.3B-Diffusers", &device)?;
//! let embeds = enc.encode_prompt(&["A cat walking on grass", ""], 512)?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod config;
mod encoder;
mod load;
mod tokenizer;

pub use chitu_store::Precision;
pub use config::Umt5Config;
pub use encoder::{relative_position_bucket, TextEncoder, Umt5Block, Umt5Encoder};
pub use load::{TextLayout, TokenTable, KEEP_F32};
pub use tokenizer::{clean_prompt, Encoded, T5Tokenizer};

/// Errors from the tokenizer or the encoder.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// The tokenizer file is missing or malformed, or tokenizing failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The encoder config is malformed or unsupported.
    #[error("invalid text encoder config: {0}")]
    Config(String),
    /// A config or weight file could not be read, or the checkpoint does not fit the model
    /// (missing or unexpected keys, a wrong shape): the store's error, with the file and keys.
    #[error(transparent)]
    Load(#[from] chitu_store::LoadError),
    /// The encoder was built without a token table and none was loaded.
    #[error("the UMT5 encoder has no token table")]
    NoTokenTable,
    /// An input is out of range.
    #[error("bad text encoder input: {0}")]
    Input(String),
}
