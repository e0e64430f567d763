//! The deployment as users start it: `compose.yaml` unchanged, with the images
//! `scripts/images.sh` builds locally swapped in through its `MILLRACE_*_IMAGE` variables and
//! its host ports moved to free ones through its `MILLRACE_*_PORT` variables. [`Stack`] drives
//! the Compose tool this machine has (v2's `docker compose`, else Debian's `docker-compose`
//! 1.29) and is torn down (`down -v`) when dropped; `tests/compose.rs` is the scenario.
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::process::Command;

/// The seven services, in the order the stage graph runs them.
pub const SERVICES: [&str; 7] = ["ingest", "preprocess", "moderation", "session", "batcher", "inference", "sink"];
/// What `up` must bring to healthy besides the services (the observability profile stays off).
pub const INFRASTRUCTURE: [&str; 3] = ["nats", "postgres", "prometheus"];
/// The API key compose.yaml turns on by default (its digest is the default `MILLRACE_API_KEYS`).
pub const DEV_API_KEY: &str = "millrace-dev-key";

/// Whether a Docker engine answers; `Err` says why not.
pub async fn docker_available() -> Result<(), String> {
    match Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output().await {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("the Docker engine does not answer: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(format!("no docker client: {e}")),
    }
}

/// Which Compose this machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// The `docker compose` plugin: has `up --wait`.
    V2,
    /// The standalone `docker-compose` 1.x: no `--wait`, so health is polled.
    V1,
}

impl Tool {
    pub async fn detect() -> anyhow::Result<Tool> {
        let v2 = Command::new("docker").args(["compose", "version"]).output().await;
        if v2.is_ok_and(|out| out.status.success()) {
            return Ok(Tool::V2);
        }
        let v1 = Command::new("docker-compose").arg("version").output().await;
        if v1.is_ok_and(|out| out.status.success()) {
            return Ok(Tool::V1);
        }
        bail!("neither `docker compose` nor `docker-compose` is installed")
    }
}

/// The host ports the stack publishes, each a free one, and the variable compose.yaml reads it
/// from.
#[derive(Debug, Clone)]
pub struct Ports {
    pub ingest_http: u16,
    pub ingest_grpc: u16,
    pub sink_http: u16,
    pub sink_grpc: u16,
    pub inference_grpc: u16,
    pub prometheus: u16,
    pub nats: u16,
    pub nats_monitor: u16,
}

impl Ports {
    pub fn free() -> anyhow::Result<Ports> {
        Ok(Ports {
            ingest_http: free_port()?,
            ingest_grpc: free_port()?,
            sink_http: free_port()?,
            sink_grpc: free_port()?,
            inference_grpc: free_port()?,
            prometheus: free_port()?,
            nats: free_port()?,
            nats_monitor: free_port()?,
        })
    }

    fn variables(&self) -> [(&'static str, u16); 8] {
        [
            ("MILLRACE_INGEST_HTTP_PORT", self.ingest_http),
            ("MILLRACE_INGEST_GRPC_PORT", self.ingest_grpc),
            ("MILLRACE_SINK_HTTP_PORT", self.sink_http),
            ("MILLRACE_SINK_GRPC_PORT", self.sink_grpc),
            ("MILLRACE_INFERENCE_GRPC_PORT", self.inference_grpc),
            ("MILLRACE_PROMETHEUS_PORT", self.prometheus),
            ("MILLRACE_NATS_PORT", self.nats),
            ("MILLRACE_NATS_MONITOR_PORT", self.nats_monitor),
        ]
    }

    pub fn ingest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ingest_http)
    }
    pub fn ingest_grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ingest_grpc)
    }
    pub fn sink_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.sink_http)
    }
    pub fn prometheus_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.prometheus)
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Builds (or finds) every image with `scripts/images.sh --env` and returns the variables it
/// printed (`MILLRACE_IMAGE`, `MILLRACE_NATS_IMAGE`, …).
pub async fn build_images(root: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let out = Command::new("bash")
        .arg(root.join("scripts/images.sh"))
        .arg("--env")
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .context("running scripts/images.sh")?;
    ensure!(out.status.success(), "scripts/images.sh failed ({})", out.status);
    let vars: Vec<(String, String)> = String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    ensure!(vars.iter().any(|(k, _)| k == "MILLRACE_IMAGE"), "scripts/images.sh printed no MILLRACE_IMAGE");
    Ok(vars)
}

/// One started compose project; dropped, it is torn down with `down -v` (its logs saved first).
pub struct Stack {
    tool: Tool,
    project: String,
    root: PathBuf,
    env: Vec<(String, String)>,
    pub ports: Ports,
    /// Where logs go when the stack is dropped.
    log_dir: PathBuf,
    down: bool,
}

