//! Models that leave the device between uses (`--low-mem` 2 and 3).
//!
//! An [`Offloaded`] model is either resident on the device or parked as host tensors. Using it
//! brings it back; the generator parks it again when the request's memory level says so. Only
//! one copy exists at a time (the tensors move, they are not duplicated), so on a CPU backend,
//! where the device is host memory, parking saves nothing and costs a copy: the levels are meant
//! for GPU backends.

use crate::GenError;
use burn::tensor::backend::Backend;
use chitu_dit::{WanDitConfig, WanTransformer};
use chitu_store::{FileRows, HostWeights};
use chitu_text::{T5Tokenizer, TextEncoder, Umt5Config, Umt5Encoder};
use std::sync::{Arc, Mutex, MutexGuard};

/// A model whose tensors can move to host memory and back.
pub trait Offload<B: Backend>: Sized + Send {
    /// What rebuilds the model around its tensors (its config, a tokenizer); kept on the host.
    type Shell: Send + Sync;
    /// The shell of this model.
    fn shell(&self) -> Self::Shell;
    /// Copies the model's tensors to the host.
    fn to_host(&self) -> Result<HostWeights, String>;
    /// Rebuilds the model on `device` from its shell and parked tensors.
    fn from_host(shell: &Self::Shell, host: HostWeights, device: &B::Device) -> Result<Self, String>;
}

impl<B: Backend> Offload<B> for WanTransformer<B> {
    type Shell = WanDitConfig;

    fn shell(&self) -> WanDitConfig {
        self.config.clone()
    }

    fn to_host(&self) -> Result<HostWeights, String> {
        HostWeights::from_module(self).map_err(|e| e.to_string())
    }

    fn from_host(shell: &WanDitConfig, host: HostWeights, device: &B::Device) -> Result<Self, String> {
        let skeleton = WanTransformer::new(shell.clone(), device).map_err(|e| e.to_string())?;
        host.into_module(skeleton).map_err(|e| e.to_string())
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

    fn to_host(&self) -> Result<HostWeights, String> {
        HostWeights::from_module(&self.encoder).map_err(|e| e.to_string())
    }

    fn from_host(
        (tokenizer, config, rows): &Self::Shell,
        host: HostWeights,
        device: &B::Device,
    ) -> Result<Self, String> {
        let mut skeleton = Umt5Encoder::new(config.clone(), device).map_err(|e| e.to_string())?;
        if rows.is_some() {
            skeleton.token_embedding = None;
            skeleton.token_rows = rows.clone();
        }
        let encoder = host.into_module(skeleton).map_err(|e| e.to_string())?;
        Ok(TextEncoder::new(tokenizer.clone(), encoder, device.clone()))
    }
}

/// Whether memory level `low_mem` keeps the text encoder in host memory between prompts.
pub(crate) fn parks_text(low_mem: u8) -> bool {
    low_mem >= 2
}

/// Whether memory level `low_mem` keeps every DiT but the active one in host memory.
pub(crate) fn parks_dits(low_mem: u8) -> bool {
    low_mem >= 3
}

enum Slot<M> {
    Resident(M),
    Parked(HostWeights),
    /// A move failed half-way (the device ran out of memory while the tensors came back).
    Lost(String),
}

/// A model on the device, or parked in host memory until it is next used.
pub struct Offloaded<B: Backend, M: Offload<B>> {
    name: String,
    slot: Mutex<Slot<M>>,
    shell: M::Shell,
    device: B::Device,
}

impl<B: Backend, M: Offload<B>> Offloaded<B, M> {
    /// Wraps a model that is on `device`; `name` labels it in errors.
    pub fn new(name: impl Into<String>, model: M, device: &B::Device) -> Self {
        Self {
            name: name.into(),
            shell: model.shell(),
            slot: Mutex::new(Slot::Resident(model)),
            device: device.clone(),
        }
    }

    /// Wraps a model that was just loaded on `device`, parking it at once when `park`, so that
    /// loading the next model never finds this one on the device.
    pub fn loaded(name: impl Into<String>, model: M, device: &B::Device, park: bool) -> Result<Self, GenError> {
        let slot = Self::new(name, model, device);
        if park {
            slot.park()?;
        }
        Ok(slot)
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

    /// Whether the model is on the device now.
    pub fn is_resident(&self) -> bool {
        matches!(*self.lock(), Slot::Resident(_))
    }

    /// Host bytes held while parked (0 when resident).
    pub fn parked_bytes(&self) -> usize {
        match &*self.lock() {
            Slot::Parked(host) => host.bytes(),
            _ => 0,
        }
    }

    /// Moves the model to host memory, freeing its device memory. Parking a parked model does
    /// nothing.
    pub fn park(&self) -> Result<(), GenError> {
        let mut slot = self.lock();
        if let Slot::Resident(model) = &*slot {
            let host = model
                .to_host()
                .map_err(|e| GenError::Stage(format!("parking the {} in host memory: {e}", self.name)))?;
            tracing::debug!(model = %self.name, bytes = host.bytes(), "parked in host memory");
            *slot = Slot::Parked(host);
        }
        Ok(())
    }

    /// Runs `f` on the model, bringing it back to the device first if it is parked. It stays
    /// resident afterwards.
    pub fn with<R>(&self, f: impl FnOnce(&M) -> R) -> Result<R, GenError> {
        let mut slot = self.lock();
        if matches!(*slot, Slot::Parked(_)) {
            let why = |e: &str| format!("bringing the {} back to the device: {e}", self.name);
            // Marked lost during the move, so that a panic half-way (the device out of memory)
            // leaves a clear error for every later use instead of a half-built model.
            let Slot::Parked(host) = std::mem::replace(&mut *slot, Slot::Lost(why("the move did not finish"))) else {
                unreachable!("matched above")
            };
            *slot = match M::from_host(&self.shell, host, &self.device) {
                Ok(model) => Slot::Resident(model),
                Err(e) => Slot::Lost(why(&e)),
            };
        }
        match &*slot {
            Slot::Resident(model) => Ok(f(model)),
            Slot::Lost(why) => Err(GenError::Stage(format!("{why}; the model is gone, reload the backend"))),
            Slot::Parked(_) => unreachable!("restored above"),
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
        fn to_host(&self) -> Result<HostWeights, String> {
            HostWeights::from_module(self).map_err(|e| e.to_string())
        }
        fn from_host(fail: &bool, host: HostWeights, device: &B::Device) -> Result<Self, String> {
            if *fail {
                return Err("no room".into());
            }
            let skeleton = Toy {
                fc: LinearConfig::new(3, 2).init(device),
                fail: false,
            };
            host.into_module(skeleton).map_err(|e| e.to_string())
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
