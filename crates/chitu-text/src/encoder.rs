//! The UMT5 encoder (transformers' `UMT5EncoderModel`): T5 blocks with a relative position bias
//! of their own in every layer, and `TextEncoder`, the tokenizer and encoder together as the
//! pipeline calls them. Modules are named after Wan's `t5.py`; see `load.rs` for the
//! transformers key table.

use crate::{Encoded, T5Tokenizer, TextError, Umt5Config};
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};
use chitu_host::gelu::gelu_tanh;
use chitu_host::{mixed, rows};
use chitu_store::FileRows;
use std::sync::Arc;

/// T5's bidirectional relative-position bucket of `relative_position = key - query`, computed in
/// float32 as transformers does so that bucket edges land where they land there.
pub fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> i64 {
    let half = (num_buckets / 2) as i64;
    let base = if relative_position > 0 { half } else { 0 };
    let n = relative_position.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    let log_ratio = (n as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
    let large = max_exact + (log_ratio * (half - max_exact) as f32) as i64;
    base + large.min(half - 1)
}

/// T5's RMS layer norm: no mean subtraction, no bias, computed in float32.
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    fn new(dim: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Initializer::Ones.init([dim], device),
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if chitu_host::is_host_f32(&x) {
            return chitu_host::rows::rms_norm(x, self.weight.val(), self.eps);
        }
        let variance = x.clone().square().mean_dim(2);
        x * (variance + self.eps).sqrt().recip() * self.weight.val().unsqueeze()
    }
}

/// Self-attention without biases or score scaling (T5 folds the scale into its weights).
#[derive(Module, Debug)]
pub struct T5Attention<B: Backend> {
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub num_heads: usize,
}

/// The gated-GELU feed-forward: `wo(gelu_tanh(wi_0 x) * wi_1 x)`.
#[derive(Module, Debug)]
pub struct GatedFfn<B: Backend> {
    pub wi_0: Linear<B>,
    pub wi_1: Linear<B>,
    pub wo: Linear<B>,
}

/// One UMT5 encoder layer.
#[derive(Module, Debug)]
pub struct Umt5Block<B: Backend> {
    /// RMS norm before self-attention.
    pub norm1: T5LayerNorm<B>,
    /// Self-attention with this layer's own relative position bias.
    pub attn: T5Attention<B>,
    /// `[num_buckets, num_heads]` relative position bias of this layer.
    pub pos_embedding: Embedding<B>,
    /// RMS norm before the feed-forward.
    pub norm2: T5LayerNorm<B>,
    /// The gated-GELU feed-forward.
    pub ffn: GatedFfn<B>,
}

fn no_bias<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_in, d_out).with_bias(false).init(device)
}

impl<B: Backend> Umt5Block<B> {
    fn new(c: &Umt5Config, device: &B::Device) -> Self {
        let (d, inner) = (c.d_model, c.inner_dim());
        Self {
            norm1: T5LayerNorm::new(d, c.layer_norm_epsilon, device),
            attn: T5Attention {
                q: no_bias(d, inner, device),
                k: no_bias(d, inner, device),
                v: no_bias(d, inner, device),
                o: no_bias(inner, d, device),
                num_heads: c.num_heads,
            },
            pos_embedding: EmbeddingConfig::new(c.relative_attention_num_buckets, c.num_heads).init(device),
            norm2: T5LayerNorm::new(d, c.layer_norm_epsilon, device),
            ffn: GatedFfn {
                wi_0: no_bias(d, c.d_ff, device),
                wi_1: no_bias(d, c.d_ff, device),
                wo: no_bias(c.d_ff, d, device),
            },
        }
    }

