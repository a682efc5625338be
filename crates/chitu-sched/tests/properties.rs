//! Property tests over the whole option space the schedulers accept.

use burn::tensor::{Distribution, Tensor};
use burn_flex::Flex;
use chitu_sched::{
    DpmSolverConfig, DpmSolverScheduler, FinalSigmas, FlowMatchEulerConfig, FlowMatchEulerScheduler, Scheduler,
    UniPcConfig, UniPcScheduler,
};
use proptest::prelude::*;

type S = Box<dyn Scheduler<Flex, 5>>;

/// Every supported configuration: solver, order, variant, final sigma, shift.
fn any_scheduler() -> impl Strategy<Value = S> {
    let shift = 0.1f64..20.0;
    prop_oneof![
        (1usize..=3, any::<bool>(), any::<bool>(), shift.clone()).prop_map(|(order, bh1, sigma_min, shift)| {
            Box::new(
                UniPcScheduler::new(UniPcConfig {
                    solver_order: order,
                    solver_type: if bh1 { "bh1" } else { "bh2" }.into(),
                    final_sigmas_type: if sigma_min {
                        FinalSigmas::SigmaMin
                    } else {
                        FinalSigmas::Zero
                    },
                    flow_shift: shift,
                    ..UniPcConfig::wan()
                })
                .unwrap(),
            ) as S
        }),
        (1usize..=2, any::<bool>(), shift.clone()).prop_map(|(order, heun, shift)| {
            Box::new(
                DpmSolverScheduler::new(DpmSolverConfig {
                    solver_order: order,
                    solver_type: if heun { "heun" } else { "midpoint" }.into(),
                    flow_shift: shift,
                    ..DpmSolverConfig::wan()
                })
                .unwrap(),
            ) as S
        }),
        shift.prop_map(|shift| {
            Box::new(
                FlowMatchEulerScheduler::new(FlowMatchEulerConfig {
                    shift,
                    ..Default::default()
                })
                .unwrap(),
            ) as S
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Sigmas fall strictly over the schedule; timesteps never rise. diffusers truncates the
    /// UniPC/DPM timesteps to integers, so at high step counts neighbours can be equal (for example
    /// 1000 UniPC steps start 999, 999): only Euler's float timesteps fall strictly.
    #[test]
    fn schedules_decrease_and_end_at_the_final_sigma(mut s in any_scheduler(), n in 1usize..=1000) {
        s.set_timesteps(n).unwrap();
        let (ts, sig) = (s.timesteps(), s.sigmas());
        prop_assert_eq!(ts.len(), n);
        prop_assert_eq!(sig.len(), n + 1);
        prop_assert!(sig[..n].windows(2).all(|w| w[0] > w[1]), "sigmas not strictly decreasing: {:?}", sig);
        // The final sigma is 0, or (UniPC's `sigma_min`) a repeat of the last one, which makes the
        // last step a no-op in diffusers.
        prop_assert!(sig[n] <= sig[n - 1] && sig[n] >= 0.0);
        prop_assert!(sig[0] < 1.0 || s.class_name() == "FlowMatchEulerDiscreteScheduler");
        prop_assert!(ts.windows(2).all(|w| w[0] >= w[1]));
        if s.class_name() == "FlowMatchEulerDiscreteScheduler" {
            prop_assert!(ts.windows(2).all(|w| w[0] > w[1]));
        }
        prop_assert!(ts.iter().all(|t| t.is_finite() && *t >= 0.0));
    }

    /// Sigmas end at exactly 0 with the default final sigma type.
    #[test]
    fn default_schedules_end_at_zero(shift in 0.1f64..20.0, n in 1usize..=1000) {
        let mut u = UniPcScheduler::<Flex, 5>::new(UniPcConfig { flow_shift: shift, ..UniPcConfig::wan() }).unwrap();
        let mut d = DpmSolverScheduler::<Flex, 5>::new(DpmSolverConfig { flow_shift: shift, ..DpmSolverConfig::wan() }).unwrap();
        let mut e = FlowMatchEulerScheduler::<Flex, 5>::new(FlowMatchEulerConfig { shift, ..Default::default() }).unwrap();
        for s in [&mut u as &mut dyn Scheduler<Flex, 5>, &mut d, &mut e] {
            s.set_timesteps(n).unwrap();
            prop_assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        }
    }

    /// A whole trajectory from finite inputs stays finite, whatever the configuration.
    #[test]
    fn steps_stay_finite(mut s in any_scheduler(), n in 1usize..=40, scale in 0.01f32..20.0, seed in any::<u64>()) {
        let device = Default::default();
        <Flex as burn::tensor::backend::Backend>::seed(&device, seed);
        s.set_timesteps(n).unwrap();
        let mut x = Tensor::<Flex, 5>::random([1, 2, 1, 2, 3], Distribution::Normal(0.0, 1.0), &device);
        for t in s.timesteps().to_vec() {
            let v = Tensor::<Flex, 5>::random([1, 2, 1, 2, 3], Distribution::Normal(0.0, 1.0), &device).mul_scalar(scale);
            x = s.step(v, t, x).unwrap();
            let vals: Vec<f32> = x.to_data().to_vec().unwrap();
            prop_assert!(vals.iter().all(|v| v.is_finite()), "non-finite sample at t={} in {}", t, s.class_name());
        }
    }
}
