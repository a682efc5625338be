//! LoRA adapters for the Wan transformer, in the key formats people download, as deltas that
//! `chitu_store::merge_deltas` adds to a loaded model.
//!
//! Three spellings of the same modules are read:
//! - Wan's own names, as lightx2v and ComfyUI ship them (`diffusion_model.blocks.0.self_attn.q`);
//! - diffusers' (`transformer.blocks.0.attn1.to_q`), as PEFT's `save_lora_weights` writes them;
//! - musubi-tuner's (`lora_unet_blocks_0_self_attn_q`), Wan's names with `_` for `.`, when only
//!   one module of the model fits; otherwise the key is refused by name.
//!
//! Each goes through the layout's remap table ([`CheckpointLayout`]) to a module path, and the
//! math is diffusers'/PEFT's: `W += strength * (alpha / rank) * up @ down`,
//! `b += strength * diff_b`, `W += strength * diff`. Like diffusers, `diff`/`diff_b` on norm
//! layers are dropped (and listed in [`LoraDeltas::ignored`]).

use crate::CheckpointLayout;
use burn::tensor::{DType, TensorData};
use chitu_store::{read_tensors, Delta, DeltaSet, KeyMap, LoadError, ParamInfo, Term};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Why a LoRA could not be applied. Every variant names the file; a mismatch lists the keys.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The file could not be read, or is not a valid safetensors file.
    #[error("LoRA {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The store's error (boxed: it is large, and this one is rare).
        #[source]
        source: Box<LoadError>,
    },
    /// Keys that match no module of the model, or do not fit it (a LoRA made for another model:
    /// an I2V LoRA on T2V, a 14B LoRA on 1.3B). With a partial load these are skipped instead.
    #[error("LoRA {} does not fit this model ({} problem(s); a partial load skips them): {}", path.display(), problems.len(), list(problems))]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// One line per key: the key and what is wrong with it.
        problems: Vec<String>,
    },
    /// A tensor holds NaN or infinity.
    #[error("LoRA {}: tensor {key} holds NaN or infinity", path.display())]
    NotFinite {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        key: String,
    },
    /// Nothing in the file changes the model.
    #[error("LoRA {}: no key of the file applies to this model{}", path.display(), skipped_note(skipped))]
    Empty {
        /// The file.
        path: PathBuf,
        /// How many keys were skipped.
        skipped: usize,
    },
    /// The strength is not a finite number.
    #[error("LoRA {}: strength {strength} is not a finite number", path.display())]
    Strength {
        /// The file.
        path: PathBuf,
        /// The strength given.
        strength: f32,
    },
}

fn skipped_note(n: &usize) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} key(s) skipped as not fitting)"),
    }
}

fn list(items: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s: Vec<String> = items.iter().take(SHOWN).cloned().collect();
    if items.len() > SHOWN {
        s.push(format!("... and {} more", items.len() - SHOWN));
    }
    s.join("; ")
}

/// A LoRA file, read whole (adapters are small next to the model).
#[derive(Debug, Clone)]
pub struct LoraFile {
    path: PathBuf,
    tensors: BTreeMap<String, TensorData>,
}

impl LoraFile {
    /// Reads a safetensors LoRA; refuses a tensor that is not a float or holds NaN/Inf.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, LoraError> {
        let path = path.as_ref().to_path_buf();
        let read = |source| LoraError::Read {
            path: path.clone(),
            source: Box::new(source),
        };
        if !path.is_file() {
            let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such LoRA file");
            return Err(read(LoadError::io(&path, missing)));
        }
        let mut tensors = BTreeMap::new();
        for (key, data) in read_tensors(&path).map_err(read)? {
            if !matches!(data.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
                let message = format!("tensor {key} is stored as {:?}, not a float", data.dtype);
                return Err(read(LoadError::malformed(&path, message)));
            }
            // Held as stored (bf16 as lightx2v ships them: half the memory); the merge widens.
            let wide = data.clone().convert_dtype(DType::F32);
            if wide.as_slice::<f32>().is_ok_and(|v| v.iter().any(|x| !x.is_finite())) {
                return Err(LoraError::NotFinite { path, key });
            }
            tensors.insert(key, data);
        }
        Ok(Self { path, tensors })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its keys.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Bytes its tensors hold (in the file's dtype).
    pub fn bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes.len() as u64).sum()
    }
}

/// What one LoRA changes in one model.
#[derive(Debug, Clone, Default)]
pub struct LoraDeltas {
    /// The deltas, by parameter path.
    pub deltas: DeltaSet,
    /// File keys used.
    pub applied: usize,
    /// Keys skipped by a partial load, each with why.
    pub skipped: Vec<String>,
    /// Keys dropped as diffusers drops them (`diff`/`diff_b` of norm layers).
    pub ignored: Vec<String>,
}

impl LoraDeltas {
    /// Bytes the deltas hold.
    pub fn bytes(&self) -> u64 {
        self.deltas.values().flatten().map(|t| t.delta.bytes()).sum()
    }
}

/// What a key sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
    DiffBias,
    Diff,
}

