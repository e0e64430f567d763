//! The mesh as the suite runs it: nats-server on a store in the run folder (file storage, so a
//! broker restart keeps the streams), or for the `cluster` schedule three nats-server
//! containers with R3 streams ([`crate::cluster`]); the seven services as processes with every
//! log kept in the run folder across restarts, two inference replicas, a SQLite sink in the run
//! folder.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use millrace_testkit::{NatsOptions, NatsServer, ServiceOptions, ServiceProcess};

use crate::cluster::DockerCluster;
use crate::config::{Plan, Schedule};

/// How long a service may take to become ready (a debug build loading its models).
pub const READY: Duration = Duration::from_secs(120);

/// One service process and the label the report names it by (`inference-1`, `sink`, …).
pub struct Service {
    pub label: String,
    pub process: ServiceProcess,
}

/// NATS and the services; services are declared first so they stop before NATS.
pub struct ChaosMesh {
    pub services: Vec<Service>,
    pub nats: Broker,
    pub run_dir: PathBuf,
}

/// The mesh's NATS: one server process, or three containers.
pub enum Broker {
    Process(NatsServer),
    Cluster(DockerCluster),
}

impl Broker {
    /// What the services' `--nats-url` is: one URL, or the three nodes' comma-separated.
    pub fn url(&self) -> String {
        match self {
            Broker::Process(nats) => nats.url(),
            Broker::Cluster(cluster) => cluster.urls(),
        }
    }

    /// The server process (the single-server schedules).
    pub fn process_mut(&mut self) -> anyhow::Result<&mut NatsServer> {
        match self {
            Broker::Process(nats) => Ok(nats),
            Broker::Cluster(_) => anyhow::bail!("NATS runs as a cluster of containers in this schedule"),
        }
    }

    /// The containers (the `cluster` schedule).
    pub fn cluster(&self) -> anyhow::Result<&DockerCluster> {
        match self {
            Broker::Cluster(cluster) => Ok(cluster),
            Broker::Process(_) => anyhow::bail!("NATS is a single server in this schedule"),
        }
    }
}

/// Where things are: binaries, models, and for the `cluster` schedule the NATS image.
#[derive(Debug, Clone)]
pub struct Paths {
    pub bin_dir: Option<PathBuf>,
    pub models_dir: PathBuf,
    pub nats_image: Option<String>,
}

