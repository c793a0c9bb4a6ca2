//! The overlay `tandem plan --pods --emit-kustomize DIR` writes: on top of the deployment's
//! kustomization (`deploy/kubernetes/base` by default), the planned pool sizes, each worker
//! pod's cores (its CPU request and `--threads`), the SLO the scheduler places prompts for, and
//! the cost profile it places them with — a ConfigMap generated from a copy of the profile,
//! mounted into the scheduler and named by `TANDEM_COST_PROFILE`.

use anyhow::Context;
use scheduler::plan::capacity::Candidate;
use scheduler::plan::layout::Layout;
use scheduler::plan::placement::Slo;
use scheduler::plan::workload::Workload;
use std::path::{Component, Path, PathBuf};

/// Where the scheduler finds the profile.
const MOUNT: &str = "/etc/tandem/cost-profile";

/// Writes `dir/kustomization.yaml` and `dir/cost-profile.json`; returns the first.
pub fn write(
    dir: &Path,
    base: &Path,
    profile: &Path,
    chosen: &Candidate,
    w: &Workload,
    slo: Slo,
) -> anyhow::Result<PathBuf> {
    let Layout::Pods {
        prefill,
        decode,
        threads,
    } = chosen.layout
    else {
        anyhow::bail!("an overlay is written for pods (--pods)");
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(profile, dir.join("cost-profile.json"))
        .with_context(|| format!("copying {}", profile.display()))?;
    let base = relative(base, dir)?;
    let p = chosen.prediction;
    let worker = |name: &str| {
        format!(
            "  - target: {{kind: Deployment, name: {name}}}\n    patch: |-\n      \
             - {{op: add, path: /spec/template/spec/containers/0/args/-, value: --threads={threads}}}\n      \
             - {{op: replace, path: /spec/template/spec/containers/0/resources/requests/cpu, value: \"{threads}\"}}\n"
        )
    };
    let text = format!(
        "# Written by `tandem plan --pods --emit-kustomize` (run it again to re-plan):\n\
         #   workload: {prompts} prompt tokens, {osl} output tokens, {rate} req/s (Poisson)\n\
         #   SLO: TTFT <= {ttft:.0} ms, TPOT <= {tpot:.0} ms\n\
         #   plan: {layout}{misses}\n\
         #   predicted: median TTFT {pttft:.0} ms (p90 {pttft90:.0}), median TPOT {ptpot:.1} ms, attainment {att:.2}\n\
         #   cost-profile.json: the profile it planned with, measured on a node of the pools' type\n\
         #   (`tandem plan profile --out cost-profile.json`); the scheduler places each prompt with it.\n\
         apiVersion: kustomize.config.k8s.io/v1beta1\n\
         kind: Kustomization\n\
         resources:\n  - {base}\n\
         configMapGenerator:\n  - name: tandem-cost-profile\n    files: [cost-profile.json]\n\
         replicas:\n  - {{name: tandem-prefill, count: {prefill}}}\n  - {{name: tandem-decode, count: {decode}}}\n\
         patches:\n  - target: {{kind: Deployment, name: tandem-scheduler}}\n    patch: |-\n      \
         - {{op: add, path: /spec/template/spec/containers/0/args/-, value: --slo-ttft-ms={ttft:.0}}}\n      \
         - {{op: add, path: /spec/template/spec/containers/0/args/-, value: --slo-tpot-ms={tpot:.0}}}\n      \
         - {{op: add, path: /spec/template/spec/containers/0/env/-, value: {{name: TANDEM_COST_PROFILE, value: {MOUNT}/cost-profile.json}}}}\n      \
         - {{op: add, path: /spec/template/spec/containers/0/volumeMounts/-, value: {{name: cost-profile, mountPath: {MOUNT}, readOnly: true}}}}\n      \
         - {{op: add, path: /spec/template/spec/volumes/-, value: {{name: cost-profile, configMap: {{name: tandem-cost-profile}}}}}}\n\
         {prefill_patch}{decode_patch}",
        prompts = w.prompts,
        osl = w.osl,
        rate = w.rate,
        ttft = slo.ttft_s * 1e3,
        tpot = slo.tpot_s * 1e3,
        layout = chosen.layout,
        misses = if p.meets {
            ""
        } else {
            " (none of the splits tried meets the SLO: this one comes closest)"
        },
        pttft = p.ttft_s * 1e3,
        pttft90 = p.ttft_p90_s * 1e3,
        ptpot = p.tpot_s * 1e3,
        att = p.attainment,
        base = base.display(),
        prefill_patch = worker("tandem-prefill"),
        decode_patch = worker("tandem-decode"),
    );
    let out = dir.join("kustomization.yaml");
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// `target` as a path relative to `from` (kustomize wants relative resources).
fn relative(target: &Path, from: &Path) -> anyhow::Result<PathBuf> {
    let canon = |p: &Path| {
        p.canonicalize()
            .with_context(|| format!("finding {}", p.display()))
    };
    let (t, f) = (canon(target)?, canon(from)?);
    let (tc, fc): (Vec<Component>, Vec<Component>) =
        (t.components().collect(), f.components().collect());
    let common = tc.iter().zip(&fc).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..fc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c);
    }
    Ok(if rel.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        rel
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_climb_to_the_common_root() {
        let root = std::env::temp_dir().join(format!("tandem-rel-{}", std::process::id()));
        let (a, b) = (
            root.join("deploy/kubernetes/base"),
            root.join("out/planned"),
        );
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(
            relative(&a, &b).unwrap(),
            PathBuf::from("../../deploy/kubernetes/base")
        );
        assert_eq!(relative(&b, &b).unwrap(), PathBuf::from("."));
        assert!(relative(&root.join("missing"), &b).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