impl Stack {
    /// A project named `project` over `root/compose.yaml` with the image variables `images`.
    pub fn new(
        tool: Tool,
        project: &str,
        root: &Path,
        images: Vec<(String, String)>,
        ports: Ports,
        log_dir: &Path,
    ) -> Stack {
        let mut env = images;
        env.extend(ports.variables().iter().map(|(k, v)| ((*k).to_owned(), v.to_string())));
        Stack {
            tool,
            project: project.to_owned(),
            root: root.to_owned(),
            env,
            ports,
            log_dir: log_dir.to_owned(),
            down: false,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = match self.tool {
            Tool::V2 => {
                let mut c = Command::new("docker");
                c.arg("compose");
                c
            }
            Tool::V1 => Command::new("docker-compose"),
        };
        command
            .args(["-p", &self.project, "-f"])
            .arg(self.root.join("compose.yaml"))
            .args(args)
            .current_dir(&self.root)
            // The shell's own values must not leak in: only what this stack sets.
            .env_remove("COMPOSE_PROFILES")
            .env_remove("MILLRACE_OTLP_ENDPOINT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true);
        command
    }

    /// Runs `compose <args>`; `Err` with its output when it fails.
    pub async fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output().await.with_context(|| format!("compose {args:?}"))?;
        checked(out, &format!("compose {}", args.join(" ")))
    }

    /// `up -d` of everything (the default profile), waiting until every container is healthy:
    /// v2's `--wait`, or polling the health checks under v1. Returns how long it took.
    pub async fn up(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        match self.tool {
            Tool::V2 => {
                let secs = timeout.as_secs().to_string();
                self.compose(&["up", "-d", "--no-build", "--wait", "--wait-timeout", &secs]).await?;
            }
            Tool::V1 => {
                self.compose(&["up", "-d", "--no-build"]).await?;
                self.wait_healthy(&all_services(), timeout).await?;
            }
        }
        Ok(started.elapsed())
    }

    /// Brings `service` back after it was stopped or killed (`up -d` of that one service).
    pub async fn up_service(&self, service: &str) -> anyhow::Result<()> {
        self.compose(&["up", "-d", "--no-build", "--no-deps", service]).await.map(drop)
    }

    /// The health of `service`'s container (`healthy`, `starting`, `unhealthy`, or the state
    /// when it is not running).
    pub async fn health(&self, service: &str) -> anyhow::Result<String> {
        let id = self.compose(&["ps", "-q", service]).await?.trim().to_owned();
        if id.is_empty() {
            return Ok("absent".into());
        }
        let out = Command::new("docker")
            .args(["inspect", "-f", "{{if .State.Running}}{{if .State.Health}}{{.State.Health.Status}}{{else}}running{{end}}{{else}}{{.State.Status}}{{end}}", &id])
            .output()
            .await?;
        Ok(checked(out, "docker inspect")?.trim().to_owned())
    }

    /// Waits until every one of `services` is healthy; `Err` names those that are not.
    pub async fn wait_healthy(&self, services: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut unhealthy = Vec::new();
            for service in services {
                let health = self.health(service).await?;
                if health != "healthy" {
                    unhealthy.push(format!("{service}: {health}"));
                }
            }
            if unhealthy.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not healthy within {timeout:?}: {}", unhealthy.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Runs SQL in the PostgreSQL container (`psql -At`), returning its output.
    pub async fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.compose(&["exec", "-T", "postgres", "psql", "-U", "millrace", "-d", "millrace", "-At", "-c", sql]).await
    }

    /// Saves every container's log under the log folder.
    pub async fn save_logs(&self) {
        let _ = std::fs::create_dir_all(&self.log_dir);
        for service in all_services() {
            if let Ok(out) = self.command(&["logs", "--no-color", "--timestamps", service]).output().await {
                let mut text = out.stdout;
                text.extend_from_slice(&out.stderr);
                let _ = std::fs::write(self.log_dir.join(format!("{service}.log")), text);
            }
        }
    }

    /// `down -v`, then what is left of the project: containers, volumes and networks carrying
    /// its label (empty when the tear-down was complete).
    pub async fn down(&mut self) -> anyhow::Result<Vec<String>> {
        self.down = true;
        self.compose(&["down", "-v", "--remove-orphans", "--timeout", "45"]).await?;
        let label = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        let listings: [(&str, &[&str]); 3] =
            [("container", &["ps", "-aq"]), ("volume", &["volume", "ls", "-q"]), ("network", &["network", "ls", "-q"])];
        for (kind, args) in listings {
            let out = Command::new("docker").args(args).args(["--filter", &label]).output().await?;
            left.extend(checked(out, "docker ls")?.lines().map(|id| format!("{kind} {id}")));
        }
        Ok(left)
    }
}

impl Drop for Stack {
    /// A failed run still leaves nothing running: logs saved, then `down -v`.
    fn drop(&mut self) {
        if self.down {
            return;
        }
        let handle = tokio::runtime::Handle::try_current();
        let teardown = async {
            self.save_logs().await;
            let _ = self.down().await;
        };
        match handle {
            Ok(handle) => tokio::task::block_in_place(|| handle.block_on(teardown)),
            Err(_) => {
                if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    runtime.block_on(teardown);
                }
            }
        }
    }
}

/// Every service `up` starts and must bring to healthy.
pub fn all_services() -> Vec<&'static str> {
    INFRASTRUCTURE.iter().chain(SERVICES.iter()).copied().collect()
}

fn checked(out: Output, what: &str) -> anyhow::Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}
