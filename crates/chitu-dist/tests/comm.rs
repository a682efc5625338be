//! The in-process engine: collectives, the CFG×CP mesh, bad layouts, dead and stuck ranks.

use burn::tensor::{Tensor, TensorData};
use burn_flex::Flex as B;
use chitu_dist::{run_local, run_local_with, CommError, Communicator, Layout, Mesh, TensorComm};
use std::time::{Duration, Instant};

fn ramp(rank: usize, shape: [usize; 3]) -> Tensor<B, 3> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (rank * 1000 + i) as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

#[test]
fn all_gather_all_to_all_broadcast_and_sum_on_four_ranks() {
    let out = run_local(4, |comm| {
        let r = comm.rank();
        let gathered = comm.all_gather(ramp(r, [1, 2, 3]), 1)?;
        let expected = Tensor::cat((0..4).map(|i| ramp(i, [1, 2, 3])).collect(), 1);
        assert_eq!(gathered.into_data(), expected.into_data());

        // all_to_all twice with the dims swapped is the identity.
        let x = ramp(r, [1, 8, 4]);
        let there = comm.all_to_all(x.clone(), 2, 1)?;
        assert_eq!(there.dims(), [1, 32, 1]);
        let back = comm.all_to_all(there, 1, 2)?;
        assert_eq!(back.into_data(), x.into_data());

        let b = comm.broadcast(ramp(r, [1, 1, 2]), 2)?;
        assert_eq!(b.into_data(), ramp(2, [1, 1, 2]).into_data());
        let sum = comm.all_sum(&[r as f64, 1.0])?;
        comm.barrier()?;
        Ok(sum)
    })
    .unwrap();
    assert!(out.iter().all(|s| s == &vec![6.0, 4.0]));
}

#[test]
fn mesh_pairs_rank_i_with_i_plus_half_and_splits_halves_into_cp_groups() {
    let groups = run_local(4, |world| {
        let mesh = Mesh::new(world.clone(), Layout::new(2, 2)?)?;
        // Each rank contributes its world rank; the groups tell who is in them.
        let id = |c: &dyn Communicator| -> Result<Vec<f64>, CommError> {
            let all = c.all_gather_data(TensorData::new(vec![world.rank() as f64], [1]))?;
            Ok(all.into_iter().map(|d| d.to_vec::<f64>().unwrap()[0]).collect())
        };
        Ok((id(mesh.cfg.as_ref())?, id(mesh.cp.as_ref())?))
    })
    .unwrap();
    assert_eq!(groups[0], (vec![0.0, 2.0], vec![0.0, 1.0]));
    assert_eq!(groups[1], (vec![1.0, 3.0], vec![0.0, 1.0]));
    assert_eq!(groups[2], (vec![0.0, 2.0], vec![2.0, 3.0]));
    assert_eq!(groups[3], (vec![1.0, 3.0], vec![2.0, 3.0]));
}

#[test]
fn layouts_that_do_not_factor_the_world_fail_before_any_work() {
    let err = |r: Result<Layout, CommError>| r.unwrap_err().to_string();
    assert!(err(Layout::new(3, 1)).contains("must be 1 or 2"));
    assert!(err(Layout::new(1, 0)).contains("at least 1"));
    assert!(err(Layout::infer(3, Some(2), None)).contains("does not split into 2 CFG branches"));
    assert!(err(Layout::infer(6, None, Some(4))).contains("groups of 4"));
    assert!(err(Layout::infer(4, Some(2), Some(4))).contains("does not factor"));
    assert_eq!(Layout::infer(4, Some(2), None).unwrap(), Layout { cfg: 2, cp: 2 });
    assert_eq!(Layout::infer(3, None, None).unwrap(), Layout { cfg: 1, cp: 3 });

    let e = run_local(3, |world| Ok(Mesh::new(world, Layout::new(2, 2)?)?.layout)).unwrap_err();
    assert!(e.to_string().contains("a world of 3 ranks does not factor"), "{e}");
}

#[test]
fn a_rank_that_dies_is_reported_and_its_peers_do_not_hang() {
    let start = Instant::now();
    let e = run_local_with(3, Duration::from_secs(300), |comm| {
        if comm.rank() == 1 {
            return Err("rank 1 lost its model".into());
        }
        comm.all_gather(ramp(comm.rank(), [1, 1, 1]), 1)?;
        Ok(())
    })
    .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "peers waited for a dead rank"
    );
    assert!(
        e.to_string().contains("rank 1 lost its model"),
        "the cause is reported: {e}"
    );
}

#[test]
fn a_stuck_rank_times_out() {
    let e = run_local_with(2, Duration::from_millis(300), |comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_secs(2));
            return Ok(());
        }
        comm.barrier()?;
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("no message from rank 1"), "{e}");
}

#[test]
fn shape_mismatches_are_errors() {
    let e = run_local(2, |comm| {
        let shape = if comm.rank() == 0 { [1, 2, 3] } else { [1, 2, 4] };
        comm.all_gather(ramp(comm.rank(), shape), 1)?;
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("all_gather along 1"), "{e}");
    let e = run_local(2, |comm| {
        comm.all_to_all(ramp(comm.rank(), [1, 3, 2]), 1, 2)?;
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("does not split into 2"), "{e}");
}
