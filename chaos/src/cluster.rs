//! The `cluster` schedule's NATS: three `nats-server` containers on a private Docker network,
//! routed to each other by name (`n1`, `n2`, `n3`), each with its own store inside its
//! container (kept across `docker kill` + `docker start`). Each publishes its client and
//! monitoring ports on 127.0.0.1 at host ports fixed when it is created, so a restarted or
//! reconnected container is found where it was; the services run on the host and are given
//! the three client URLs (`--nats-url=nats://127.0.0.1:a,…`). The servers run with
//! `--no_advertise`: they do not tell clients the addresses they know each other by (container
//! addresses the host cannot route to), so clients use only the list they were given.
//!
//! The image is `$MILLRACE_NATS_IMAGE`, else the one `scripts/images.sh nats` builds from the
//! project's static nats-server on the local Debian base (no registry is reached).
use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;

/// The nodes' names, which are also their host names on the network.
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// How long the nodes may take to elect a JetStream meta leader all of them know.
const FORMED: Duration = Duration::from_secs(60);

/// One container.
#[derive(Debug, Clone)]
pub struct Container {
    /// `n1`, `n2`, `n3`: the server name and the host name on the network.
    pub node: String,
    /// The container's name (`millrace-chaos-<run>-n1`).
    pub name: String,
    pub client_port: u16,
    pub monitor_port: u16,
}

impl Container {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }
    fn monitor(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }
}

/// The three containers and their network; removed on drop.
pub struct DockerCluster {
    pub network: String,
    pub containers: Vec<Container>,
}

