//! How a deployment lays out its workers: on one machine's cores (colocated, sharing, pinned)
//! or as pods of a cluster — what `tandem plan` chooses between, and the flags that run each.

use super::placement::Slo;

/// How the cores are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One worker prefilling and decoding (`tandem up --colocated`).
    Colocated { threads: usize },
    /// One prefill and one decode worker on the same cores, the decode worker's steps first
    /// (`tandem up`, the default).
    Shared { threads: usize },
    /// Workers with a core each (`tandem up --pin`).
    Pinned { prefill: usize, decode: usize },
    /// Worker pods of `threads` cores each on a cluster's nodes, the KV over TCP
    /// (deploy/kubernetes; no prefill pods: the decode pods prefill every prompt).
    Pods {
        prefill: usize,
        decode: usize,
        threads: usize,
    },
}

impl Layout {
    /// Cores the layout occupies.
    pub fn cores(&self) -> usize {
        match *self {
            Layout::Colocated { threads } | Layout::Shared { threads } => threads,
            Layout::Pinned { prefill, decode } => prefill + decode,
            Layout::Pods {
                prefill,
                decode,
                threads,
            } => (prefill + decode) * threads,
        }
    }

    /// The `tandem up` flags that run it with this SLO (for pods: the scheduler's; the pool
    /// sizes and threads go in the overlay, `tandem plan --pods --emit-kustomize`).
    pub fn up_flags(&self, slo: Slo) -> Vec<String> {
        let mut a: Vec<String> = match *self {
            Layout::Colocated { threads } => {
                return vec![
                    "--colocated".into(),
                    "--threads".into(),
                    threads.to_string(),
                ];
            }
            Layout::Shared { threads } => vec!["--threads".into(), threads.to_string()],
            Layout::Pinned { prefill, decode } => vec![
                "--pin".into(),
                "--prefill".into(),
                prefill.to_string(),
                "--decode".into(),
                decode.to_string(),
            ],
            Layout::Pods { .. } => Vec::new(),
        };
        a.extend([
            "--slo-ttft-ms".into(),
            format!("{:.0}", slo.ttft_s * 1e3),
            "--slo-tpot-ms".into(),
            format!("{:.0}", slo.tpot_s * 1e3),
        ]);
        a
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Layout::Colocated { threads } => write!(f, "colocated, {threads} thread(s)"),
            Layout::Shared { threads } => {
                write!(f, "1 prefill + 1 decode sharing {threads} core(s)")
            }
            Layout::Pinned { prefill, decode } => {
                write!(f, "{prefill} prefill + {decode} decode, a core each")
            }
            Layout::Pods {
                prefill,
                decode,
                threads,
            } => write!(
                f,
                "{prefill} prefill + {decode} decode pods of {threads} core(s), KV over TCP"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_run_the_layout() {
        let slo = Slo {
            ttft_s: 3.0,
            tpot_s: 0.025,
        };
        assert_eq!(
            Layout::Colocated { threads: 2 }.up_flags(slo),
            ["--colocated", "--threads", "2"]
        );
        assert_eq!(
            Layout::Pinned {
                prefill: 1,
                decode: 1
            }
            .up_flags(slo)
            .join(" "),
            "--pin --prefill 1 --decode 1 --slo-ttft-ms 3000 --slo-tpot-ms 25"
        );
    }
}
