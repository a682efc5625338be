//! Bad configs and misuse give clear errors, never wrong math.

use burn::tensor::Tensor;
use burn_flex::Flex;
use chitu_sched::{from_config_json, SchedError, Scheduler};
use serde_json::json;

fn build(v: serde_json::Value) -> Result<Box<dyn Scheduler<Flex, 5>>, SchedError> {
    from_config_json::<Flex, 5>(&v)
}

fn wan_unipc() -> serde_json::Value {
    json!({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": true, "flow_shift": 3.0})
}

#[test]
fn unknown_or_missing_class_is_named() {
    let e = build(json!({"_class_name": "DDIMScheduler"})).err().unwrap();
    assert!(e.to_string().contains("DDIMScheduler"), "{e}");
    assert!(build(json!({"flow_shift": 3.0})).is_err());
}

#[test]
fn unsupported_options_are_rejected_by_name() {
    let cases = [
        ("use_karras_sigmas", json!(true)),
        ("thresholding", json!(true)),
        ("prediction_type", json!("epsilon")),
        ("use_flow_sigmas", json!(false)),
        ("solver_order", json!(4)),
        ("solver_type", json!("nonsense")),
        ("predict_x0", json!(false)),
        ("use_dynamic_shifting", json!(true)),
    ];
    for (key, value) in cases {
        let mut c = wan_unipc();
        c[key] = value;
        let e = build(c).err().unwrap_or_else(|| panic!("{key} accepted"));
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
    let e = build(
        json!({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction",
        "use_flow_sigmas": true, "algorithm_type": "sde-dpmsolver++"}),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("algorithm_type"), "{e}");
    let e = build(json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": true}))
        .err()
        .unwrap();
    assert!(e.to_string().contains("stochastic_sampling"), "{e}");
}

#[test]
fn invalid_values_are_rejected() {
    let mut c = wan_unipc();
    c["flow_shift"] = json!(-1.0);
    assert!(build(c).is_err());
    let mut c = wan_unipc();
    c["lower_order_final"] = json!(false);
    assert!(matches!(build(c), Err(SchedError::Invalid { .. })));
    let mut c = wan_unipc();
    c["flow_shift"] = json!("three");
    assert!(matches!(build(c), Err(SchedError::Json(_))));
}

#[test]
fn misuse_is_an_error() {
    let device = Default::default();
    let x = || Tensor::<Flex, 5>::zeros([1, 1, 1, 1, 2], &device);
    let mut s = build(wan_unipc()).unwrap();
    assert!(matches!(s.step(x(), 999.0, x()), Err(SchedError::NotInitialised(_))));
    assert!(s.set_timesteps(0).is_err());
    s.set_timesteps(2).unwrap();
    let ts = s.timesteps().to_vec();
    assert!(matches!(
        s.step(x(), ts[1], x()),
        Err(SchedError::TimestepMismatch { index: 0, .. })
    ));
    s.step(x(), ts[0], x()).unwrap();
    s.step(x(), ts[1], x()).unwrap();
    assert!(matches!(
        s.step(x(), ts[1], x()),
        Err(SchedError::Finished { steps: 2, .. })
    ));
    s.reset();
    assert_eq!(s.step_index(), 0);
    s.set_begin_index(1).unwrap();
    s.step(x(), ts[1], x()).unwrap();
    assert!(s.set_begin_index(2).is_err());
}

#[test]
fn missing_config_file_names_the_path() {
    let e = chitu_sched::from_config_file::<Flex, 5>("/nonexistent/scheduler_config.json")
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/scheduler_config.json"), "{e}");
}

#[test]
fn order_one_unipc_at_zero_final_sigma_returns_the_x0_prediction() {
    // With bh1 diffusers multiplies a zero correction by -inf at the last step and returns NaN;
    // the exact result is the model's x0 prediction, x - sigma * v.
    let device = Default::default();
    let mut c = wan_unipc();
    c["solver_type"] = json!("bh1");
    c["solver_order"] = json!(1);
    let mut s = build(c).unwrap();
    s.set_timesteps(1).unwrap();
    let x = Tensor::<Flex, 5>::from_floats([[[[[1.0, 2.0]]]]], &device);
    let v = Tensor::<Flex, 5>::from_floats([[[[[0.5, -1.0]]]]], &device);
    let sigma = s.sigmas()[0] as f32;
    let t = s.timesteps()[0];
    let out: Vec<f32> = s.step(v, t, x).unwrap().to_data().to_vec().unwrap();
    assert_eq!(out, vec![1.0 - sigma * 0.5, 2.0 + sigma]);
}