    /// `buckets` are the `[1, L*L]` relative-position buckets; `pad` is `[B, L]`, true at padding.
    fn forward(&self, x: Tensor<B, 3>, buckets: Tensor<B, 2, Int>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let h = self.attn.num_heads;
        if chitu_host::is_host_f32(&x) {
            return self.forward_host(x, buckets, pad);
        }
        let bias: Tensor<B, 3> = self.pos_embedding.forward(buckets).reshape([l, l, h]);
        let bias = bias.permute([2, 0, 1]).unsqueeze::<4>().expand([b, h, l, l]);
        let mask = pad.reshape([b, 1, 1, l]).expand([b, h, l, l]);

        let normed = self.norm1.forward(x.clone());
        let heads = |t: Tensor<B, 3>| {
            let d = t.dims()[2] / h;
            t.reshape([b, l, h, d]).swap_dims(1, 2)
        };
        let q = heads(mixed::linear(&self.attn.q, normed.clone()));
        let k = heads(mixed::linear(&self.attn.k, normed.clone()));
        let v = heads(mixed::linear(&self.attn.v, normed));
        let options = AttentionModuleOptions {
            scale: Some(1.0),
            ..Default::default()
        };
        let out = attention(q, k, v, Some(mask), Some(bias), options);
        let [_, _, _, d] = out.dims();
        let x = x + mixed::linear(&self.attn.o, out.swap_dims(1, 2).reshape([b, l, h * d]));

        let normed = self.norm2.forward(x.clone());
        let gate = gelu_tanh(mixed::linear(&self.ffn.wi_0, normed.clone()));
        x + mixed::linear(&self.ffn.wo, gate * mixed::linear(&self.ffn.wi_1, normed))
    }
}

impl<B: Backend> Umt5Block<B> {
    /// [`Umt5Block::forward`] on CPU backends in f32: the residual adds and the gating are
    /// parallel passes ([`chitu_host::rows`]), and the attention runs on the host kernel
    /// ([`chitu_host::attention`]), heads in place, with each layer's position bias looked up
    /// from its `[buckets, heads]` table as the scores are made instead of built as a
    /// `[heads, L, L]` tensor (64 MB at 512 tokens for UMT5-XXL).
    fn forward_host(&self, x: Tensor<B, 3>, buckets: Tensor<B, 2, Int>, pad: Tensor<B, 2, Bool>) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let h = self.attn.num_heads;
        let buckets: Vec<i64> = buckets.into_data().convert::<i64>().to_vec().unwrap_or_default();
        let table = chitu_host::HostF32::new(self.pos_embedding.weight.val());
        let pad: Vec<bool> = pad.into_data().convert::<bool>().to_vec().unwrap_or_default();
        let table = table.as_slice();
        let bias = |_: usize, head: usize, i: usize, row: &mut [f32]| {
            let at = &buckets[i * l..(i + 1) * l];
            row.iter_mut()
                .zip(at)
                .for_each(|(x, &k)| *x += table[k as usize * h + head]);
        };

        let normed = self.norm1.forward(x.clone());
        let heads = |t: Tensor<B, 3>| {
            let d = t.dims()[2] / h;
            t.reshape([b, l, h, d])
        };
        let q = heads(mixed::linear(&self.attn.q, normed.clone()));
        let k = heads(mixed::linear(&self.attn.k, normed.clone()));
        let v = heads(mixed::linear(&self.attn.v, normed));
        let out = chitu_host::attention::attention(q, k, v, 1.0, Some(&pad), Some(&bias));
        let [_, _, _, d] = out.dims();
        let x = rows::residual(x, mixed::linear(&self.attn.o, out.reshape([b, l, h * d])), None);

        let normed = self.norm2.forward(x.clone());
        let gate = gelu_tanh(mixed::linear(&self.ffn.wi_0, normed.clone()));
        let ffn = mixed::linear(&self.ffn.wo, rows::mul(gate, mixed::linear(&self.ffn.wi_1, normed)));
        rows::residual(x, ffn, None)
    }
}

