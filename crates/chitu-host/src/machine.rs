//! What CPU a benchmark ran on: vendor, family and model, the vector ISA in use, and the threads.
//!
//! A speed ratio means little without the machine: the same code ran 1.5x PyTorch on a Zen 5 and
//! 0.9x on a Zen 4, whose 512-bit FMAs run as two halves. Every benchmark table prints
//! [`Machine::detect`]'s line above it.

use std::fmt;

/// The CPU this process runs on, as the benchmarks report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// `AuthenticAMD`, `GenuineIntel`, ... (`unknown` off x86 or without `/proc/cpuinfo`).
    pub vendor: String,
    /// The marketing name, e.g. `AMD EPYC 9454`.
    pub name: String,
    /// CPU family and model, as `/proc/cpuinfo` numbers them (decimal).
    pub family: Option<u32>,
    /// See `family`.
    pub model: Option<u32>,
    /// Vector features that decide which kernels run: `avx2`, `fma`, `avx512f`, `avx512_bf16`,
    /// `amx_tile`, ... (only those this CPU has).
    pub features: Vec<&'static str>,
    /// The threads the CPU kernels use (rayon's pool).
    pub threads: usize,
}

/// The features worth naming, in `/proc/cpuinfo`'s spelling.
const FEATURES: [&str; 8] = [
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "amx_tile",
];

impl Machine {
    /// Reads `/proc/cpuinfo` (Linux) and rayon's thread count.
    pub fn detect() -> Self {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::from_cpuinfo(&info, rayon::current_num_threads())
    }

    /// Parses the first processor's block of a `/proc/cpuinfo` text.
    pub fn from_cpuinfo(info: &str, threads: usize) -> Self {
        let field = |key: &str| {
            info.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        Self {
            vendor: field("vendor_id").unwrap_or_else(|| "unknown".into()),
            name: field("model name").unwrap_or_else(|| "unknown".into()),
            family: field("cpu family").and_then(|v| v.parse().ok()),
            model: field("model").and_then(|v| v.parse().ok()),
            features: FEATURES.into_iter().filter(|f| flags.contains(f)).collect(),
            threads,
        }
    }

    /// Whether the CPU has `feature` (in `/proc/cpuinfo`'s spelling).
    pub fn has(&self, feature: &str) -> bool {
        self.features.contains(&feature)
    }

    /// The widest vector ISA the f32 GEMM kernels use here: `AVX-512` where the CPU has it (the
    /// `gemm` crate is built with its `x86-v4` kernels), else `AVX2+FMA`, else `scalar/SSE`.
    pub fn isa(&self) -> &'static str {
        if self.has("avx512f") {
            "AVX-512"
        } else if self.has("avx2") && self.has("fma") {
            "AVX2+FMA"
        } else {
            "scalar/SSE"
        }
    }

    /// AMD's and Intel's core generation where the family and model say it plainly.
    pub fn generation(&self) -> Option<&'static str> {
        let (family, model) = (self.family?, self.model?);
        match (self.vendor.as_str(), family) {
            ("AuthenticAMD", 23) => Some("Zen/Zen 2"),
            // Family 25 holds Zen 3 (models 0x00-0x0f, 0x20-0x5f) and Zen 4 (0x10-0x1f, 0x60-0xaf).
            ("AuthenticAMD", 25) if (0x10..0x20).contains(&model) || (0x60..0xb0).contains(&model) => Some("Zen 4"),
            ("AuthenticAMD", 25) => Some("Zen 3"),
            ("AuthenticAMD", 26) => Some("Zen 5"),
            ("GenuineIntel", 6) => match model {
                106 | 108 => Some("Ice Lake-SP"),
                143 => Some("Sapphire Rapids"),
                207 => Some("Emerald Rapids"),
                173 | 174 => Some("Granite Rapids"),
                _ => None,
            },
            _ => None,
        }
    }
}

impl fmt::Display for Machine {
    /// One line: `AuthenticAMD AMD EPYC (family 25, model 1: Zen 3); ISA AVX2+FMA
    /// [avx2 fma f16c]; 2 threads`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
        write!(
            f,
            "{} {} (family {}, model {}",
            self.vendor,
            self.name,
            num(self.family),
            num(self.model)
        )?;
        if let Some(g) = self.generation() {
            write!(f, ": {g}")?;
        }
        write!(
            f,
            "); ISA {} [{}]; {} thread{}",
            self.isa(),
            self.features.join(" "),
            self.threads,
            if self.threads == 1 { "" } else { "s" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zen3_cpuinfo_reads_as_zen3_with_avx2() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n\
                    model name\t: AMD EPYC\nflags\t\t: fpu sse avx f16c fma avx2 bmi2\n\nprocessor\t: 1\n";
        let m = Machine::from_cpuinfo(info, 2);
        assert_eq!((m.family, m.model), (Some(25), Some(1)));
        assert_eq!(m.generation(), Some("Zen 3"));
        assert_eq!(m.isa(), "AVX2+FMA");
        assert_eq!(
            m.to_string(),
            "AuthenticAMD AMD EPYC (family 25, model 1: Zen 3); ISA AVX2+FMA [avx2 fma f16c]; 2 threads"
        );
    }

    #[test]
    fn avx512_bf16_and_zen4_are_named() {
        let info = "vendor_id : AuthenticAMD\ncpu family : 25\nmodel : 17\nmodel name : AMD EPYC 9454\n\
                    flags : avx2 fma avx512f avx512_bf16\n";
        let m = Machine::from_cpuinfo(info, 1);
        assert_eq!(m.generation(), Some("Zen 4"));
        assert_eq!(m.isa(), "AVX-512");
        assert!(m.has("avx512_bf16") && !m.has("amx_tile"));
        assert!(m.to_string().ends_with("1 thread"));
    }

    #[test]
    fn no_cpuinfo_is_unknown_not_an_error() {
        let m = Machine::from_cpuinfo("", 4);
        assert_eq!(m.vendor, "unknown");
        assert_eq!(m.isa(), "scalar/SSE");
        assert_eq!(m.generation(), None);
    }
}
