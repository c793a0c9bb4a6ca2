//! What a Tandem process does to itself: pinning to cores, sizing the compute pools, finding
//! the model file, waiting for a stop signal.

use std::path::{Path, PathBuf};

/// Pins the calling thread (and every thread it starts later) to `cpus`.
pub fn pin(cpus: &[usize]) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            anyhow::ensure!(c < libc::CPU_SETSIZE as usize, "core {c} is out of range");
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "pinning to cores {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The cores this process may run on (its affinity mask and cgroup quota).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sizes the kernels' compute pool and rayon's pool (used only to load weights in parallel);
/// default: every core. Returns the thread count.
pub fn init_compute_threads(threads: Option<usize>) -> anyhow::Result<usize> {
    let n = threads.unwrap_or_else(cores);
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("starting the compute thread pool: {e}"))?;
    Ok(kernels::pool::init(n))
}

/// The GGUF to load: the given path, or the default model (fetched into the cache if needed).
pub fn model_path(model: Option<&Path>) -> anyhow::Result<PathBuf> {
    match model {
        Some(p) => Ok(p.to_path_buf()),
        None => engine::fetch::ensure(
            &engine::fetch::DEFAULT_MODEL,
            &engine::fetch::cache_dir(),
            &|m| eprintln!("tandem: {m}"),
        )
        .map_err(|e| anyhow::anyhow!("fetching the default model: {e}")),
    }
}

/// The hyper-parameters of the model at `model` (default: the default model).
pub fn model_config(model: Option<&Path>) -> anyhow::Result<engine::config::LlamaConfig> {
    let g = engine::gguf::GgufFile::open(model_path(model)?)?;
    Ok(engine::config::LlamaConfig::from_metadata(&g)?)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A multi-threaded runtime of two I/O threads (compute runs on the kernels' own pool).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Raises this process's open-file limit to its hard limit: a server holding thousands of
/// client connections (and the connection caps above) needs more than the usual soft 1024.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit write and read the one struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
                l.rlim_cur = l.rlim_max;
                libc::setrlimit(libc::RLIMIT_NOFILE, &l);
            }
        }
    }
}