/// transformers' `UMT5EncoderModel`.
#[derive(Module, Debug)]
pub struct Umt5Encoder<B: Backend> {
    /// The token table as a device tensor; `None` when it is read from its file (`token_rows`).
    pub token_embedding: Option<Embedding<B>>,
    /// The token table left in its checkpoint file ([`crate::TokenTable::InFile`]).
    #[module(skip)]
    pub token_rows: Option<Arc<FileRows>>,
    /// The encoder layers (`encoder.block.N`).
    pub blocks: Vec<Umt5Block<B>>,
    /// The final RMS norm (`encoder.final_layer_norm`).
    pub norm: T5LayerNorm<B>,
    #[module(skip)]
    /// The shape this encoder was built with.
    pub config: Umt5Config,
}

impl<B: Backend> Umt5Encoder<B> {
    /// An encoder with random weights; loading replaces them.
    pub fn new(config: Umt5Config, device: &B::Device) -> Result<Self, TextError> {
        config.validate()?;
        Ok(Self {
            token_embedding: Some(EmbeddingConfig::new(config.vocab_size, config.d_model).init(device)),
            token_rows: None,
            blocks: (0..config.num_layers)
                .map(|_| Umt5Block::new(&config, device))
                .collect(),
            norm: T5LayerNorm::new(config.d_model, config.layer_norm_epsilon, device),
            config,
        })
    }

    /// The encoder's last hidden state `[B, L, d_model]` for token ids and mask, both `[B, L]`
    /// row-major (mask 1 for tokens, 0 for padding).
    pub fn forward(
        &self,
        ids: &[i64],
        mask: &[i64],
        batch: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>, TextError> {
        if batch == 0 || !ids.len().is_multiple_of(batch) || ids.len() != mask.len() || ids.is_empty() {
            return Err(TextError::Input(format!(
                "{} ids and {} mask values do not form a batch of {batch}",
                ids.len(),
                mask.len()
            )));
        }
        let l = ids.len() / batch;
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= self.config.vocab_size) {
            return Err(TextError::Input(format!(
                "token id {bad} outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let buckets: Vec<i64> = (0..l as i64)
            .flat_map(|q| (0..l as i64).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_position_bucket(
                    k - q,
                    self.config.relative_attention_num_buckets,
                    self.config.relative_attention_max_distance,
                )
            })
            .collect();
        let buckets = Tensor::<B, 2, Int>::from_data(TensorData::new(buckets, [1, l * l]), device);
        let pad = Tensor::<B, 2, Bool>::from_data(
            TensorData::new(mask.iter().map(|&m| m == 0).collect::<Vec<_>>(), [batch, l]),
            device,
        );
        let mut x = self.embed(ids, batch, device)?;
        for block in &self.blocks {
            x = block.forward(x, buckets.clone(), pad.clone());
        }
        Ok(self.norm.forward(x))
    }
}

impl<B: Backend> Umt5Encoder<B> {
    /// `[B, L, d_model]` token embeddings of in-vocabulary `ids`.
    fn embed(&self, ids: &[i64], batch: usize, device: &B::Device) -> Result<Tensor<B, 3>, TextError> {
        let l = ids.len() / batch;
        if let Some(table) = &self.token_embedding {
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.to_vec(), [batch, l]), device);
            // A table held narrow gives narrow rows; the encoder runs on f32.
            return Ok(mixed::cast(table.forward(ids), burn::tensor::DType::F32));
        }
        let rows = self.token_rows.as_ref().ok_or(TextError::NoTokenTable)?;
        let ids: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let x = rows.gather(&ids)?;
        Ok(Tensor::from_data(
            TensorData::new(x, [batch, l, self.config.d_model]),
            device,
        ))
    }
}

/// Tokenizer plus encoder: everything between a prompt and the DiT's text states.
pub struct TextEncoder<B: Backend> {
    /// The T5 tokenizer.
    pub tokenizer: T5Tokenizer,
    /// The UMT5 encoder.
    pub encoder: Umt5Encoder<B>,
    device: B::Device,
}

impl<B: Backend> TextEncoder<B> {
    /// Pairs a tokenizer with an encoder on `device`.
    pub fn new(tokenizer: T5Tokenizer, encoder: Umt5Encoder<B>, device: B::Device) -> Self {
        Self {
            tokenizer,
            encoder,
            device,
        }
    }

