//! Models that leave the device between uses (`--low-mem` 2 and 3).
//!
//! An [`Offloaded`] model is resident on the device, parked as host tensors, or released
//! altogether. Using it brings it back; the generator parks it again when the request's memory
//! level says so. Only one copy exists at a time (the tensors move, they are not duplicated).
//!
//! On a CPU backend the device *is* host memory, so parking would save nothing. There a model
//! that knows its files ([`Offloaded::reloadable`]) is released instead: dropped, and read again
//! from its files when it is next used. The files' pages stay in the OS page cache, which RSS
//! does not count, so the reload costs a read from memory, not from disk, while memory allows.

use crate::{GenError, HostWeights};
use burn::tensor::backend::Backend;
use chitu_dit::{WanDitConfig, WanTransformer};
use chitu_store::FileRows;
use chitu_text::{T5Tokenizer, TextEncoder, Umt5Config, Umt5Encoder};
use std::sync::{Arc, Mutex, MutexGuard};

/// Why a model could not move between the device and host memory.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    /// A tensor could not be read off the device.
    #[error("{tensor}: cannot copy to the host: {message}")]
    ToHost {
        /// The tensor's module path.
        tensor: String,
        /// The backend's message.
        message: String,
    },
    /// The parked tensors do not fit the rebuilt model.
    #[error("parked weights do not fit the module: {0}")]
    Mismatch(String),
    /// The model's skeleton could not be rebuilt on the device.
    #[error("rebuilding the model: {0}")]
    Rebuild(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An earlier move back failed half-way, and the model is gone.
    #[error("{0}; the model is gone, reload the backend")]
    Lost(String),
}

/// A model whose tensors can move to host memory and back.
pub trait Offload<B: Backend>: Sized + Send {
    /// What rebuilds the model around its tensors (its config, a tokenizer); kept on the host.
    type Shell: Send + Sync;
    /// The shell of this model.
    fn shell(&self) -> Self::Shell;
    /// Copies the model's tensors to the host.
    fn to_host(&self) -> Result<HostWeights, OffloadError>;
    /// Rebuilds the model on `device` from its shell and parked tensors.
    fn from_host(shell: &Self::Shell, host: HostWeights, device: &B::Device) -> Result<Self, OffloadError>;
    /// Bytes of the model's weights while it is resident.
    fn weight_bytes(&self) -> u64;
}

impl<B: Backend> Offload<B> for WanTransformer<B> {
    type Shell = WanDitConfig;

    fn shell(&self) -> WanDitConfig {
        self.config.clone()
    }

    fn to_host(&self) -> Result<HostWeights, OffloadError> {
        HostWeights::from_module(self)
    }

    fn from_host(shell: &WanDitConfig, host: HostWeights, device: &B::Device) -> Result<Self, OffloadError> {
        let skeleton = WanTransformer::new(shell.clone(), device).map_err(|e| OffloadError::Rebuild(e.into()))?;
        host.into_module(skeleton)
    }

    fn weight_bytes(&self) -> u64 {
        crate::estimate::module_bytes(self)
    }
}

/// A token table read from its file stays there; only the device tensors are parked.
impl<B: Backend> Offload<B> for TextEncoder<B> {
    type Shell = (T5Tokenizer, Umt5Config, Option<Arc<FileRows>>);

    fn shell(&self) -> Self::Shell {
        let encoder = &self.encoder;
        (
            self.tokenizer.clone(),
            encoder.config.clone(),
            encoder.token_rows.clone(),
        )
    }

    fn to_host(&self) -> Result<HostWeights, OffloadError> {
        HostWeights::from_module(&self.encoder)
    }

    fn from_host(
        (tokenizer, config, rows): &Self::Shell,
        host: HostWeights,
        device: &B::Device,
    ) -> Result<Self, OffloadError> {
        let mut skeleton = Umt5Encoder::new(config.clone(), device).map_err(|e| OffloadError::Rebuild(e.into()))?;
        if rows.is_some() {
            skeleton.token_embedding = None;
            skeleton.token_rows = rows.clone();
        }
        let encoder = host.into_module(skeleton)?;
        Ok(TextEncoder::new(tokenizer.clone(), encoder, device.clone()))
    }

    fn weight_bytes(&self) -> u64 {
        crate::estimate::module_bytes(&self.encoder)
    }
}

enum Slot<M> {
    Resident(M),
    Parked(HostWeights),
    /// Dropped; the reload source brings it back.
    Released,
    /// A move failed half-way (the device ran out of memory while the tensors came back).
    Lost(OffloadError),
}

/// Loads a model again from its files, on a device.
pub type Reload<B, M> = Arc<dyn Fn(&burn::tensor::Device<B>) -> Result<M, GenError> + Send + Sync>;

