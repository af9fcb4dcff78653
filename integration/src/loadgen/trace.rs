//! Workloads: when each invocation arrives and which function it calls.
//!
//! Every generator is deterministic for its seed (a SplitMix64 stream of our own, so a trace
//! does not change with a crate upgrade) and returns arrivals sorted by time.
//!
//! * `func` — one call per function, one after another (`gap` apart), `repeat` rounds.
//! * `w1` — per-function bursts: every `period` each function receives a burst whose size is
//!   drawn from N(`concurrency`, 10 %); the functions' bursts are staggered across the period,
//!   so bursts of many functions interleave (TrEnv's W1: bursts every ~143 s, 12 cycles).
//! * `w2` — fixed bursts: every `period` exactly `concurrency` calls of one function, the
//!   functions taking turns (TrEnv's W2).
//! * `azure` — an Azure-Functions-like synthetic trace: per-minute totals follow a diurnal
//!   curve, split across functions by a heavy-tailed (Zipf) popularity, then each function's
//!   per-minute count is spread over the minute's seconds evenly or as a Poisson process.
//!   The shape follows Shahrad et al., "Serverless in the Wild" (ATC'20): a few functions
//!   receive most invocations, and load follows the time of day. See docs/benchmarks.md.

use std::time::Duration;

/// One invocation: when (from the start of the run) and which function (manifest index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub at: Duration,
    pub function: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("unknown workload {0:?} (known: func, w1, w2, azure)")]
    Unknown(String),
    #[error("workload {workload}: {what}")]
    Invalid {
        workload: &'static str,
        what: String,
    },
}

/// How an Azure-like minute's invocations are placed within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    Even,
    Poisson,
}

/// A workload and its parameters (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    Func {
        repeat: u32,
        gap: Duration,
    },
    W1 {
        period: Duration,
        cycles: u32,
        concurrency: u32,
    },
    W2 {
        period: Duration,
        cycles: u32,
        concurrency: u32,
    },
    Azure(AzureSpec),
}

/// The Azure-like trace's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureSpec {
    /// Length of the trace in (trace) minutes.
    pub minutes: u32,
    /// Wall-clock length of one trace minute (shorter than 60 s to fit a benchmark).
    pub minute: Duration,
    /// Mean invocations per minute over the day.
    pub mean_per_minute: f64,
    /// Diurnal amplitude in [0, 1): the rate swings between (1 - a) and (1 + a) times the mean.
    pub diurnal_amplitude: f64,
    /// Minutes in one diurnal cycle (1440 for a real day; shorter to see a cycle in a short run).
    pub day_minutes: u32,
    /// Zipf exponent of function popularity (≈1 for the Azure trace's heavy tail).
    pub zipf: f64,
    pub spread: Spread,
}

impl Default for AzureSpec {
    fn default() -> Self {
        Self {
            minutes: 10,
            minute: Duration::from_secs(60),
            mean_per_minute: 60.0,
            diurnal_amplitude: 0.5,
            day_minutes: 20,
            zipf: 1.0,
            spread: Spread::Poisson,
        }
    }
}

impl AzureSpec {
    /// The specified number of invocations in trace minute `m` (all functions together).
    pub fn minute_total(&self, m: u32) -> u64 {
        let phase = std::f64::consts::TAU * f64::from(m) / f64::from(self.day_minutes.max(1));
        // The trough is at minute 0, the peak half a day later: a run starts quietly and
        // builds up, as a platform sees in the morning.
        let rate = self.mean_per_minute * (1.0 - self.diurnal_amplitude * phase.cos());
        round_count(rate)
    }

    /// Popularity weights of `n` functions: weight of rank r is 1 / r^zipf (normalised).
    pub fn popularity(&self, n: usize) -> Vec<f64> {
        let raw: Vec<f64> = (1..=n)
            .map(|r| 1.0 / f64::from(u32::try_from(r).unwrap_or(u32::MAX)).powf(self.zipf))
            .collect();
        let sum: f64 = raw.iter().sum();
        raw.into_iter().map(|w| w / sum).collect()
    }