/// Runs `docker <args>`: its stdout, or an error with its stderr.
pub async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running docker")?;
    if !out.status.success() {
        bail!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether a Docker engine answers; `Err` says why not (the test skips or fails on it).
pub fn docker_available() -> Result<(), String> {
    match std::process::Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("docker info failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(format!("no docker command: {e}")),
    }
}

/// The NATS image: `$MILLRACE_NATS_IMAGE`, else what `scripts/images.sh --env nats` builds
/// (or finds already built) and names.
pub fn nats_image() -> Result<String, String> {
    if let Ok(image) = std::env::var("MILLRACE_NATS_IMAGE")
        && !image.is_empty()
    {
        return Ok(image);
    }
    let script = millrace_testkit::workspace_root().join("scripts/images.sh");
    let out = std::process::Command::new(&script)
        .args(["--env", "nats"])
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let named = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export MILLRACE_NATS_IMAGE="))
        .map(str::to_owned);
    // The image it names, once the engine has it (whatever the script's exit status says).
    let present = |image: &str| {
        std::process::Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    match named {
        Some(image) if present(&image) => Ok(image),
        _ => Err(format!(
            "{} --env nats built no NATS image ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// Free host ports, released on return: the containers publish on them right after.
fn reserve_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<Vec<_>, _>>()?)
}

impl DockerCluster {
    /// Creates the network and the three containers (names prefixed with `prefix`) and waits
    /// until every node is healthy and knows the same meta leader.
    pub async fn start(prefix: &str, image: &str) -> anyhow::Result<DockerCluster> {
        let network = format!("{prefix}-net");
        docker(&["network", "create", &network]).await.context("creating the network")?;
        let ports = reserve_ports(2 * NODES.len())?;
        let containers: Vec<Container> = NODES
            .iter()
            .enumerate()
            .map(|(i, node)| Container {
                node: (*node).to_owned(),
                name: format!("{prefix}-{node}"),
                client_port: ports[2 * i],
                monitor_port: ports[2 * i + 1],
            })
            .collect();
        let cluster = DockerCluster { network, containers };
        let routes = NODES.iter().map(|n| format!("nats://{n}:6222")).collect::<Vec<_>>().join(",");
        for c in &cluster.containers {
            let client = format!("127.0.0.1:{}:4222", c.client_port);
            let monitor = format!("127.0.0.1:{}:8222", c.monitor_port);
            #[rustfmt::skip]
            let args = [
                "run", "-d", "--name", &c.name, "--hostname", &c.node, "--network", &cluster.network,
                "--network-alias", &c.node, "-p", &client, "-p", &monitor, image,
                "nats-server", "-js", "-n", &c.node, "--cluster_name", "millrace",
                "--cluster", "nats://0.0.0.0:6222", "--routes", &routes, "-sd", "/data", "-m", "8222",
                "--no_advertise",
            ];
            docker(&args).await.with_context(|| format!("starting {}", c.name))?;
        }
        cluster.wait_formed(FORMED).await?;
        Ok(cluster)
    }

    /// The client URLs, comma-separated (`--nats-url`).
    pub fn urls(&self) -> String {
        self.containers.iter().map(Container::url).collect::<Vec<_>>().join(",")
    }

    pub fn container(&self, node: &str) -> anyhow::Result<&Container> {
        self.containers.iter().find(|c| c.node == node).with_context(|| format!("no node {node}"))
    }

    /// Waits until every node answers `/healthz` 200 (JetStream current) and all report the
    /// same meta leader.
    pub async fn wait_formed(&self, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut leaders = Vec::new();
            let mut unhealthy = Vec::new();
            for c in &self.containers {
                let healthy = matches!(http.get(format!("{}/healthz", c.monitor())).send().await, Ok(r) if r.status().is_success());
                let jsz: Option<serde_json::Value> = match http.get(format!("{}/jsz", c.monitor())).send().await {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                let leader = jsz.as_ref().and_then(|j| j["meta_cluster"]["leader"].as_str()).unwrap_or("").to_owned();
                if !healthy || leader.is_empty() {
                    unhealthy.push(c.node.clone());
                }
                leaders.push(leader);
            }
            leaders.dedup();
            if unhealthy.is_empty() && leaders.len() == 1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the NATS containers did not form a cluster within {timeout:?}: unhealthy {unhealthy:?}, meta leaders {leaders:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `docker kill` (SIGKILL) of a node's container; its store stays in the container.
    pub async fn kill(&self, node: &str) -> anyhow::Result<()> {
        docker(&["kill", &self.container(node)?.name]).await.map(drop)
    }

    /// `docker start` of a killed node, on the same published ports.
    pub async fn start_node(&self, node: &str) -> anyhow::Result<()> {
        docker(&["start", &self.container(node)?.name]).await.map(drop)
    }

    /// Cuts a node off the network: from the other nodes and from the host alike.
    pub async fn disconnect(&self, node: &str) -> anyhow::Result<()> {
        docker(&["network", "disconnect", &self.network, &self.container(node)?.name]).await.map(drop)
    }

    /// Connects a cut-off node again, under its name.
    pub async fn connect(&self, node: &str) -> anyhow::Result<()> {
        let c = self.container(node)?;
        docker(&["network", "connect", "--alias", &c.node, &self.network, &c.name]).await.map(drop)
    }

    /// Every container's log (`docker logs`), by label `nats-n1`, ….
    pub async fn logs(&self) -> Vec<(String, String)> {
        let mut logs = Vec::new();
        for c in &self.containers {
            let out = tokio::process::Command::new("docker").args(["logs", &c.name]).output().await;
            let text = out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).unwrap_or_default();
            logs.push((format!("nats-{}", c.node), text));
        }
        logs
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = std::process::Command::new("docker").args(["rm", "-f", &c.name]).output();
        }
        let _ = std::process::Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}

/// The leader (server name) of each of `streams`; a stream without one (an election under
/// way, or its info not answered) maps to `None`.
pub async fn stream_leaders(js: &jetstream::Context, streams: &[String]) -> Vec<(String, Option<String>)> {
    let mut leaders = Vec::new();
    for name in streams {
        let leader = tokio::time::timeout(Duration::from_secs(2), async {
            let mut stream = js.get_stream(name).await.ok()?;
            stream.info().await.ok()?.cluster.as_ref()?.leader.clone()
        })
        .await
        .unwrap_or_default();
        leaders.push((name.clone(), leader));
    }
    leaders
}

/// Whether every one of `streams` has a leader and all its peers current (none offline).
pub async fn all_current(js: &jetstream::Context, streams: &[String]) -> bool {
    for name in streams {
        let current = tokio::time::timeout(Duration::from_secs(2), async {
            let mut stream = js.get_stream(name).await.ok()?;
            let info = stream.info().await.ok()?;
            let cluster = info.cluster.as_ref()?;
            Some(
                cluster.leader.is_some()
                    && cluster.replicas.len() + 1 == info.config.num_replicas
                    && cluster.replicas.iter().all(|p| p.current && !p.offline),
            )
        })
        .await;
        if current != Ok(Some(true)) {
            return false;
        }
    }
    true
}
