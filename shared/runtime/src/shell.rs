//! The service shell: config every binary shares, the actix system with a multi-threaded tokio
//! runtime, telemetry, the supervision tree with the admin server, signals and exit codes.
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use millrace_bus::{BusSettings, Publisher};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tracing::{error, info};

use crate::supervisor::{ChildSpec, Drain, Readiness, RootSupervisor, SupervisorConfig};
use crate::{admin, telemetry};

/// Flags every service has (each also read from its `MILLRACE_…` env var).
#[derive(Debug, Clone, clap::Args)]
pub struct ShellArgs {
    /// Admin server address (/healthz, /readyz, /metrics); each service has its own default port.
    #[arg(long, env = "MILLRACE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MILLRACE_LOG", default_value = "info,ort=warn")]
    pub log: String,
    /// Log format.
    #[arg(long, env = "MILLRACE_LOG_FORMAT", default_value = "pretty", value_parser = ["pretty", "json"])]
    pub log_format: String,
    /// OTLP/gRPC endpoint to export traces to (e.g. http://127.0.0.1:4317); off when unset or
    /// empty (compose.yaml passes an empty value unless the observability profile's Jaeger runs).
    #[arg(long, env = "MILLRACE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Restart intensity: more than this many child restarts within the window exits the process.
    #[arg(long, env = "MILLRACE_MAX_RESTARTS", default_value_t = 5)]
    pub max_restarts: u32,
    /// Restart intensity window, seconds.
    #[arg(long, env = "MILLRACE_RESTART_WINDOW_S", default_value_t = 30)]
    pub restart_window_s: u64,
    /// First restart backoff, milliseconds (doubles per consecutive failure).
    #[arg(long, env = "MILLRACE_RESTART_BACKOFF_MS", default_value_t = 100)]
    pub restart_backoff_ms: u64,
    /// Longest restart backoff, milliseconds.
    #[arg(long, env = "MILLRACE_RESTART_BACKOFF_MAX_MS", default_value_t = 10_000)]
    pub restart_backoff_max_ms: u64,
    /// How long draining may take after SIGTERM before the process gives up and exits non-zero.
    #[arg(long, env = "MILLRACE_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,
    #[command(flatten)]
    pub bus: BusSettings,
}

impl ShellArgs {
    fn supervisor(&self) -> SupervisorConfig {
        SupervisorConfig {
            max_restarts: self.max_restarts,
            window: Duration::from_secs(self.restart_window_s),
            backoff_base: Duration::from_millis(self.restart_backoff_ms),
            backoff_max: Duration::from_millis(self.restart_backoff_max_ms),
            drain_timeout: Duration::from_secs(self.drain_timeout_s),
        }
    }
}

/// One service binary.
pub struct Service {
    name: &'static str,
    args: ShellArgs,
    default_admin_port: u16,
}

/// What a service's setup function gets: its config and the shell's shared pieces.
pub struct Setup {
    pub name: &'static str,
    pub args: ShellArgs,
    pub readiness: Readiness,
    health: tonic_health::server::HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl Setup {
    /// Connects to NATS, provisions the mesh topology (idempotent) and returns a publisher.
    pub async fn connect_bus(&self) -> anyhow::Result<Publisher> {
        let publisher = millrace_bus::connect_mesh(&self.args.bus, self.name).await?;
        info!(url = self.args.bus.nats_url, "connected to NATS; topology provisioned");
        Ok(publisher)
    }

    /// A tonic router that already serves `grpc.health.v1.Health`, following readiness.
    /// A gRPC server with `grpc.health.v1` (following readiness) and reflection (v1) over the
    /// Millrace contracts and health, so `grpcurl` and friends need no `.proto` files.
    pub fn grpc_router(&self) -> Router {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(millrace_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the built-in descriptor sets are valid");
        tonic::transport::Server::builder().add_service(self.health_service.clone()).add_service(reflection)
    }

    fn follow_readiness_in_grpc_health(&self) {
        let mut changes = self.readiness.subscribe();
        let health = self.health.clone();
        actix_rt::spawn(async move {
            loop {
                let status =
                    if *changes.borrow_and_update() { ServingStatus::Serving } else { ServingStatus::NotServing };
                health.set_service_status("", status).await;
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

impl Service {
    pub fn new(name: &'static str, args: ShellArgs, default_admin_port: u16) -> Self {
        Self { name, args, default_admin_port }
    }

    /// Runs the service until it drains (exit 0) or fails (non-zero). `setup` connects what
    /// the service needs and returns its children; it runs before the tree starts.
    pub fn run<F, Fut>(self, setup: F) -> ExitCode
    where
        F: FnOnce(Setup) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<ChildSpec>>>,
    {
        let system = actix_rt::System::with_tokio_rt(|| {
            tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
        });
        let code = system.block_on(self.run_inner(setup));
        ExitCode::from(code as u8)
    }

    async fn run_inner<F, Fut>(self, setup: F) -> i32
    where
        F: FnOnce(Setup) -> Fut,
        Fut: Future<Output = anyhow::Result<Vec<ChildSpec>>>,
    {
        let args = self.args;
        let telemetry = match telemetry::init(
            self.name,
            &args.log,
            args.log_format == "json",
            args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{}: telemetry: {e:#}", self.name);
                return 2;
            }
        };
        let stop_requested = CancellationToken::new();
        actix_rt::spawn(wait_for_signal(stop_requested.clone()));

        let readiness = Readiness::default();
        let health = tonic_health::server::HealthReporter::new();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        let setup_ctx =
            Setup { name: self.name, args: args.clone(), readiness: readiness.clone(), health, health_service };
        setup_ctx.follow_readiness_in_grpc_health();
        info!(service = self.name, "starting");
        let children = tokio::select! {
            _ = stop_requested.cancelled() => {
                info!("stopped during set-up");
                telemetry.shutdown().await;
                return 0;
            }
            children = setup(setup_ctx) => children,
        };
        let mut children = match children {
            Ok(c) => c,
            Err(e) => {
                error!(error = %format!("{e:#}"), "set-up failed");
                telemetry.shutdown().await;
                return 1;
            }
        };
        let admin_addr = args.admin_addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.default_admin_port)));
        children.insert(0, admin::child(admin_addr, readiness.clone()));
        info!(%admin_addr, "admin server");
        let (supervisor, exited) =
            RootSupervisor::start(args.supervisor(), children, readiness, CancellationToken::new());
        actix_rt::spawn(async move {
            stop_requested.cancelled().await;
            supervisor.do_send(Drain);
        });
        let code = exited.await.unwrap_or(1);
        info!(code, "exiting");
        telemetry.shutdown().await;
        code
    }
}

async fn wait_for_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
    }
    stop.cancel();
}