    /// Per-minute invocation counts per function: `counts[minute][function]`. Each minute's
    /// total is exactly [`AzureSpec::minute_total`]; it is split by a multinomial draw with
    /// the popularity weights.
    pub fn counts(&self, functions: usize, rng: &mut Rng) -> Vec<Vec<u64>> {
        let weights = self.popularity(functions);
        (0..self.minutes)
            .map(|m| {
                let mut row = vec![0u64; functions];
                for _ in 0..self.minute_total(m) {
                    row[rng.pick(&weights)] += 1;
                }
                row
            })
            .collect()
    }
}

/// A rate rounded to a whole, non-negative count.
fn round_count(x: f64) -> u64 {
    if !x.is_finite() || x <= 0.0 {
        return 0;
    }
    // Rates here are far below 2^53: the rounded value is exact and in range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = x.round() as u64;
    n
}

/// SplitMix64: small, fast, and fixed here so traces never change under us.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        // The top 53 bits make an exact double in [0, 1).
        #[allow(clippy::cast_precision_loss)]
        let x = (self.next_u64() >> 11) as f64;
        x / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// An index drawn with the given (normalised) weights.
    pub fn pick(&mut self, weights: &[f64]) -> usize {
        let mut x = self.unit();
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len().saturating_sub(1)
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn at(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.max(0.0))
}