    /// Tokenizes `prompts` and runs the encoder: ids and mask, and the last hidden state
    /// `[B, max_len, d_model]` (padding positions included, as transformers returns them).
    pub fn encode(&self, prompts: &[&str], max_len: usize) -> Result<(Encoded, Tensor<B, 3>), TextError> {
        let enc = self.tokenizer.encode(prompts, max_len)?;
        let hidden = self.encoder.forward(&enc.ids, &enc.mask, enc.batch, &self.device)?;
        Ok((enc, hidden))
    }

    /// The prompt embeddings diffusers' WanPipeline gives the DiT: encoder states of each prompt's
    /// true tokens, exactly zero past them, `[B, max_len, d_model]`.
    ///
    /// The encoder runs on the batch's longest true length, not on `max_len`: padding is masked
    /// out of every attention, and every other layer works token by token, so the states of the
    /// true tokens do not depend on how much padding follows, and the padded ones are zeroed
    /// anyway. diffusers runs all 512 positions; a 20-token prompt costs 25x less here.
    pub fn encode_prompt(&self, prompts: &[&str], max_len: usize) -> Result<Tensor<B, 3>, TextError> {
        let enc = self.tokenizer.encode(prompts, max_len)?;
        let longest = (0..enc.batch).map(|i| enc.len(i)).max().unwrap_or(0).max(1);
        let cut = |v: &[i64]| -> Vec<i64> { v.chunks(enc.max_len).flat_map(|row| row[..longest].to_vec()).collect() };
        let hidden = self
            .encoder
            .forward(&cut(&enc.ids), &cut(&enc.mask), enc.batch, &self.device)?;
        let hidden = match enc.max_len - longest {
            0 => hidden,
            pad => {
                let zeros = Tensor::zeros([enc.batch, pad, self.encoder.config.d_model], &self.device);
                Tensor::cat(vec![hidden, zeros], 1)
            }
        };
        Ok(trim_to_mask(hidden, &enc, &self.device))
    }
}

/// Zeroes every position past each row's true length.
pub(crate) fn trim_to_mask<B: Backend>(hidden: Tensor<B, 3>, enc: &Encoded, device: &B::Device) -> Tensor<B, 3> {
    let keep: Vec<f32> = (0..enc.batch)
        .flat_map(|i| {
            let n = enc.len(i);
            (0..enc.max_len).map(move |j| if j < n { 1.0 } else { 0.0 })
        })
        .collect();
    let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [enc.batch, enc.max_len]), device);
    hidden * keep.unsqueeze_dim(2)
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket as bucket;

    /// Values worked by hand from T5's formula with 32 buckets and max distance 128: 16 buckets a
    /// direction, exact up to 8, then `8 + floor(ln(n / 8) / ln(16) * 8)`, capped at 15.
    #[test]
    fn buckets_follow_the_t5_formula() {
        assert_eq!(bucket(0, 32, 128), 0);
        assert_eq!(bucket(-1, 32, 128), 1);
        assert_eq!(bucket(1, 32, 128), 17);
        assert_eq!(bucket(-7, 32, 128), 7);
        assert_eq!(bucket(7, 32, 128), 23);
        assert_eq!(bucket(-8, 32, 128), 8); // ln(1) = 0
        assert_eq!(bucket(-9, 32, 128), 8); // 8 + floor(0.340)
        assert_eq!(bucket(-12, 32, 128), 9); // 8 + floor(1.170)
        assert_eq!(bucket(-20, 32, 128), 10); // 8 + floor(2.644)
        assert_eq!(bucket(30, 32, 128), 16 + 11); // 8 + floor(3.814), forward half
        assert_eq!(bucket(-100, 32, 128), 15); // 8 + floor(7.288)
        assert_eq!(bucket(-500, 32, 128), 15); // capped
        assert_eq!(bucket(500, 32, 128), 31);
    }
}
