//! Strict checkpoint loading shared by chitu's model crates.
//!
//! A model crate names its modules after one checkpoint layout and gives one remap table (regex →
//! replacement, applied in order) per other layout. [`load_strict`] reads one safetensors file,
//! the shards a `*.safetensors.index.json` lists, or a PyTorch `.pth`/`.pt` pickle, casts float
//! weights to the load's [`Precision`] (f32 unless asked otherwise) tensor by tensor as they are
//! read, so that a bf16 file never passes through a whole f32 copy, drops enum variant names from module paths
//! (PyTorch has none), and fails with the offending keys listed when anything is missing, unexpected
//! or of the wrong shape: a checkpoint never loads half-way.

#![warn(missing_docs)]

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_store::{
    ApplyError, ApplyResult, KeyRemapper, ModuleAdapter, ModuleSnapshot, ModuleStore, PytorchStore, TensorSnapshot,
};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

mod delta;
mod file;
mod fp8;
mod layout;
mod precision;
mod quant;
mod rows;
pub use delta::{merge_deltas, param_table, read_tensors, restore_base, BaseWeights, Delta, DeltaSet, ParamInfo, Term};
pub use precision::{cast_module, held_bytes, Cast, Format, Precision, UnknownPrecision};
pub use quant::{block_for, int8_bytes, int8_scheme, quantize_int8, tensor_bytes, UnknownWeights, Weights, INT8_BLOCK};
pub use rows::FileRows;

/// Why a checkpoint could not be loaded. Every variant names the file or the keys at fault, so a
/// caller can match on, say, a missing key.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (a config, a shard index) is not valid JSON.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A file is malformed: a bad safetensors header, an index without a weight map, a tensor of
    /// an unusable dtype or rank.
    #[error("{}: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A folder has no weight file of the expected name.
    #[error("no weights in {}: expected {stem}.safetensors or {stem}.safetensors.index.json", dir.display())]
    NoWeights {
        /// The folder.
        dir: PathBuf,
        /// The file stem looked for.
        stem: String,
    },
    /// The module needs tensors that no checkpoint file has (and maybe the files have others).
    #[error("{label} checkpoint: missing keys: {}{}", list(keys), also_unexpected(unexpected))]
    MissingKeys {
        /// The checkpoint layout.
        label: String,
        /// The module paths no file supplied.
        keys: Vec<String>,
        /// Checkpoint keys that matched no module tensor, with their file.
        unexpected: Vec<String>,
    },
    /// The checkpoint has tensors that match no module tensor.
    #[error("{label} checkpoint: unexpected keys: {}", list(keys))]
    UnexpectedKeys {
        /// The checkpoint layout.
        label: String,
        /// The unmatched keys, with their file.
        keys: Vec<String>,
    },
    /// A tensor's shape does not fit the module.
    #[error("checkpoint {}: bad tensors: {key}{} has shape {got:?}, the model expects {expected:?}", file.display(), also_module(key, module))]
    Shape {
        /// The file that holds the tensor.
        file: PathBuf,
        /// The tensor's key in the file.
        key: String,
        /// The model's name for it (the module path the key maps to).
        module: String,
        /// The shape the model needs, as the file would store it.
        expected: Box<[usize]>,
        /// The shape the file stores.
        got: Box<[usize]>,
    },
    /// Tensors that could not be applied for another reason (read errors, duplicates across
    /// shards).
    #[error("{label} checkpoint: bad tensors: {}", list(errors))]
    BadTensors {
        /// The checkpoint layout.
        label: String,
        /// One line per tensor.
        errors: Vec<String>,
    },
    /// A remap table is not a valid list of regexes.
    #[error("bad remap table: {0}")]
    Remap(String),
}

fn also_module(key: &str, module: &str) -> String {
    match key == module {
        true => String::new(),
        false => format!(" (the model's {module})"),
    }
}

fn also_unexpected(keys: &[String]) -> String {
    match keys.is_empty() {
        true => String::new(),
        false => format!("; unexpected keys: {}", list(keys)),
    }
}