/// Key endings, longest first, as trainers write them. `lora_B.bias` is diffusers' spelling of a
/// `diff_b` (PEFT's `lora_bias`).
const PARTS: &[(&str, Part)] = &[
    (".lora_down.weight", Part::Down),
    (".lora_A.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora_B.weight", Part::Up),
    (".lora_B.bias", Part::DiffBias),
    (".alpha", Part::Alpha),
    (".diff_b", Part::DiffBias),
    (".diff", Part::Diff),
];

/// Key prefixes, and whether the names after them are musubi-tuner's underscored ones.
const PREFIXES: &[(&str, bool)] = &[
    ("model.diffusion_model.", false),
    ("diffusion_model.", false),
    ("base_model.model.", false),
    ("transformer.", false),
    ("lora_unet_", true),
];

/// Maps a LoRA's module names to this crate's module paths.
struct Names {
    wan: KeyMap,
    diffusers: KeyMap,
}

impl Names {
    fn new() -> Result<Self, LoadError> {
        Ok(Self {
            wan: KeyMap::new(CheckpointLayout::Wan.remap_table())?,
            diffusers: KeyMap::new(CheckpointLayout::Diffusers.remap_table())?,
        })
    }

    /// The module path of a (dotted) parameter name in either layout: Wan's table renames only
    /// Wan's names, and diffusers' table only diffusers', so applying both covers both.
    fn path_of(&self, param: &str) -> String {
        self.diffusers.apply(&self.wan.apply(param))
    }

    /// The parameter paths `name` + `.suffix` can mean that `params` has: one for a dotted name;
    /// for musubi's underscored name, every way of reading its `_`s that fits the model.
    fn targets(
        &self,
        name: &str,
        underscored: bool,
        suffixes: &[&str],
        params: &BTreeMap<String, ParamInfo>,
    ) -> BTreeSet<String> {
        let spellings: Vec<String> = match underscored {
            false => vec![name.to_string()],
            true => dotted_spellings(name),
        };
        let mut found = BTreeSet::new();
        for spelling in &spellings {
            for suffix in suffixes {
                let param = match suffix.is_empty() {
                    true => spelling.clone(),
                    false => format!("{spelling}.{suffix}"),
                };
                let path = self.path_of(&param);
                if params.contains_key(&path) {
                    found.insert(path);
                    break;
                }
            }
        }
        found
    }
}

/// Every reading of an underscored name with each `_` kept or made a `.` (at most 2^12).
fn dotted_spellings(name: &str) -> Vec<String> {
    let cuts: Vec<usize> = name.match_indices('_').map(|(i, _)| i).take(12).collect();
    (0..1usize << cuts.len())
        .map(|mask| {
            let mut s: Vec<u8> = name.as_bytes().to_vec();
            for (bit, &at) in cuts.iter().enumerate() {
                if mask & (1 << bit) != 0 {
                    s[at] = b'.';
                }
            }
            String::from_utf8(s).unwrap_or_else(|_| unreachable!("only ASCII bytes were replaced"))
        })
        .collect()
}

/// The pieces a file gives one module.
#[derive(Default)]
struct Pieces<'a> {
    down: Option<(&'a str, &'a TensorData)>,
    up: Option<(&'a str, &'a TensorData)>,
    alpha: Option<(&'a str, &'a TensorData)>,
}