impl Workload {
    /// Parses a workload name with the default parameters for a run of about `duration`.
    pub fn named(name: &str, duration: Duration) -> Result<Self, TraceError> {
        let d = duration.max(Duration::from_secs(1));
        Ok(match name {
            "func" => Workload::Func {
                repeat: 1,
                gap: Duration::from_millis(500),
            },
            "w1" | "w2" => {
                // About 6 cycles (TrEnv ran 12 cycles of ~143 s; a short run keeps the
                // shape: bursts separated by idle time longer than the bursts).
                let cycles = 6;
                let period = (d / cycles).max(Duration::from_secs(2));
                if name == "w1" {
                    Workload::W1 {
                        period,
                        cycles,
                        concurrency: 4,
                    }
                } else {
                    Workload::W2 {
                        period,
                        cycles,
                        concurrency: 8,
                    }
                }
            }
            "azure" => {
                let minutes = 10;
                Workload::Azure(AzureSpec {
                    minutes,
                    minute: (d / minutes).max(Duration::from_secs(1)),
                    ..AzureSpec::default()
                })
            }
            other => return Err(TraceError::Unknown(other.to_string())),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Workload::Func { .. } => "func",
            Workload::W1 { .. } => "w1",
            Workload::W2 { .. } => "w2",
            Workload::Azure(_) => "azure",
        }
    }

    /// A one-line description of the parameters, for reports.
    pub fn describe(&self) -> String {
        match self {
            Workload::Func { repeat, gap } => {
                format!("one call per function, {repeat} round(s), {:.1} s apart", secs(*gap))
            }
            Workload::W1 {
                period,
                cycles,
                concurrency,
            } => format!(
                "per-function bursts of N({concurrency}, 10%) calls every {:.1} s, {cycles} cycles, staggered",
                secs(*period)
            ),
            Workload::W2 {
                period,
                cycles,
                concurrency,
            } => format!(
                "a burst of {concurrency} calls of one function every {:.1} s, functions in turn, {cycles} cycles",
                secs(*period)
            ),
            Workload::Azure(a) => format!(
                "Azure-like: {} minutes of {:.1} s, mean {:.0}/min, diurnal ±{:.0}% over {} min, Zipf {:.2}, {:?} arrivals",
                a.minutes,
                secs(a.minute),
                a.mean_per_minute,
                a.diurnal_amplitude * 100.0,
                a.day_minutes,
                a.zipf,
                a.spread
            ),
        }
    }

    fn check(&self) -> Result<(), TraceError> {
        let bad = |what: &str| {
            Err(TraceError::Invalid {
                workload: self.name(),
                what: what.to_string(),
            })
        };
        match self {
            Workload::Func { repeat: 0, .. } => bad("repeat must be at least 1"),
            Workload::W1 { period, .. } | Workload::W2 { period, .. } if period.is_zero() => {
                bad("period must be positive")
            }
            Workload::W1 { concurrency: 0, .. } | Workload::W2 { concurrency: 0, .. } => {
                bad("concurrency must be at least 1")
            }
            Workload::Azure(a) if a.minute.is_zero() => bad("minute length must be positive"),
            Workload::Azure(a) if !(0.0..1.0).contains(&a.diurnal_amplitude) => {
                bad("diurnal amplitude must be in [0, 1)")
            }
            Workload::Azure(a) if !(a.mean_per_minute.is_finite() && a.mean_per_minute >= 0.0) => {
                bad("mean per minute must be a non-negative number")
            }
            _ => Ok(()),
        }
    }

    /// The arrivals for `functions` functions, sorted by time.
    pub fn arrivals(&self, functions: usize, seed: u64) -> Result<Vec<Arrival>, TraceError> {
        self.check()?;
        let mut rng = Rng::new(seed);
        let mut out = Vec::new();
        if functions == 0 {
            return Ok(out);
        }
        let nf = f64::from(u32::try_from(functions).unwrap_or(u32::MAX));
        match self {
            Workload::Func { repeat, gap } => {
                let mut i = 0u32;
                for _ in 0..*repeat {
                    for f in 0..functions {
                        out.push(Arrival {
                            at: *gap * i,
                            function: f,
                        });
                        i += 1;
                    }
                }
            }
            Workload::W1 {
                period,
                cycles,
                concurrency,
            } => {
                for c in 0..*cycles {
                    for f in 0..functions {
                        let offset =
                            secs(*period) * (f64::from(u32::try_from(f).unwrap_or(0)) / nf);
                        let start = secs(*period) * f64::from(c) + offset;
                        let mean = f64::from(*concurrency);
                        let n = round_count(mean + 0.1 * mean * rng.normal()).max(1);
                        for _ in 0..n {
                            // A burst lands within 100 ms, as a fan-out does.
                            out.push(Arrival {
                                at: at(start + 0.1 * rng.unit()),
                                function: f,
                            });
                        }
                    }
                }
            }
            Workload::W2 {
                period,
                cycles,
                concurrency,
            } => {
                for c in 0..*cycles {
                    let f = usize::try_from(c).unwrap_or(0) % functions;
                    let start = secs(*period) * f64::from(c);
                    for _ in 0..*concurrency {
                        out.push(Arrival {
                            at: at(start + 0.1 * rng.unit()),
                            function: f,
                        });
                    }
                }
            }
            Workload::Azure(a) => {
                let counts = a.counts(functions, &mut rng);
                let minute = secs(a.minute);
                for (m, row) in counts.iter().enumerate() {
                    let base = minute * f64::from(u32::try_from(m).unwrap_or(0));
                    for (f, &k) in row.iter().enumerate() {
                        for j in 0..k {
                            // Poisson arrivals conditioned on their count are uniform
                            // order statistics over the minute.
                            #[allow(clippy::cast_precision_loss)]
                            let frac = match a.spread {
                                Spread::Even => (j as f64 + 0.5) / k as f64,
                                Spread::Poisson => rng.unit(),
                            };
                            out.push(Arrival {
                                at: at(base + minute * frac),
                                function: f,
                            });
                        }
                    }
                }
            }
        }
        out.sort_by_key(|a| (a.at, a.function));
        Ok(out)
    }
}

#[cfg(test)]
// Test arithmetic on small, known values.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
mod tests {
    use super::*;

    fn azure() -> Workload {
        Workload::Azure(AzureSpec {
            minutes: 30,
            minute: Duration::from_secs(6),
            ..AzureSpec::default()
        })
    }

