//! The ingest binary: configuration, then the service shell running the two API servers.
use std::process::ExitCode;

use clap::Parser;
use millrace_ingest::config::IngestConfig;
use millrace_ingest::gateway::Gateway;
use millrace_ingest::grpc::IngestApi;
use millrace_ingest::http::{self, HttpApi};
use millrace_ingest::results::ResultsClient;
use millrace_proto::v1::ingest_server::IngestServer;
use millrace_runtime::{ChildSpec, Service, serve_grpc, serve_http};

fn main() -> ExitCode {
    let config = IngestConfig::parse();
    Service::new("ingest", config.shell.clone(), IngestConfig::ADMIN_PORT).run(|setup| async move {
        let IngestConfig { http_addr, grpc_addr, sink_url, max_body_bytes, policy, .. } = config;
        anyhow::ensure!(
            policy.allowed_models.iter().all(|m| !m.is_empty()),
            "--allowed-models must name at least one model, without empty names"
        );
        let gateway = Gateway::new(setup.connect_bus().await?, policy);
        let grpc = setup.grpc_router().add_service(IngestServer::new(IngestApi { gateway: gateway.clone() }));
        Ok(vec![
            ChildSpec::new("http-api", move |ctx| {
                let (gateway, sink_url) = (gateway.clone(), sink_url.clone());
                async move {
                    // A fresh results client per start: its pooled connections belong to the
                    // runtimes of the workers that opened them, which a restart replaces.
                    let api = HttpApi { gateway, results: ResultsClient::new(&sink_url)?, max_body_bytes };
                    serve_http(ctx, http::server(api, http_addr)?).await
                }
            }),
            ChildSpec::new("grpc-api", move |ctx| serve_grpc(ctx, grpc_addr, grpc.clone())),
        ])
    })
}
