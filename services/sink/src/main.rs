use std::process::ExitCode;

use actix_web::{App, HttpServer, web};
use clap::Parser;
use millrace_bus::StageConsumer;
use millrace_bus::topology::ConsumerSpec;
use millrace_proto::v1::results_server::ResultsServer;
use millrace_runtime::{ChildSpec, Service, consumer_child, serve_grpc, serve_http};
use millrace_sink::config::SinkConfig;
use millrace_sink::consume::{DeadLetterStage, ResultsStage};
use millrace_sink::grpc::ResultsApi;
use millrace_sink::store::Store;
use millrace_sink::{http, writer};

fn main() -> ExitCode {
    let config = SinkConfig::parse();
    Service::new("sink", config.shell.clone(), SinkConfig::ADMIN_PORT).run(|setup| async move {
        let publisher = setup.connect_bus().await?;
        let store = Store::open(&config.database_url).await?;
        let bus = config.shell.bus.clone();
        let (writer, queue) = writer::channel(config.batch_rows * 4);
        let results = StageConsumer::new(
            ConsumerSpec::SINK_RESULTS,
            ResultsStage { writer: writer.clone() },
            publisher.clone(),
            bus.clone(),
        );
        let dead_letters = StageConsumer::new(ConsumerSpec::SINK_DLQ, DeadLetterStage { writer }, publisher, bus);
        let grpc = setup.grpc_router().add_service(ResultsServer::new(ResultsApi { store: store.clone() }));
        let (policy, http_addr, grpc_addr) = (config.batch_policy(), config.http_addr, config.grpc_addr);
        let writer_store = store.clone();
        Ok(vec![
            ChildSpec::new("writer", move |ctx| {
                ctx.set_ready();
                writer::run(queue.clone(), writer_store.clone(), policy.clone(), ctx.shutdown.clone())
            }),
            consumer_child(results),
            consumer_child(dead_letters),
            ChildSpec::new("http-api", move |ctx| {
                let store = web::Data::new(store.clone());
                async move {
                    let server = HttpServer::new(move || App::new().app_data(store.clone()).configure(http::routes))
                        .workers(2)
                        .disable_signals()
                        .bind(http_addr)?
                        .run();
                    serve_http(ctx, server).await
                }
            }),
            ChildSpec::new("grpc-api", move |ctx| serve_grpc(ctx, grpc_addr, grpc.clone())),
        ])
    })
}
