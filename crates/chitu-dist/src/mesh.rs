//! Splitting a world into CFG pairs and context-parallel groups, the way Chitu does.

use crate::{CommError, Communicator, SubGroup};
use burn::tensor::TensorData;
use std::sync::Arc;

/// Tags of the groups' traffic.
const CFG_TAG: u32 = 1;
const CP_TAG: u32 = 2;

/// How a world of `cfg × cp` ranks is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// 1, or 2 for CFG parallelism (the two branches on two ranks).
    pub cfg: usize,
    /// Ranks sharing one sequence (Ulysses context parallelism).
    pub cp: usize,
}

impl Layout {
    /// One rank.
    pub const SINGLE: Layout = Layout { cfg: 1, cp: 1 };

    /// A validated layout.
    pub fn new(cfg: usize, cp: usize) -> Result<Self, CommError> {
        if cfg != 1 && cfg != 2 {
            return Err(CommError::Layout(format!(
                "--cfg-parallel must be 1 or 2 (the two guidance branches), got {cfg}"
            )));
        }
        if cp == 0 {
            return Err(CommError::Layout("--cp must be at least 1".into()));
        }
        Ok(Self { cfg, cp })
    }

    /// Ranks the layout needs.
    pub fn world(&self) -> usize {
        self.cfg * self.cp
    }

    /// Checks the layout against the world it runs in, before any work starts.
    pub fn check_world(&self, world: usize) -> Result<(), CommError> {
        if world != self.world() {
            return Err(CommError::Layout(format!(
                "a world of {world} ranks does not factor as cfg {} x cp {} = {}",
                self.cfg,
                self.cp,
                self.world()
            )));
        }
        Ok(())
    }

    /// The layout a world of `world` ranks gets when only some of cfg and cp are given: the
    /// missing factor fills the world.
    pub fn infer(world: usize, cfg: Option<usize>, cp: Option<usize>) -> Result<Self, CommError> {
        let layout = match (cfg, cp) {
            (Some(cfg), Some(cp)) => Layout::new(cfg, cp)?,
            (Some(cfg), None) if cfg > 0 && world.is_multiple_of(cfg) => Layout::new(cfg, world / cfg)?,
            (None, Some(cp)) if cp > 0 && world.is_multiple_of(cp) => Layout::new(world / cp, cp)?,
            (None, None) => Layout::new(1, world)?,
            (Some(cfg), _) => {
                return Err(CommError::Layout(format!(
                    "a world of {world} ranks does not split into {cfg} CFG branches"
                )))
            }
            (_, Some(cp)) => {
                return Err(CommError::Layout(format!(
                    "a world of {world} ranks does not split into context-parallel groups of {cp}"
                )))
            }
        };
        layout.check_world(world)?;
        Ok(layout)
    }
}

/// A rank's view of the world: its CFG pair and its context-parallel group.
///
/// Ranks `i` and `i + W/2` form a CFG pair (rank 0 of the pair runs the conditional branch); each
/// half `[0, W/2)` and `[W/2, W)` is a CP group.
#[derive(Clone)]
pub struct Mesh {
    /// How the world splits into CFG pairs and CP groups.
    pub layout: Layout,
    /// Every rank of the run.
    pub world: Arc<dyn Communicator>,
    /// This rank's CFG pair (a group of one without CFG parallelism).
    pub cfg: Arc<dyn Communicator>,
    /// This rank's context-parallel group.
    pub cp: Arc<dyn Communicator>,
}

impl Mesh {
    /// Splits `world` per `layout`; fails fast when the world does not factor as cfg × cp.
    pub fn new(world: Arc<dyn Communicator>, layout: Layout) -> Result<Self, CommError> {
        layout.check_world(world.world_size())?;
        let rank = world.rank();
        let (half, pos) = (rank / layout.cp, rank % layout.cp);
        let cfg_members = (0..layout.cfg).map(|c| c * layout.cp + pos).collect();
        let cp_members = (0..layout.cp).map(|p| half * layout.cp + p).collect();
        Ok(Self {
            layout,
            cfg: Arc::new(SubGroup::new(world.clone(), cfg_members, CFG_TAG)?),
            cp: Arc::new(SubGroup::new(world.clone(), cp_members, CP_TAG)?),
            world,
        })
    }

    /// The mesh of a single rank.
    pub fn single() -> Self {
        let solo: Arc<dyn Communicator> = Arc::new(Solo);
        Self {
            layout: Layout::SINGLE,
            cfg: solo.clone(),
            cp: solo.clone(),
            world: solo,
        }
    }

    /// Whether this rank writes the outputs (world rank 0).
    pub fn is_output_rank(&self) -> bool {
        self.world.rank() == 0
    }
}

/// The communicator of a world of one.
struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn send(&self, dst: usize, _: u32, _: TensorData) -> Result<(), CommError> {
        Err(CommError::Layout(format!("a world of one has no rank {dst}")))
    }
    fn recv(&self, src: usize, _: u32) -> Result<TensorData, CommError> {
        Err(CommError::Layout(format!("a world of one has no rank {src}")))
    }
}