/// What a model reloaded from its files goes through before use, to be the model it was (the
/// LoRAs merged into it).
pub type Patch<M> = Arc<dyn Fn(M) -> M + Send + Sync>;

/// A model on the device, or parked in host memory, or released, until it is next used.
pub struct Offloaded<B: Backend, M: Offload<B>> {
    name: String,
    slot: Mutex<Slot<M>>,
    shell: M::Shell,
    device: B::Device,
    reload: Option<Reload<B, M>>,
    after_reload: Mutex<Option<Patch<M>>>,
    weight_bytes: u64,
}

impl<B: Backend, M: Offload<B>> Offloaded<B, M> {
    /// Wraps a model that is on `device`; `name` labels it in errors.
    pub fn new(name: impl Into<String>, model: M, device: &B::Device) -> Self {
        Self {
            name: name.into(),
            shell: model.shell(),
            weight_bytes: model.weight_bytes(),
            slot: Mutex::new(Slot::Resident(model)),
            device: device.clone(),
            reload: None,
            after_reload: Mutex::new(None),
        }
    }

    /// Whether the model can be released and read again from its files.
    pub fn is_reloadable(&self) -> bool {
        self.reload.is_some()
    }

    /// Changes the model where it is: now, when it is resident or parked (brought back for it
    /// and parked again after), and not at all while it is released, since `after_reload`
    /// (which replaces the previous one) then makes the change when it is read again. Returns
    /// whether `f` ran. When `f` fails, a reloadable model is released (its next use reads it
    /// again from its files, through `after_reload`); any other is lost.
    pub fn modify(
        &self,
        f: impl FnOnce(M) -> Result<M, GenError>,
        after_reload: Option<Patch<M>>,
    ) -> Result<bool, GenError> {
        let mut slot = self.lock();
        *self.after_reload.lock().unwrap_or_else(|p| p.into_inner()) = after_reload;
        let unfinished = || Slot::Lost(OffloadError::Lost("a change to the model did not finish".into()));
        let (model, parked) = match std::mem::replace(&mut *slot, unfinished()) {
            Slot::Resident(m) => (m, false),
            Slot::Parked(host) => match M::from_host(&self.shell, host, &self.device) {
                Ok(m) => (m, true),
                Err(e) => {
                    *slot = Slot::Lost(e);
                    return Err(self.error(OffloadError::Lost("bringing it back to change it".into())));
                }
            },
            Slot::Released => {
                *slot = Slot::Released;
                return Ok(false);
            }
            Slot::Lost(e) => {
                let message = format!("changing it: {e}");
                *slot = Slot::Lost(e);
                return Err(self.error(OffloadError::Lost(message)));
            }
        };
        let model = match f(model) {
            Ok(m) => m,
            Err(e) => {
                if self.reload.is_some() {
                    *slot = Slot::Released;
                }
                return Err(e);
            }
        };
        *slot = match parked {
            false => Slot::Resident(model),
            true => Slot::Parked(model.to_host().map_err(|source| self.error(source))?),
        };
        Ok(true)
    }

    /// Lets the model be released (dropped) and loaded again by `reload` from its files, which
    /// must give the same weights.
    pub fn reloadable(mut self, reload: Reload<B, M>) -> Self {
        self.reload = Some(reload);
        self
    }

    /// Wraps a model that was just loaded on `device`, parking it at once when `park`, so that
    /// loading the next model never finds this one on the device.
    pub fn loaded(
        name: impl Into<String>,
        model: M,
        device: &B::Device,
        park: bool,
        reload: Reload<B, M>,
    ) -> Result<Self, GenError> {
        let slot = Self::new(name, model, device).reloadable(reload);
        if park {
            slot.park()?;
        }
        Ok(slot)
    }

    /// What rebuilds the model (its config), readable while it is parked.
    pub fn shell(&self) -> &M::Shell {
        &self.shell
    }

