//! The f32 GEMM behind chitu's own CPU kernels, chosen per machine.
//!
//! Two kinds of kernel are on offer:
//! - the `gemm` crate (what burn-flex's matmul runs on), with AVX-512 micro-kernels where the CPU
//!   has them and AVX2+FMA ones elsewhere; always there;
//! - a system BLAS (OpenBLAS or BLIS, as Debian packages them), opened at run time with `dlopen`,
//!   so that nothing links against it and a machine without one loses nothing.
//!
//! [`Sgemm::get`] picks one once per process: `CHITU_GEMM=gemm|openblas|blis` forces a kernel;
//! `auto` (the default) takes BLIS, then OpenBLAS, where [`prefers_system_blas`] says that they
//! beat the crate on this CPU and one is installed, and the crate otherwise
//! (`cargo run --release --example bench_gemm` measures them all). A named BLAS that cannot be
//! opened falls back to the crate, saying so once on standard error.
//!
//! The system BLAS serves the large GEMMs that run on all threads (the linear layers). GEMMs
//! that run inside a parallel task (attention heads, the VAE's conv tiles) stay on the crate:
//! a BLAS call there would start its own threads beside rayon's.

use std::sync::OnceLock;

/// A row-major or strided f32 matrix operand: element `(i, j)` is at `ptr + i*rs + j*cs`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<P> {
    /// The first element.
    pub ptr: P,
    /// Row stride, in elements.
    pub rs: isize,
    /// Column stride, in elements.
    pub cs: isize,
}

/// The kinds of GEMM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKind {
    /// The `gemm` crate.
    Crate,
    /// OpenBLAS, opened at run time.
    OpenBlas,
    /// BLIS, opened at run time.
    Blis,
}

impl GemmKind {
    /// The name `CHITU_GEMM` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Crate => "gemm",
            Self::OpenBlas => "openblas",
            Self::Blis => "blis",
        }
    }

    fn libraries(self) -> &'static [&'static str] {
        match self {
            Self::Crate => &[],
            Self::OpenBlas => &["libopenblas.so.0", "libopenblas.so"],
            Self::Blis => &["libblis.so.4", "libblis.so"],
        }
    }
}

type CblasSgemm = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);
type SetThreads = unsafe extern "C" fn(n: i32);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// A system BLAS's `cblas_sgemm`, with its library kept open.
struct Blas {
    _lib: libloading::Library,
    sgemm: CblasSgemm,
    set_threads: Option<SetThreads>,
}

impl Blas {
    fn open(kind: GemmKind) -> Option<Self> {
        let lib = kind.libraries().iter().find_map(|name| {
            // SAFETY: OpenBLAS and BLIS run no code at load that could break this process's
            // invariants; their initialisers only set up their own thread pools.
            unsafe { libloading::Library::new(name).ok() }
        })?;
        // SAFETY: the symbols have the C BLAS interface's signatures, as the two libraries export them.
        unsafe {
            let sgemm = *lib.get::<CblasSgemm>(b"cblas_sgemm\0").ok()?;
            let set_threads = match kind {
                GemmKind::OpenBlas => lib.get::<SetThreads>(b"openblas_set_num_threads\0").ok().map(|s| *s),
                _ => lib.get::<SetThreads>(b"bli_thread_set_num_threads\0").ok().map(|s| *s),
            };
            Some(Self {
                _lib: lib,
                sgemm,
                set_threads,
            })
        }
    }
}

/// One f32 GEMM kernel: `dst = alpha * dst + lhs @ rhs` (alpha 0 or 1).
pub struct Sgemm {
    kind: GemmKind,
    blas: Option<Blas>,
}

impl std::fmt::Debug for Sgemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sgemm").field("kind", &self.kind).finish()
    }
}

impl Sgemm {
    /// The `gemm` crate.
    pub fn crate_kernel() -> Self {
        Self {
            kind: GemmKind::Crate,
            blas: None,
        }
    }

    /// `kind`, or `None` when its library cannot be opened here.
    pub fn open(kind: GemmKind) -> Option<Self> {
        match kind {
            GemmKind::Crate => Some(Self::crate_kernel()),
            kind => Blas::open(kind).map(|blas| {
                if let Some(set) = blas.set_threads {
                    // SAFETY: a plain setter of the library's own pool size.
                    unsafe { set(rayon::current_num_threads() as i32) };
                }
                Self { kind, blas: Some(blas) }
            }),
        }
    }

