//! The ingest binary: configuration, then the service shell running the two API servers.
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use millrace_ingest::auth::ApiKeys;
use millrace_ingest::config::IngestConfig;
use millrace_ingest::follow::Frontend;
use millrace_ingest::gateway::Gateway;
use millrace_ingest::grpc::{IngestApi, authenticate};
use millrace_ingest::http::{self, HttpApi};
use millrace_ingest::results::ResultsClient;
use millrace_proto::v1::inference_client::InferenceClient;
use millrace_proto::v1::ingest_server::IngestServer;
use millrace_proto::v1::moderation_client::ModerationClient;
use millrace_runtime::{ChildSpec, Service, serve_grpc, serve_http};
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

fn main() -> ExitCode {
    let config = IngestConfig::parse();
    Service::new("ingest", config.shell.clone(), IngestConfig::ADMIN_PORT).run(|setup| async move {
        let IngestConfig {
            http_addr,
            grpc_addr,
            sink_url,
            moderation_url,
            inference_url,
            api_keys_file,
            api_keys,
            ws_max_in_flight,
            max_body_bytes,
            policy,
            ..
        } = config;
        anyhow::ensure!(
            policy.allowed_models.iter().all(|m| !m.is_empty()),
            "--allowed-models must name at least one model, without empty names"
        );
        let keys = Arc::new(ApiKeys::load(api_keys_file.as_deref(), &api_keys)?);
        if keys.enabled() {
            info!(keys = keys.len(), "API keys on: every API asks for `Authorization: Bearer <key>`");
        } else {
            warn!("API keys off: every request is accepted and X-Tenant names its tenant (set --api-keys-file)");
        }
        let gateway = Gateway::new(setup.connect_bus().await?, policy);
        // A fresh frontend per start: the results client's pooled connections belong to the
        // runtime that opened them, which a restart replaces.
        let interceptor = authenticate(keys.clone());
        let frontend = move || -> anyhow::Result<Frontend> {
            Ok(Frontend {
                gateway: gateway.clone(),
                results: ResultsClient::new(&sink_url)?,
                moderation: lazy_channel(&moderation_url)?.map(ModerationClient::new),
                inference: lazy_channel(&inference_url)?.map(InferenceClient::new),
                keys: keys.clone(),
            })
        };
        let ingest = IngestServer::with_interceptor(IngestApi { frontend: frontend()? }, interceptor);
        let grpc = setup.grpc_router().add_service(ingest);
        Ok(vec![
            ChildSpec::new("http-api", move |ctx| {
                let frontend = frontend();
                async move {
                    let api = HttpApi { frontend: frontend?, max_body_bytes, ws_max_in_flight };
                    serve_http(ctx, http::server(api, http_addr)?).await
                }
            }),
            ChildSpec::new("grpc-api", move |ctx| serve_grpc(ctx, grpc_addr, grpc.clone())),
        ])
    })
}

/// A lazily connecting channel to a service that may start later; none for an empty URL.
fn lazy_channel(url: &str) -> anyhow::Result<Option<Channel>> {
    if url.is_empty() {
        return Ok(None);
    }
    Ok(Some(Endpoint::from_shared(url.to_owned())?.connect_lazy()))
}
