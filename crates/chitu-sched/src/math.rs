//! Schedule math, written to reproduce numpy's and diffusers' float64 arithmetic bit for bit.

/// `numpy.linspace(start, stop, num)` with `endpoint=True`, including numpy's rounding:
/// `i * step + start`, with the last point forced to `stop`.
pub fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut out: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|i| (i as f64 / div as f64) * delta + start).collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        vec![start]
    };
    if num > 1 {
        out[num - 1] = stop;
    }
    out
}

/// The time shift of flow matching, `shift * s / (1 + (shift - 1) * s)`, in diffusers' operation order.
pub fn shift_sigmas(sigmas: &[f64], shift: f64) -> Vec<f64> {
    sigmas.iter().map(|&s| shift * s / (1.0 + (shift - 1.0) * s)).collect()
}

/// diffusers' `use_flow_sigmas` schedule for UniPC and DPM-Solver: `n` descending shifted sigmas in f64,
/// before the final sigma is appended and before the cast to float32.
pub fn flow_sigmas(n: usize, num_train_timesteps: usize, shift: f64) -> Vec<f64> {
    let alphas = numpy_linspace(1.0, 1.0 / num_train_timesteps as f64, n + 1);
    let sigmas: Vec<f64> = alphas.iter().map(|a| 1.0 - a).collect();
    let mut shifted = shift_sigmas(&sigmas, shift);
    shifted.reverse();
    shifted.truncate(n);
    shifted
}

/// diffusers 0.42's `use_flow_sigmas` schedule for UniPC, which differs from DPM-Solver's:
/// `linspace(1, 1/T, n + 1)[:-1]`, shifted, optionally stretched to end at `shift_terminal`, and with a
/// first sigma of 1 nudged down by 1e-6 (so that `log(alpha)` stays finite). f64, before the float32 cast.
pub fn unipc_flow_sigmas(n: usize, num_train_timesteps: usize, shift: f64, shift_terminal: Option<f64>) -> Vec<f64> {
    let mut base = numpy_linspace(1.0, 1.0 / num_train_timesteps as f64, n + 1);
    base.truncate(n);
    let mut sigmas = shift_sigmas(&base, shift);
    if let Some(terminal) = shift_terminal.filter(|&t| t != 0.0) {
        let scale = (1.0 - sigmas[n - 1]) / (1.0 - terminal);
        for s in &mut sigmas {
            *s = 1.0 - (1.0 - *s) / scale;
        }
    }
    const EPS: f64 = 1e-6;
    if (sigmas[0] - 1.0).abs() < EPS {
        sigmas[0] -= EPS;
    }
    sigmas
}

/// Widens a value after rounding it to float32, as a numpy `astype(np.float32)` followed by use in f64.
pub(crate) fn f32_round(x: f64) -> f64 {
    x as f32 as f64
}

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting
/// (what `torch.linalg.solve` does for UniPC's at most 3x3 systems).
pub(crate) fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (dst, src) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *dst -= f * src;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let mut acc = b[row];
        for k in row + 1..n {
            acc -= a[row][k] * x[k];
        }
        x[row] = acc / a[row][row];
    }
    x
}

/// `(alpha_t, sigma_t)` of a flow-matching noise level: `x_t = alpha_t * x0 + sigma_t * noise`.
pub(crate) fn flow_alpha_sigma(sigma: f64) -> (f64, f64) {
    (1.0 - sigma, sigma)
}

/// Half log-SNR, `lambda = log(alpha) - log(sigma)`; +inf at sigma = 0.
pub(crate) fn lambda(sigma: f64) -> f64 {
    let (alpha, sigma) = flow_alpha_sigma(sigma);
    alpha.ln() - sigma.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints_and_spacing() {
        assert_eq!(numpy_linspace(0.0, 1.0, 5), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(numpy_linspace(3.0, 7.0, 1), vec![3.0]);
        assert!(numpy_linspace(0.0, 1.0, 0).is_empty());
        let v = numpy_linspace(1.0, 0.001, 11);
        assert_eq!(v[0], 1.0);
        assert_eq!(v[10], 0.001);
    }

    #[test]
    fn solve_recovers_known_solution() {
        let a = vec![vec![1.0, 1.0, 1.0], vec![0.5, 2.0, 1.0], vec![0.25, 4.0, 1.0]];
        let x = [2.0, -1.0, 0.5];
        let b: Vec<f64> = a.iter().map(|r| r.iter().zip(&x).map(|(p, q)| p * q).sum()).collect();
        let got = solve(a, b);
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
    }

    #[test]
    fn flow_sigmas_start_below_one_and_shift_is_monotone() {
        let s = flow_sigmas(10, 1000, 3.0);
        assert_eq!(s.len(), 10);
        assert!(s[0] < 1.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }
}
