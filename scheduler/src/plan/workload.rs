//! What a cluster is asked to serve: prompt lengths (one, a range, or a weighted mix), output
//! lengths and an arrival rate — what `tandem plan` replays.

use std::fmt;

/// Prompt lengths: a mix of fixed lengths and uniform ranges, each with a weight — `360`,
/// `900-1100:0.25,32-256:0.75` (bench's `mixed` dataset).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts(Vec<(usize, usize, f64)>);

impl Prompts {
    pub fn fixed(tokens: usize) -> Prompts {
        Prompts(vec![(tokens, tokens, 1.0)])
    }

    pub fn mean(&self) -> f64 {
        let total: f64 = self.0.iter().map(|p| p.2).sum();
        self.0
            .iter()
            .map(|&(lo, hi, w)| (lo + hi) as f64 / 2.0 * w / total)
            .sum()
    }

    /// A length from two uniform draws in (0, 1]: one picks the part, one the length in it.
    pub fn sample(&self, pick: f64, within: f64) -> usize {
        let total: f64 = self.0.iter().map(|p| p.2).sum();
        let mut left = pick * total;
        let &(lo, hi, _) = self
            .0
            .iter()
            .find(|p| {
                left -= p.2;
                left <= 0.0
            })
            .unwrap_or_else(|| self.0.last().expect("at least one part"));
        let n = ((hi - lo + 1) as f64 * within).ceil() as usize;
        (lo + n.max(1) - 1).min(hi).max(1)
    }
}

impl std::str::FromStr for Prompts {
    type Err = String;

    fn from_str(s: &str) -> Result<Prompts, String> {
        let bad = || format!("{s:?}: want N, LO-HI, or a mix like 900-1100:0.25,32-256:0.75");
        let parts = s
            .split(',')
            .map(|part| {
                let (len, w) = match part.split_once(':') {
                    Some((l, w)) => (l, w.trim().parse::<f64>().map_err(|_| bad())?),
                    None => (part, 1.0),
                };
                let (lo, hi) = match len.split_once('-') {
                    Some((a, b)) => (a.trim().parse(), b.trim().parse()),
                    None => (len.trim().parse(), len.trim().parse()),
                };
                let (lo, hi): (usize, usize) = (lo.map_err(|_| bad())?, hi.map_err(|_| bad())?);
                if lo == 0 || hi < lo || !(w > 0.0 && w.is_finite()) {
                    return Err(bad());
                }
                Ok((lo, hi, w))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prompts(parts))
    }
}

impl fmt::Display for Prompts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi, w)) in self.0.iter().enumerate() {
            let sep = if i > 0 { "," } else { "" };
            let len = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            };
            if self.0.len() == 1 {
                write!(f, "{len}")?;
            } else {
                write!(f, "{sep}{len}:{w}")?;
            }
        }
        Ok(())
    }
}

/// What the cluster is asked to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Prompt tokens (not found in a cache).
    pub prompts: Prompts,
    /// Output tokens.
    pub osl: usize,
    /// Requests per second, arriving at random (Poisson).
    pub rate: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_mixes_parse_and_draw_from_their_parts() {
        let mix: Prompts = "900-1100:0.25,32-256:0.75".parse().unwrap();
        assert_eq!(mix.to_string(), "900-1100:0.25,32-256:0.75");
        assert!((mix.mean() - (0.25 * 1000.0 + 0.75 * 144.0)).abs() < 1e-9);
        let n = 20_000;
        let mut long = 0;
        for i in 0..n {
            let (a, b) = (
                (i as f64 + 0.5) / n as f64,
                ((i * 7919) % n) as f64 / n as f64 + 1e-9,
            );
            let len = mix.sample(a, b);
            assert!(
                (900..=1100).contains(&len) || (32..=256).contains(&len),
                "{len}"
            );
            long += usize::from(len >= 900);
        }
        assert!((long as f64 / n as f64 - 0.25).abs() < 0.01, "{long}");
        // Both ends of a range are drawn.
        let r: Prompts = "10-12".parse().unwrap();
        assert_eq!((r.sample(0.5, 1e-9), r.sample(0.5, 1.0)), (10, 12));
        assert_eq!("360".parse::<Prompts>().unwrap(), Prompts::fixed(360));
        for bad in ["0", "5-3", "a", "10:0", "10:x", "", "1-2:0.5,"] {
            assert!(bad.parse::<Prompts>().is_err(), "{bad}");
        }
    }
}