impl LoadError {
    /// A [`LoadError::Io`] for `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A [`LoadError::Malformed`] for `path`.
    pub fn malformed(path: &Path, message: impl Into<String>) -> Self {
        Self::Malformed {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// Reads a JSON file (a `config.json`, an index); both failures name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// The weight files of a model folder: the shards named by `<stem>.safetensors.index.json` if it
/// exists, else `<stem>.safetensors`.
pub fn weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, LoadError> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.exists() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::malformed(&index, "no weight_map object"))?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        // A model folder is untrusted input: a shard is a plain file name inside it, never a
        // path that climbs out (`../../etc/passwd`) or starts elsewhere.
        if let Some(bad) = names.iter().find(|n| {
            let p = Path::new(n);
            p.components().count() != 1 || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        }) {
            return Err(LoadError::malformed(
                &index,
                format!("shard {bad:?} is not a file name inside the model folder"),
            ));
        }
        let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(LoadError::malformed(
                &index,
                format!("lists shard {} which does not exist", missing.display()),
            ));
        }
        return Ok(files);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(LoadError::NoWeights {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
        })
    }
}

/// A file's snapshots under their new names, and `(new name, file's name)` pairs.
type Remapped = (Vec<TensorSnapshot>, Vec<(String, String)>);

/// The lazy snapshots of one weight file with their keys renamed by `remapper`, and (for
/// safetensors) each new name with the file's own, for errors in the file's terms.
/// `.pth`/`.pt` files go through burn-store's PyTorch reader, everything else through ours.
fn remapped_snapshots(file: &Path, remapper: &KeyRemapper) -> Result<Remapped, LoadError> {
    if is_pickle(file) {
        // The store's snapshots, applied with the load's cast like safetensors: its own
        // `load_from` fills the module in the stored dtype, and casting afterwards held the
        // bf16 and the f32 model at once.
        let mut store = PytorchStore::from_file(file).remap(remapper.clone());
        let all = store
            .get_all_snapshots()
            .map_err(|e| LoadError::malformed(file, e.to_string()))?;
        return Ok((all.values().cloned().collect(), Vec::new()));
    }
    // Not burn-store's SafetensorsStore: it maps the file, and every page read stays resident
    // until the load ends, doubling the peak memory (see `file.rs`).
    Ok(remapper.remap(file::snapshots(file)?))
}

/// Whether `path` is a PyTorch pickle (`.pth`, `.pt`, `.bin`) rather than safetensors.
pub(crate) fn is_pickle(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("pth" | "pt" | "bin"))
}

/// A remap table (regex, replacement) as burn-store's remapper.
pub(crate) fn remapper(remap: &[(impl AsRef<str>, impl AsRef<str>)]) -> Result<KeyRemapper, LoadError> {
    let pairs: Vec<(&str, &str)> = remap.iter().map(|(a, b)| (a.as_ref(), b.as_ref())).collect();
    KeyRemapper::from_patterns(pairs).map_err(|e| LoadError::Remap(e.to_string()))
}

/// A remap table compiled once, for renaming keys that do not come from a checkpoint being
/// loaded (an adapter's keys, say), with the same rules the loader applies.
pub struct KeyMap(Vec<(regex::Regex, String)>);

impl KeyMap {
    /// Compiles `remap` (regex, replacement; applied in order).
    pub fn new(remap: &[(impl AsRef<str>, impl AsRef<str>)]) -> Result<Self, LoadError> {
        Ok(Self(remapper(remap)?.to_regex_pairs()))
    }

    /// `key` after every pattern that matches it, in order, as burn-store's remapper renames a
    /// checkpoint's keys.
    pub fn apply(&self, key: &str) -> String {
        let mut key = key.to_string();
        for (pattern, replacement) in &self.0 {
            if pattern.is_match(&key) {
                key = pattern.replace_all(&key, replacement.as_str()).to_string();
            }
        }
        key
    }
}

/// Casts float snapshots to the dtype a [`Cast`] gives their module path, as they are read.
#[derive(Clone)]
struct CastFloats(Cast);

impl ModuleAdapter for CastFloats {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let path = snapshot.full_path();
        let linear = snapshot.container_type() == precision::LINEAR && path.ends_with(".weight");
        let block = self.0.int8_block(&path, &snapshot.shape).filter(|_| linear);
        if let (Some(block), true) = (block, is_float(snapshot.dtype)) {
            let data = snapshot.clone_data_fn();
            let quantize = move || {
                let data = data()?;
                quant::quantize_int8(&data, block).ok_or_else(|| {
                    burn_store::TensorSnapshotError::DataError(format!(
                        "cannot quantize a {:?} tensor of shape {:?}",
                        data.dtype, data.shape
                    ))
                })
            };
            return TensorSnapshot::from_closure(
                Rc::new(quantize),
                DType::QFloat(quant::int8_scheme(block)),
                snapshot.shape.clone(),
                snapshot.path_stack.clone().unwrap_or_default(),
                snapshot.container_stack.clone().unwrap_or_default(),
                snapshot.tensor_id.unwrap_or_default(),
            );
        }
        let target = self.0.dtype_of(&path, snapshot.shape.num_dims());
        if !is_float(snapshot.dtype) || snapshot.dtype == target {
            return snapshot.clone();
        }
        let data = snapshot.clone_data_fn();
        TensorSnapshot::from_closure(
            Rc::new(move || Ok(data()?.convert_dtype(target))),
            target,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
}

/// What a load applied.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors loaded.
    pub applied: usize,
    /// Files read.
    pub files: Vec<PathBuf>,
}

