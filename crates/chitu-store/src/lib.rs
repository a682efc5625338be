//! Strict checkpoint loading shared by chitu's model crates.
//!
//! A model crate names its modules after one checkpoint layout and gives one remap table (regex →
//! replacement, applied in order) per other layout. [`load_strict`] reads one safetensors file,
//! the shards a `*.safetensors.index.json` lists, or a PyTorch `.pth`/`.pt` pickle, casts float
//! weights to f32 tensor by tensor as they are read, drops enum variant names from module paths
//! (PyTorch has none), and fails with the offending keys listed when anything is missing, unexpected
//! or of the wrong shape: a checkpoint never loads half-way.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::DType;
use burn_store::{
    ApplyResult, KeyRemapper, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    TensorSnapshot,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;

mod file;
mod host;
mod rows;
pub use host::{is_host_backend, is_host_f32, HostF32, HostWeights};
pub use rows::FileRows;

/// Why a checkpoint could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The checkpoint does not fit the model, or a file is malformed.
    #[error("{0}")]
    Mismatch(String),
}

/// Reads a JSON file (a `config.json`, an index); both failures name the file.
pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io(path.display().to_string(), e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::Mismatch(format!("{}: invalid JSON: {e}", path.display())))
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
            .ok_or_else(|| LoadError::Mismatch(format!("{}: no weight_map object", index.display())))?;
        let names: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = names.into_iter().map(|n| dir.join(n)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(LoadError::Mismatch(format!(
                "{} lists shard {} which does not exist",
                index.display(),
                missing.display()
            )));
        }
        return Ok(files);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(LoadError::Mismatch(format!(
            "no weights in {}: expected {stem}.safetensors or {stem}.safetensors.index.json",
            dir.display()
        )))
    }
}

/// Whether `path` is a PyTorch pickle (`.pth`, `.pt`, `.bin`) rather than safetensors.
pub(crate) fn is_pickle(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("pth" | "pt" | "bin"))
}

/// A remap table (regex, replacement) as burn-store's remapper.
pub(crate) fn remapper(remap: &[(impl AsRef<str>, impl AsRef<str>)]) -> Result<KeyRemapper, LoadError> {
    let pairs: Vec<(&str, &str)> = remap.iter().map(|(a, b)| (a.as_ref(), b.as_ref())).collect();
    KeyRemapper::from_patterns(pairs).map_err(|e| LoadError::Mismatch(format!("bad remap table: {e}")))
}

/// Casts float snapshots to one dtype as they are read (bf16 checkpoints into an f32 model).
#[derive(Clone)]
struct CastFloats(DType);

impl ModuleAdapter for CastFloats {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let target = self.0;
        let is_float = matches!(snapshot.dtype, DType::F64 | DType::F32 | DType::F16 | DType::BF16);
        if !is_float || snapshot.dtype == target {
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
/// checkpoint tensor must be used; `label` names the layout in errors.
pub fn load_strict<B: Backend, M: Module<B>>(
    module: M,
    files: &[PathBuf],
    remap: &[(impl AsRef<str>, impl AsRef<str>)],
    label: &str,
) -> Result<(M, LoadReport), LoadError> {
    load_strict_leaving(module, files, remap, label, &[])
}

/// [`load_strict`], except that checkpoint tensors remapped to one of the module paths in `left`
/// are neither read nor reported as unexpected: the caller reads them some other way (a table
/// kept in its file, [`FileRows`]).
pub fn load_strict_leaving<B: Backend, M: Module<B>>(
    module: M,
    files: &[PathBuf],
    remap: &[(impl AsRef<str>, impl AsRef<str>)],
    label: &str,
    left: &[&str],
) -> Result<(M, LoadReport), LoadError> {
    let remapper = remapper(remap)?;
    let mut module = module;
    // A tensor is missing when no file supplied it; burn-store reports misses per file, in the
    // module's own path spelling (which, unlike checkpoint keys, includes enum variant names).
    let mut missing: Option<BTreeSet<String>> = None;
    let mut applied = BTreeSet::new();
    let (mut unused, mut errors) = (Vec::new(), Vec::new());
    for file in files {
        if !file.exists() {
            return Err(LoadError::Mismatch(format!(
                "weight file {} does not exist",
                file.display()
            )));
        }
        let mut snapshots: Vec<TensorSnapshot> = if is_pickle(file) {
            // The store's snapshots, applied with the f32 cast like safetensors: its own
            // `load_from` fills the module in the stored dtype, and casting afterwards held the
            // bf16 and the f32 model at once.
            let mut store = PytorchStore::from_file(file).remap(remapper.clone());
            let all = store
                .get_all_snapshots()
                .map_err(|e| LoadError::Mismatch(format!("{}: {e}", file.display())))?;
            all.values().cloned().collect()
        } else {
            // Not burn-store's SafetensorsStore: it maps the file, and every page read stays
            // resident until the load ends, doubling the peak memory (see `file.rs`).
            remapper.remap(file::snapshots(file)?).0
        };
        snapshots.retain(|s| !left.contains(&s.full_path().as_str()));
        let adapter = PyTorchToBurnAdapter.chain(CastFloats(DType::F32));
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
        errors.extend(result.errors.iter().map(|e| format!("{e:?}")));
    }
    let missing: Vec<String> = missing.unwrap_or_default().into_iter().collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("missing keys: {}", list(&missing)));
    }
    if !unused.is_empty() {
        problems.push(format!("unexpected keys: {}", list(&unused)));
    }
    if !errors.is_empty() {
        problems.push(format!("bad tensors: {}", list(&errors)));
    }
    if !problems.is_empty() {
        return Err(LoadError::Mismatch(format!(
            "{label} checkpoint: {}",
            problems.join("; ")
        )));
    }
    let report = LoadReport {
        applied: applied.len(),
        files: files.to_vec(),
    };
    Ok((module, report))
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