    #[test]
    fn every_workload_is_deterministic_for_a_seed() {
        for w in ["func", "w1", "w2", "azure"] {
            let w = Workload::named(w, Duration::from_secs(60)).unwrap();
            let a = w.arrivals(8, 42).unwrap();
            let b = w.arrivals(8, 42).unwrap();
            assert_eq!(a, b, "{}", w.name());
            assert!(!a.is_empty());
            assert!(a.windows(2).all(|p| p[0].at <= p[1].at), "sorted");
            if w.name() != "func" {
                let c = w.arrivals(8, 43).unwrap();
                assert_ne!(a, c, "{}: another seed gives another trace", w.name());
            }
        }
    }

    #[test]
    fn azure_minutes_hold_exactly_the_specified_totals() {
        let w = azure();
        let Workload::Azure(spec) = &w else {
            unreachable!()
        };
        let arrivals = w.arrivals(8, 7).unwrap();
        let minute = spec.minute.as_secs_f64();
        let mut per_minute = vec![0u64; spec.minutes as usize];
        for a in &arrivals {
            let m = (a.at.as_secs_f64() / minute).floor() as usize;
            let last = per_minute.len() - 1;
            per_minute[m.min(last)] += 1;
        }
        let spec_totals: Vec<u64> = (0..spec.minutes).map(|m| spec.minute_total(m)).collect();
        assert_eq!(per_minute, spec_totals);
        // The diurnal shape: the peak minute has about three times the trough's load.
        let (lo, hi) = (spec_totals[0], spec_totals[10]);
        assert_eq!(lo, 30);
        assert_eq!(hi, 90);
        // Heavy tail: the most popular function gets the most calls, several times the last.
        let mut per_fn = [0u64; 8];
        for a in &arrivals {
            per_fn[a.function] += 1;
        }
        assert!(per_fn[0] > 3 * per_fn[7], "{per_fn:?}");
    }

    #[test]
    fn even_spread_places_a_minute_s_calls_evenly() {
        let w = Workload::Azure(AzureSpec {
            minutes: 1,
            minute: Duration::from_secs(60),
            mean_per_minute: 4.0,
            diurnal_amplitude: 0.0,
            zipf: 50.0, // all calls go to the first function
            spread: Spread::Even,
            ..AzureSpec::default()
        });
        let at: Vec<f64> = w
            .arrivals(3, 1)
            .unwrap()
            .iter()
            .map(|a| a.at.as_secs_f64())
            .collect();
        assert_eq!(at, vec![7.5, 22.5, 37.5, 52.5]);
    }

    #[test]
    fn bursts_have_the_specified_shape() {
        let w2 = Workload::W2 {
            period: Duration::from_secs(10),
            cycles: 4,
            concurrency: 5,
        };
        let a = w2.arrivals(3, 1).unwrap();
        assert_eq!(a.len(), 20);
        for (c, chunk) in a.chunks(5).enumerate() {
            assert!(chunk.iter().all(|x| x.function == c % 3));
            assert!(chunk.iter().all(|x| x.at.as_secs_f64() >= c as f64 * 10.0));
        }
        let w1 = Workload::W1 {
            period: Duration::from_secs(10),
            cycles: 3,
            concurrency: 20,
        };
        let a = w1.arrivals(4, 1).unwrap();
        let per_fn: Vec<usize> = (0..4)
            .map(|f| a.iter().filter(|x| x.function == f).count())
            .collect();
        // N(20, 10%) per burst, three bursts per function.
        assert!(per_fn.iter().all(|&n| (45..=75).contains(&n)), "{per_fn:?}");
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Workload::named("w3", Duration::from_secs(1)).is_err());
        let w = Workload::Func {
            repeat: 0,
            gap: Duration::ZERO,
        };
        assert!(w.arrivals(1, 0).is_err());
        let w = Workload::Azure(AzureSpec {
            diurnal_amplitude: 1.5,
            ..AzureSpec::default()
        });
        assert!(w.arrivals(1, 0).is_err());
    }
}