/// Loads `files` into `module`, renaming checkpoint keys with `remap` (regex, replacement) pairs.
/// `.pth`/`.pt` files go through burn-store's PyTorch reader, everything else through its
/// safetensors reader. Every module tensor must be found once with the right shape and every
/// checkpoint tensor must be used; `label` names the layout in errors. Every tensor is held in f32.
pub fn load_strict<B: Backend, M: Module<B>>(
    module: M,
    files: &[PathBuf],
    remap: &[(impl AsRef<str>, impl AsRef<str>)],
    label: &str,
) -> Result<(M, LoadReport), LoadError> {
    load_strict_leaving(module, files, remap, label, &[], Cast::F32)
}

/// [`load_strict`], holding each tensor in the dtype `cast` gives it.
pub fn load_strict_as<B: Backend, M: Module<B>>(
    module: M,
    files: &[PathBuf],
    remap: &[(impl AsRef<str>, impl AsRef<str>)],
    label: &str,
    cast: Cast,
) -> Result<(M, LoadReport), LoadError> {
    load_strict_leaving(module, files, remap, label, &[], cast)
}

/// [`load_strict_as`], except that checkpoint tensors remapped to one of the module paths in
/// `left` are neither read nor reported as unexpected: the caller reads them some other way (a
/// table kept in its file, [`FileRows`]).
pub fn load_strict_leaving<B: Backend, M: Module<B>>(
    module: M,
    files: &[PathBuf],
    remap: &[(impl AsRef<str>, impl AsRef<str>)],
    label: &str,
    left: &[&str],
    cast: Cast,
) -> Result<(M, LoadReport), LoadError> {
    let remapper = remapper(remap)?;
    let mut module = module;
    // A tensor is missing when no file supplied it; burn-store reports misses per file, in the
    // module's own path spelling (which, unlike checkpoint keys, includes enum variant names).
    let mut missing: Option<BTreeSet<String>> = None;
    let mut applied = BTreeSet::new();
    let (mut unused, mut errors, mut shapes) = (Vec::new(), Vec::new(), Vec::new());
    for file in files {
        if !file.exists() {
            return Err(LoadError::io(
                file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "weight file does not exist"),
            ));
        }
        let (mut snapshots, names) = remapped_snapshots(file, &remapper)?;
        // How the file stores each tensor, by module path: for errors in the file's own terms.
        let original: HashMap<String, String> = names.into_iter().collect();
        let stored: HashMap<String, (String, Vec<usize>)> = snapshots
            .iter()
            .map(|s| {
                let path = s.full_path();
                let key = original.get(&path).cloned().unwrap_or_else(|| path.clone());
                (path, (key, s.shape.to_vec()))
            })
            .collect();
        snapshots.retain(|s| !left.contains(&s.full_path().as_str()));
        // Every module tensor is a float weight: an integer or boolean tensor cannot become one,
        // and applying it anyway would leave a weight of the wrong kind.
        if let Some(s) = snapshots.iter().find(|s| !is_float(s.dtype)) {
            let key = stored
                .get(&s.full_path())
                .map_or_else(|| s.full_path(), |(k, _)| k.clone());
            return Err(LoadError::malformed(
                file,
                format!(
                    "tensor {key} is stored as {:?}, which cannot be converted to a float weight",
                    s.dtype
                ),
            ));
        }
        let adapter = layout::PyTorchLayout.chain(CastFloats(cast));
        let result: ApplyResult = module.apply(snapshots, None, Some(Box::new(adapter)), true);
        let file_missing: BTreeSet<String> = result.missing.iter().map(|(path, _)| path.clone()).collect();
        missing = Some(match missing {
            None => file_missing,
            Some(m) => m.intersection(&file_missing).cloned().collect(),
        });
        for key in result.applied {
            if !applied.insert(key.clone()) {
                errors.push(format!("{key} appears in more than one shard"));
            }
        }
        unused.extend(
            result
                .unused
                .into_iter()
                .map(|k| format!("{k} (in {})", file.display())),
        );
        for e in result.errors {
            match e {
                ApplyError::ShapeMismatch { path, expected, found } => {
                    let (expected, found) = (expected.to_vec(), found.to_vec());
                    let (key, got) = stored.get(&path).cloned().unwrap_or((path.clone(), found.clone()));
                    // burn's layout transposes linear weights; say what the file should hold.
                    let transposed = found != got && found.iter().rev().eq(got.iter());
                    let expected = match transposed {
                        true => expected.into_iter().rev().collect(),
                        false => expected,
                    };
                    shapes.push((file.clone(), key, path, expected, got))
                }
                other => errors.push(format!("{other:?}")),
            }
        }
    }
    let label = label.to_string();
    let keys: Vec<String> = missing.unwrap_or_default().into_iter().collect();
    if !keys.is_empty() {
        return Err(LoadError::MissingKeys {
            label,
            keys,
            unexpected: unused,
        });
    }
    if !unused.is_empty() {
        return Err(LoadError::UnexpectedKeys { label, keys: unused });
    }
    if let Some((file, key, module, expected, got)) = shapes.into_iter().next() {
        return Err(LoadError::Shape {
            file,
            key,
            module,
            expected: expected.into(),
            got: got.into(),
        });
    }
    if !errors.is_empty() {
        return Err(LoadError::BadTensors { label, errors });
    }
    let report = LoadReport {
        applied: applied.len(),
        files: files.to_vec(),
    };
    Ok((module, report))
}