    /// The process's kernel, chosen on first use from `CHITU_GEMM` (see the module docs).
    pub fn get() -> &'static Sgemm {
        static CHOSEN: OnceLock<Sgemm> = OnceLock::new();
        CHOSEN.get_or_init(|| {
            let asked = std::env::var("CHITU_GEMM").unwrap_or_default();
            let kind = match asked.trim() {
                "openblas" => GemmKind::OpenBlas,
                "blis" => GemmKind::Blis,
                "gemm" => GemmKind::Crate,
                "" | "auto" => return Self::auto(&crate::Machine::detect()),
                other => {
                    eprintln!("CHITU_GEMM={other} is not a kernel (gemm, openblas, blis or auto); using auto");
                    return Self::auto(&crate::Machine::detect());
                }
            };
            Self::open(kind).unwrap_or_else(|| {
                eprintln!(
                    "CHITU_GEMM={}: none of {:?} could be opened; using the gemm crate",
                    kind.name(),
                    kind.libraries()
                );
                Self::crate_kernel()
            })
        })
    }

    /// The kernel `CHITU_GEMM=auto` takes on `machine`: see [`prefers_system_blas`].
    pub fn auto(machine: &crate::Machine) -> Self {
        if prefers_system_blas(machine) {
            for kind in [GemmKind::Blis, GemmKind::OpenBlas] {
                if let Some(kernel) = Self::open(kind) {
                    return kernel;
                }
            }
        }
        Self::crate_kernel()
    }

    /// Which kernel this is.
    pub fn kind(&self) -> GemmKind {
        self.kind
    }

    /// `dst[m, n] = (accumulate ? dst : 0) + lhs[m, k] @ rhs[k, n]`, on all of rayon's threads
    /// when `parallel`, else on the calling thread.
    ///
    /// # Safety
    /// Each operand must address every element its shape and strides reach, and `dst` must not
    /// overlap `lhs` or `rhs`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: Mat<*mut f32>,
        lhs: Mat<*const f32>,
        rhs: Mat<*const f32>,
        accumulate: bool,
        parallel: bool,
    ) {
        unsafe { self.run_with(m, n, k, dst, lhs, rhs, accumulate, 1.0, parallel) }
    }

    /// `dst[m, n] = scale * lhs[m, k] @ rhs[k, n]` on the calling thread: an attention's scaled
    /// scores, without a pass to scale q.
    ///
    /// # Safety
    /// As for [`Sgemm::run`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_scaled(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: Mat<*mut f32>,
        lhs: Mat<*const f32>,
        rhs: Mat<*const f32>,
        scale: f32,
    ) {
        unsafe { self.run_with(m, n, k, dst, lhs, rhs, false, scale, false) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn run_with(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: Mat<*mut f32>,
        lhs: Mat<*const f32>,
        rhs: Mat<*const f32>,
        accumulate: bool,
        scale: f32,
        parallel: bool,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        if let (Some(blas), true, true) = (&self.blas, parallel, dst.cs == 1) {
            // BLAS wants unit stride along one axis of each operand.
            let op = |a: Mat<*const f32>| match (a.rs, a.cs) {
                (rs, 1) => Some((NO_TRANS, rs.max(1))),
                (1, cs) => Some((TRANS, cs.max(1))),
                _ => None,
            };
            if let (Some((ta, lda)), Some((tb, ldb))) = (op(lhs), op(rhs)) {
                let int = |v: isize| i32::try_from(v).ok();
                if let (Some(m), Some(n), Some(k), Some(lda), Some(ldb), Some(ldc)) = (
                    int(m as isize),
                    int(n as isize),
                    int(k as isize),
                    int(lda),
                    int(ldb),
                    int(dst.rs),
                ) {
                    let beta = if accumulate { 1.0 } else { 0.0 };
                    (blas.sgemm)(
                        ROW_MAJOR, ta, tb, m, n, k, scale, lhs.ptr, lda, rhs.ptr, ldb, beta, dst.ptr, ldc,
                    );
                    return;
                }
            }
        }
        let parallelism = if parallel && m * n * k > 1 << 18 {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.ptr,
                dst.cs,
                dst.rs,
                accumulate,
                lhs.ptr,
                lhs.cs,
                lhs.rs,
                rhs.ptr,
                rhs.cs,
                rhs.rs,
                if accumulate { 1.0 } else { 0.0 },
                scale,
                false,
                false,
                false,
                parallelism,
            )
        };
    }
}

/// Whether a system BLAS, where one is installed, beats the `gemm` crate on `machine`.
///
/// Measured (BENCHMARKS.md, `bench_gemm`): on AVX2-only CPUs (a Zen 3 EPYC) BLIS and OpenBLAS
/// ran the DiT's linear-layer GEMMs 1.15x to 1.8x faster than the crate on two threads. On a
/// Zen 5, whose 512-bit FMAs are full width, the crate's AVX-512 kernels ran 1.3-1.5x PyTorch's
/// MKL. Zen 4 splits each 512-bit FMA in two, which takes away the crate's AVX-512 lead, so it
/// gets a BLAS too (not measured here). Elsewhere, AVX-512 CPUs keep the crate.
pub fn prefers_system_blas(machine: &crate::Machine) -> bool {
    !machine.has("avx512f") || machine.generation() == Some("Zen 4")
}

/// Row-major `[rows, cols]` operand.
pub fn row_major<P>(ptr: P, cols: usize) -> Mat<P> {
    Mat {
        ptr,
        rs: cols as isize,
        cs: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    fn check(kernel: &Sgemm) {
        let (m, n, k) = (37, 29, 45);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
        let want = reference(m, n, k, &a, &b);
        let mut c = vec![1.0f32; m * n];
        let close = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-4);
        for parallel in [false, true] {
            unsafe {
                kernel.run(
                    m,
                    n,
                    k,
                    row_major(c.as_mut_ptr(), n),
                    row_major(a.as_ptr(), k),
                    row_major(b.as_ptr(), n),
                    false,
                    parallel,
                )
            };
            assert!(close(&c, &want), "{:?} parallel={parallel}", kernel.kind());
        }
        // B given as its transpose's strides, and accumulation.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        unsafe {
            kernel.run(
                m,
                n,
                k,
                row_major(c.as_mut_ptr(), n),
                row_major(a.as_ptr(), k),
                Mat {
                    ptr: bt.as_ptr(),
                    rs: 1,
                    cs: k as isize,
                },
                true,
                true,
            )
        };
        let twice: Vec<f32> = want.iter().map(|w| 2.0 * w).collect();
        assert!(close(&c, &twice), "{:?} transposed rhs", kernel.kind());
    }

    #[test]
    fn every_kernel_this_machine_has_multiplies_alike() {
        check(&Sgemm::crate_kernel());
        // The system libraries are optional: check those that are installed.
        for kind in [GemmKind::OpenBlas, GemmKind::Blis] {
            if let Some(kernel) = Sgemm::open(kind) {
                check(&kernel);
            }
        }
    }
}