/// The deltas `file` makes at `strength` in a model whose parameters are `params`
/// ([`chitu_store::param_table`]). Strict unless `partial`: a key that matches no parameter, or
/// does not fit it, fails the whole LoRA with every such key listed.
pub fn lora_deltas(
    file: &LoraFile,
    strength: f32,
    params: &BTreeMap<String, ParamInfo>,
    partial: bool,
) -> Result<LoraDeltas, LoraError> {
    let path = file.path.clone();
    if !strength.is_finite() {
        return Err(LoraError::Strength { path, strength });
    }
    let names = Names::new().map_err(|source| LoraError::Read {
        path: path.clone(),
        source: Box::new(source),
    })?;
    let mut out = LoraDeltas::default();
    let mut problems = Vec::new();
    // Low-rank pieces by module path, gathered before they can be checked as pairs.
    let mut pairs: BTreeMap<String, Pieces> = BTreeMap::new();
    for (key, data) in &file.tensors {
        let Some((body, part)) = PARTS
            .iter()
            .find_map(|(end, part)| key.strip_suffix(end).map(|b| (b, *part)))
        else {
            problems.push(format!(
                "{key}: not a key chitu reads (lora_down/lora_up, lora_A/lora_B, alpha, diff, diff_b)"
            ));
            continue;
        };
        let (name, underscored) = PREFIXES
            .iter()
            .find_map(|(p, u)| body.strip_prefix(p).map(|n| (n, *u)))
            .unwrap_or((body, false));
        if matches!(part, Part::Diff | Part::DiffBias) && key.contains("norm") {
            out.ignored.push(key.clone());
            continue;
        }
        let suffixes: &[&str] = match part {
            Part::DiffBias => &["bias"],
            Part::Diff => &["weight", ""],
            _ => &["weight"],
        };
        let targets = names.targets(name, underscored, suffixes, params);
        let target = match targets.len() {
            1 => targets.into_iter().next().unwrap_or_else(|| unreachable!("one target")),
            0 => {
                let wanted = names.path_of(&format!("{name}.{}", suffixes[0]));
                problems.push(format!("{key}: the model has no {wanted}"));
                continue;
            }
            _ => {
                let all: Vec<String> = targets.into_iter().collect();
                problems.push(format!("{key}: ambiguous, it could mean any of {}", all.join(", ")));
                continue;
            }
        };
        let info = &params[&target];
        match part {
            Part::Diff | Part::DiffBias => {
                let want = info.stored_shape();
                if data.shape.to_vec() != want {
                    problems.push(format!(
                        "{key}: shape {:?}, the model's {target} is {want:?}",
                        data.shape.to_vec()
                    ));
                    continue;
                }
                out.deltas.entry(target).or_default().push(Term {
                    delta: Delta::Full(data.clone()),
                    scale: strength,
                });
                out.applied += 1;
            }
            Part::Down | Part::Up | Part::Alpha => {
                if !info.linear {
                    problems.push(format!("{key}: the model's {target} is not a linear layer's weight"));
                    continue;
                }
                let pieces = pairs.entry(target).or_default();
                let slot = match part {
                    Part::Down => &mut pieces.down,
                    Part::Up => &mut pieces.up,
                    _ => &mut pieces.alpha,
                };
                *slot = Some((key.as_str(), data));
            }
        }
    }
    for (target, pieces) in pairs {
        let info = &params[&target];
        match low_rank(&target, info, &pieces, strength) {
            Ok(term) => {
                out.applied += 2 + usize::from(pieces.alpha.is_some());
                out.deltas.entry(target).or_default().push(term);
            }
            Err(problem) => problems.push(problem),
        }
    }
    if !problems.is_empty() && !partial {
        return Err(LoraError::Mismatch { path, problems });
    }
    out.skipped = problems;
    if out.deltas.is_empty() {
        return Err(LoraError::Empty {
            path,
            skipped: out.skipped.len(),
        });
    }
    Ok(out)
}

/// The low-rank term of one module, or the line saying why its pieces do not fit.
fn low_rank(target: &str, info: &ParamInfo, pieces: &Pieces, strength: f32) -> Result<Term, String> {
    let [out_dim, in_dim] = info.stored_shape()[..] else {
        return Err(format!("{target}: not a matrix"));
    };
    let (Some((down_key, down)), Some((up_key, up))) = (pieces.down, pieces.up) else {
        let (have, lacks) = match (pieces.down, pieces.up) {
            (Some((k, _)), None) => (k, "its up (lora_up / lora_B) matrix"),
            (None, Some((k, _))) => (k, "its down (lora_down / lora_A) matrix"),
            _ => (pieces.alpha.map_or(target, |(k, _)| k), "both of its matrices"),
        };
        return Err(format!("{have}: the file lacks {lacks}"));
    };
    let (d, u) = (down.shape.to_vec(), up.shape.to_vec());
    let rank = d.first().copied().unwrap_or(0);
    if d.len() != 2 || d[1] != in_dim || rank == 0 {
        return Err(format!(
            "{down_key}: shape {d:?}, the model's {target} takes [rank, {in_dim}]"
        ));
    }
    if u != [out_dim, rank] {
        return Err(format!(
            "{up_key}: shape {u:?}, the model's {target} with rank {rank} takes [{out_dim}, {rank}]"
        ));
    }
    let alpha = match pieces.alpha {
        None => rank as f32,
        Some((key, a)) => match a.clone().convert_dtype(DType::F32).as_slice::<f32>() {
            Ok([v]) => *v,
            _ => {
                return Err(format!(
                    "{key}: alpha must be one number, got shape {:?}",
                    a.shape.to_vec()
                ))
            }
        },
    };
    Ok(Term {
        delta: Delta::LowRank {
            down: down.clone(),
            up: up.clone(),
        },
        scale: strength * alpha / rank as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscored_names_are_read_every_way() {
        let all = dotted_spellings("a_b_c");
        assert_eq!(all.len(), 4);
        assert!(all.contains(&"a.b.c".to_string()) && all.contains(&"a_b_c".to_string()));
    }

    #[test]
    fn both_layouts_name_the_same_module() {
        let names = Names::new().unwrap();
        let wan = names.path_of("blocks.3.self_attn.o.weight");
        let diffusers = names.path_of("blocks.3.attn1.to_out.0.weight");
        assert_eq!(wan, "blocks.3.attn1.to_out.0.weight");
        assert_eq!(wan, diffusers);
        assert_eq!(names.path_of("blocks.0.ffn.0.bias"), "blocks.0.ffn.fc1.bias");
        assert_eq!(names.path_of("blocks.0.ffn.net.0.proj.bias"), "blocks.0.ffn.fc1.bias");
        assert_eq!(names.path_of("head.head.weight"), "proj_out.weight");
        assert_eq!(
            names.path_of("time_projection.1.weight"),
            "condition_embedder.time_proj.weight"
        );
    }
}