impl ChaosMesh {
    /// Starts NATS, then every service but ingest side by side, then ingest (told where the
    /// sink, moderation and inference listen).
    pub async fn start(plan: &Plan, paths: &Paths, run_id: &str, run_dir: &Path) -> anyhow::Result<ChaosMesh> {
        let logs = run_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let (nats, replicas) = if plan.schedule == Schedule::Cluster {
            let image = paths.nats_image.as_deref().context("the cluster schedule needs a NATS image")?;
            let cluster = DockerCluster::start(&format!("millrace-chaos-{run_id}"), image)
                .await
                .context("starting the NATS containers")?;
            (Broker::Cluster(cluster), 3)
        } else {
            let nats = NatsServer::start_with(NatsOptions {
                store_dir: Some(run_dir.join("nats-store")),
                run_dir: Some(logs.clone()),
                ..Default::default()
            })
            .await
            .context("starting nats-server")?;
            (Broker::Process(nats), 1)
        };
        // Every service shares the bus flags: file streams (replicated on the cluster), the
        // short ack wait, small streams.
        let bus = vec![
            format!("--nats-url={}", nats.url()),
            "--stream-storage=file".to_owned(),
            format!("--stream-replicas={replicas}"),
            format!("--ack-wait-s={}", plan.ack_wait_s),
            format!("--stream-max-msgs={}", plan.stream_max_msgs),
        ];
        let models = format!("--models-dir={}", paths.models_dir.display());
        let start = |label: &'static str, name: &'static str, own: Vec<String>, listen: &'static [&'static str]| {
            let mut args = bus.clone();
            args.extend(own);
            let options = ServiceOptions {
                program: paths.bin_dir.as_ref().map(|dir| dir.join(name)),
                log: Some(logs.join(format!("{label}.log"))),
                env: Vec::new(),
            };
            async move {
                let process = ServiceProcess::start_with(name, &args, listen, READY, options)
                    .await
                    .with_context(|| format!("starting {label}"))?;
                anyhow::Ok(Service { label: label.to_owned(), process })
            }
        };
        let db = format!("--database-url=sqlite://{}", run_dir.join("sink.db").display());
        let inference = || vec![models.clone(), format!("--model={}", plan.model)];
        let (sink, inference_1, inference_2, batcher, session, moderation, preprocess) = tokio::try_join!(
            start("sink", "sink", vec![db], &["--http-addr", "--grpc-addr"]),
            start("inference-1", "inference", inference(), &["--grpc-addr"]),
            start("inference-2", "inference", inference(), &["--grpc-addr"]),
            start("batcher", "batcher", vec![], &[]),
            start("session", "session", vec![models.clone()], &["--grpc-addr"]),
            start("moderation", "moderation", vec![models.clone()], &["--grpc-addr"]),
            start("preprocess", "preprocess", vec![models.clone()], &[]),
        )?;
        let ingest_args = vec![
            format!("--sink-url=http://{}", sink.process.addr("--http-addr")),
            format!("--moderation-url=http://{}", moderation.process.addr("--grpc-addr")),
            format!("--inference-url=http://{}", inference_1.process.addr("--grpc-addr")),
            format!("--allowed-models={}", plan.model),
        ];
        let ingest = start("ingest", "ingest", ingest_args, &["--http-addr", "--grpc-addr"]).await?;
        Ok(ChaosMesh {
            services: vec![sink, inference_1, inference_2, batcher, session, moderation, preprocess, ingest],
            nats,
            run_dir: run_dir.to_owned(),
        })
    }

    pub fn service(&self, label: &str) -> anyhow::Result<&Service> {
        self.services.iter().find(|s| s.label == label).with_context(|| format!("no service {label}"))
    }

    pub fn service_mut(&mut self, label: &str) -> anyhow::Result<&mut Service> {
        self.services.iter_mut().find(|s| s.label == label).with_context(|| format!("no service {label}"))
    }

    /// Ingest's HTTP API.
    pub fn ingest_http(&self) -> SocketAddr {
        self.service("ingest").expect("ingest runs").process.addr("--http-addr")
    }

    /// The sink's SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.run_dir.join("sink.db")
    }

    /// Each service's `/readyz` answer (true: 200).
    pub async fn readiness(&self) -> Vec<(String, bool)> {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("an HTTP client");
        let mut ready = Vec::new();
        for service in &self.services {
            let url = format!("http://{}/readyz", service.process.admin());
            let ok = matches!(client.get(&url).send().await, Ok(r) if r.status().is_success());
            ready.push((service.label.clone(), ok));
        }
        ready
    }

    /// Waits until every service answers `/readyz` with 200; the labels still unready on timeout.
    pub async fn wait_all_ready(&self, timeout: Duration) -> Result<(), Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let unready: Vec<String> =
                self.readiness().await.into_iter().filter(|(_, ok)| !ok).map(|(label, _)| label).collect();
            if unready.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(unready);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every process's id by label (`nats-server` too), for RSS sampling.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut pids: Vec<(String, u32)> =
            self.services.iter().filter_map(|s| Some((s.label.clone(), s.process.pid()?))).collect();
        if let Broker::Process(nats) = &self.nats
            && let Some(pid) = nats.pid()
        {
            pids.push(("nats-server".into(), pid));
        }
        pids
    }

    /// Every log: each service's (all its starts) and the server's, or each container's (also
    /// written to the run folder's `logs/`).
    pub async fn logs(&self) -> Vec<(String, String)> {
        let mut logs: Vec<(String, String)> =
            self.services.iter().map(|s| (s.label.clone(), s.process.logs())).collect();
        match &self.nats {
            Broker::Process(nats) => logs.push(("nats-server".into(), nats.log())),
            Broker::Cluster(cluster) => {
                for (label, text) in cluster.logs().await {
                    let _ = std::fs::write(self.run_dir.join("logs").join(format!("{label}.log")), &text);
                    logs.push((label, text));
                }
            }
        }
        logs
    }
}

/// A process's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}