/// Reads the tensors at module paths `only` again from `files` into `module`, as
/// [`load_strict_as`] would (same remap, layout and cast), leaving every other tensor as it is:
/// how a merge into loaded weights (a LoRA) is undone without reloading the whole model. Each
/// path must be found once, with its shape.
pub fn reload_tensors_as<B: Backend, M: Module<B>>(
    module: M,
    files: &[PathBuf],
    remap: &[(impl AsRef<str>, impl AsRef<str>)],
    label: &str,
    cast: Cast,
    only: &BTreeSet<String>,
) -> Result<M, LoadError> {
    let remapper = remapper(remap)?;
    let mut module = module;
    let mut found = BTreeSet::new();
    let mut errors = Vec::new();
    for file in files {
        let (mut snapshots, _) = remapped_snapshots(file, &remapper)?;
        snapshots.retain(|s| only.contains(&s.full_path()));
        if snapshots.is_empty() {
            continue;
        }
        let adapter = layout::PyTorchLayout.chain(CastFloats(cast));
        let result: ApplyResult = module.apply(snapshots, None, Some(Box::new(adapter)), true);
        found.extend(result.applied);
        errors.extend(result.errors.into_iter().map(|e| format!("{e:?}")));
    }
    let keys: Vec<String> = only.difference(&found).cloned().collect();
    if !keys.is_empty() {
        return Err(LoadError::MissingKeys {
            label: label.to_string(),
            keys,
            unexpected: Vec::new(),
        });
    }
    if !errors.is_empty() {
        return Err(LoadError::BadTensors {
            label: label.to_string(),
            errors,
        });
    }
    Ok(module)
}

/// Joins at most a dozen items, then says how many more there were.
fn list<T: std::fmt::Display>(items: &[T]) -> String {
    const SHOWN: usize = 12;
    let mut s: Vec<String> = items.iter().take(SHOWN).map(|i| i.to_string()).collect();
    if items.len() > SHOWN {
        s.push(format!("... and {} more", items.len() - SHOWN));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder_with_index(weight_map: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let index = serde_json::json!({ "weight_map": weight_map });
        std::fs::write(dir.path().join("m.safetensors.index.json"), index.to_string()).unwrap();
        std::fs::write(dir.path().join("m-1.safetensors"), b"").unwrap();
        dir
    }

    #[test]
    fn shards_must_stay_inside_the_model_folder() {
        for bad in [
            "../../../../etc/passwd",
            "/etc/passwd",
            "sub/../../m-1.safetensors",
            "..",
        ] {
            let dir = folder_with_index(serde_json::json!({ "a.weight": "m-1.safetensors", "b.weight": bad }));
            let e = weight_files(dir.path(), "m").unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("inside the model folder"), "{bad}: {e}");
        }
        let dir = folder_with_index(serde_json::json!({ "a.weight": "m-1.safetensors" }));
        assert_eq!(
            weight_files(dir.path(), "m").unwrap(),
            vec![dir.path().join("m-1.safetensors")]
        );
    }
}
