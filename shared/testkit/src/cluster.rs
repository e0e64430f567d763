//! A JetStream cluster of real `nats-server` processes owned by a test: each node a
//! [`NatsServer`] with its own store, client and monitoring ports it picks itself, and routes
//! to every other node.
//!
//! JetStream in a cluster refuses to start without configured routes, so every node must know
//! the others' cluster ports before it starts: those ports alone are reserved by the test kit
//! (bound to port 0 and released just before the nodes start). Should another process take one
//! in between, the node's start fails and the whole cluster is started again on fresh ports.
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{NatsOptions, NatsServer};

/// The cluster's name (`--cluster_name`).
pub const CLUSTER_NAME: &str = "millrace";
/// How long the nodes may take to elect a JetStream meta leader that all of them know.
const FORMED: Duration = Duration::from_secs(30);
/// Whole-cluster starts tried when a reserved cluster port was taken meanwhile.
const STARTS: usize = 3;

/// What every node of a [`NatsCluster`] shares.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Each node's store is `<store_root>/<node name>` (kept); `None`: temp folders.
    pub store_root: Option<PathBuf>,
    /// Each node's ports file and log are under `<run_root>/<node name>`; `None`: temp folders.
    pub run_root: Option<PathBuf>,
    /// A configuration file every node starts with (see [`NatsOptions::config`]).
    pub config: Option<String>,
}

/// One node: its server name (`-n`) and its process.
pub struct Node {
    pub name: String,
    pub server: NatsServer,
}

/// `size` nodes routed to each other, killed on drop.
pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Three nodes, the smallest cluster that keeps a quorum when one is lost.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(3, ClusterOptions::default()).await
    }

    /// `size` nodes named `n1`, `n2`, …; returns once every node is ready and knows the same
    /// JetStream meta leader.
    pub async fn start_with(size: usize, options: ClusterOptions) -> anyhow::Result<Self> {
        let mut last = None;
        for attempt in 1..=STARTS {
            match Self::try_start(size, &options).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) => {
                    eprintln!("nats cluster start {attempt}/{STARTS} failed: {e:#}");
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one start").context(format!("starting a {size}-node nats cluster")))
    }

    async fn try_start(size: usize, options: &ClusterOptions) -> anyhow::Result<Self> {
        let ports = reserve_ports(size)?;
        let route = |port: u16| format!("nats://127.0.0.1:{port}");
        let routes = ports.iter().map(|&p| route(p)).collect::<Vec<_>>().join(",");
        // One after another: each start returns once its own JetStream is enabled, before any
        // quorum, and the meta leader is awaited once all of them run.
        let mut nodes = Vec::with_capacity(size);
        for (i, &port) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let node_options = NatsOptions {
                store_dir: options.store_root.as_ref().map(|root| root.join(&name)),
                run_dir: options.run_root.as_ref().map(|root| root.join(&name)),
                // A route to itself is recognised and dropped by the server.
                args: vec![
                    "-n".into(),
                    name.clone(),
                    "--cluster_name".into(),
                    CLUSTER_NAME.into(),
                    "--cluster".into(),
                    route(port),
                    "--routes".into(),
                    routes.clone(),
                ],
                config: options.config.clone(),
            };
            let server = NatsServer::start_with(node_options).await.with_context(|| format!("node {name}"))?;
            nodes.push(Node { name, server });
        }
        let cluster = Self { nodes };
        cluster.wait_formed(FORMED).await?;
        Ok(cluster)
    }

    /// Waits until every running node answers `/healthz` (JetStream current) and reports the
    /// same meta leader over `size` peers.
    pub async fn wait_formed(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            let mut leaders = Vec::new();
            let mut why = String::new();
            for node in self.nodes.iter().filter(|n| n.server.pid().is_some()) {
                let monitor = node.server.monitor_url();
                let healthy =
                    matches!(http.get(format!("{monitor}/healthz")).send().await, Ok(r) if r.status().is_success());
                let jsz: Option<serde_json::Value> = match http.get(format!("{monitor}/jsz")).send().await {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                let meta = jsz.as_ref().map(|j| &j["meta_cluster"]);
                let leader = meta.and_then(|m| m["leader"].as_str()).unwrap_or_default().to_owned();
                let size = meta.and_then(|m| m["cluster_size"].as_u64()).unwrap_or(0) as usize;
                if !healthy || leader.is_empty() || size != self.nodes.len() {
                    why = format!("{}: healthy {healthy}, meta leader {leader:?}, cluster size {size}", node.name);
                }
                leaders.push(leader);
            }
            leaders.dedup();
            if why.is_empty() && leaders.len() == 1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    self.nodes.iter().map(|n| format!("--- {}:\n{}", n.name, n.server.log())).collect();
                bail!(
                    "the cluster did not form within {timeout:?} ({why}; leaders {leaders:?}); logs:\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node's client URL, comma-separated (what `--nats-url` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| n.server.url()).collect::<Vec<_>>().join(",")
    }

    /// The client URLs of the nodes other than `name`, comma-separated.
    pub fn urls_except(&self, name: &str) -> String {
        self.nodes.iter().filter(|n| n.name != name).map(|n| n.server.url()).collect::<Vec<_>>().join(",")
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node named `name` (`n1`, …).
    pub fn node(&self, name: &str) -> anyhow::Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).with_context(|| format!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        self.nodes.iter_mut().find(|n| n.name == name).with_context(|| format!("no node {name}"))
    }

    /// Kills the node (SIGKILL), keeping its store.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        self.node_mut(name)?.server.kill();
        Ok(())
    }

    /// Starts a killed node again on its store, its client port and its cluster port.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        self.node_mut(name)?.server.restart().await
    }

    /// Every node's log, by name.
    pub fn logs(&self) -> Vec<(String, String)> {
        self.nodes.iter().map(|n| (n.name.clone(), n.server.log())).collect()
    }
}

/// `n` distinct free ports on 127.0.0.1, released on return (see the module's note).
fn reserve_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<Vec<_>, _>>()?)
}