    /// Bytes of the model's weights while it is resident (known while it is away, too).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// The model's name in errors and logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, Slot<M>> {
        // A panic while the lock was held (a caught out-of-memory in a forward) leaves the
        // model itself intact: forwards do not mutate it.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, source: OffloadError) -> GenError {
        GenError::Offload {
            model: self.name.clone(),
            source,
        }
    }

    /// Whether the model is on the device now.
    pub fn is_resident(&self) -> bool {
        matches!(*self.lock(), Slot::Resident(_))
    }

    /// Host bytes held while parked (0 when resident or released).
    pub fn parked_bytes(&self) -> usize {
        match &*self.lock() {
            Slot::Parked(host) => host.bytes(),
            _ => 0,
        }
    }

    /// Whether the model is released: held nowhere, to be read again from its files.
    pub fn is_released(&self) -> bool {
        matches!(*self.lock(), Slot::Released)
    }

    /// Frees the model's device memory until it is next used: moves it to host memory or, on a
    /// CPU backend where that would save nothing, releases it when it can be reloaded. Parking
    /// a parked model does nothing.
    pub fn park(&self) -> Result<(), GenError> {
        match chitu_host::host_kernels::<B>() {
            true => self.release(),
            false => self.park_to_host(),
        }
    }

    /// Frees the model's memory on every backend: releases it when it can be reloaded from its
    /// files, and parks it in host memory otherwise. For a model not needed again soon (the
    /// text encoder once a one-request run has encoded its prompt).
    pub fn release(&self) -> Result<(), GenError> {
        if self.reload.is_none() {
            return self.park_to_host();
        }
        let mut slot = self.lock();
        if matches!(*slot, Slot::Resident(_) | Slot::Parked(_)) {
            tracing::debug!(model = %self.name, "released; reloads from its files when next used");
            *slot = Slot::Released;
        }
        Ok(())
    }

    fn park_to_host(&self) -> Result<(), GenError> {
        let mut slot = self.lock();
        if let Slot::Resident(model) = &*slot {
            let host = model.to_host().map_err(|source| self.error(source))?;
            tracing::debug!(model = %self.name, bytes = host.bytes(), "parked in host memory");
            *slot = Slot::Parked(host);
        }
        Ok(())
    }

    /// Runs `f` on the model, bringing it back to the device first if it is parked. It stays
    /// resident afterwards.
    pub fn with<R>(&self, f: impl FnOnce(&M) -> R) -> Result<R, GenError> {
        let mut slot = self.lock();
        if matches!(*slot, Slot::Released) {
            let reload = self
                .reload
                .as_ref()
                .unwrap_or_else(|| unreachable!("only a reloadable model is released"));
            tracing::debug!(model = %self.name, "reloading from its files");
            // A failed reload leaves it released: the next use tries again and says why.
            let mut model = reload(&self.device)?;
            let patch = self.after_reload.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(patch) = patch {
                model = patch(model);
            }
            *slot = Slot::Resident(model);
        }
        if matches!(*slot, Slot::Parked(_)) {
            // Marked lost during the move, so that a panic half-way (the device out of memory)
            // leaves a clear error for every later use instead of a half-built model.
            let unfinished = OffloadError::Lost("the move back to the device did not finish".into());
            let Slot::Parked(host) = std::mem::replace(&mut *slot, Slot::Lost(unfinished)) else {
                unreachable!("matched above")
            };
            *slot = match M::from_host(&self.shell, host, &self.device) {
                Ok(model) => Slot::Resident(model),
                Err(e) => Slot::Lost(e),
            };
        }
        match &*slot {
            Slot::Resident(model) => Ok(f(model)),
            Slot::Lost(e) => Err(self.error(OffloadError::Lost(format!("bringing it back to the device: {e}")))),
            Slot::Parked(_) | Slot::Released => unreachable!("restored above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn_flex::Flex;

    /// A model whose return to the device fails when its shell says so.
    #[derive(Module, Debug)]
    struct Toy<B: Backend> {
        fc: Linear<B>,
        #[module(skip)]
        fail: bool,
    }

    impl<B: Backend> Offload<B> for Toy<B> {
        type Shell = bool;
        fn shell(&self) -> bool {
            self.fail
        }
        fn to_host(&self) -> Result<HostWeights, OffloadError> {
            HostWeights::from_module(self)
        }
        fn from_host(fail: &bool, host: HostWeights, device: &B::Device) -> Result<Self, OffloadError> {
            if *fail {
                return Err(OffloadError::Rebuild("no room".into()));
            }
            let skeleton = Toy {
                fc: LinearConfig::new(3, 2).init(device),
                fail: false,
            };
            host.into_module(skeleton)
        }
        fn weight_bytes(&self) -> u64 {
            crate::estimate::module_bytes(self)
        }
    }

    fn toy(fail: bool) -> Offloaded<Flex, Toy<Flex>> {
        let dev = Default::default();
        let model = Toy {
            fc: LinearConfig::new(3, 2).init(&dev),
            fail,
        };
        Offloaded::new("toy", model, &dev)
    }

    #[test]
    fn a_parked_model_returns_with_its_weights() {
        let slot = toy(false);
        let before = slot.with(|m| m.fc.weight.val().into_data()).unwrap();
        slot.park().unwrap();
        slot.park().unwrap();
        assert!(!slot.is_resident());
        assert_eq!(slot.parked_bytes(), (3 * 2 + 2) * 4);
        let after = slot.with(|m| m.fc.weight.val().into_data()).unwrap();
        assert!(slot.is_resident());
        before.assert_eq(&after, true);
    }

    #[test]
    fn a_failed_return_is_an_error_every_time_after() {
        let slot = toy(true);
        slot.park().unwrap();
        for _ in 0..2 {
            let e = slot.with(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains("toy") && e.contains("no room") && e.contains("reload"),
                "{e}"
            );
        }
    }
}
