//! Servers and consumers as supervised children: ready once bound or consuming, graceful stop on drain.
use std::net::SocketAddr;

use tonic::transport::server::{Router, TcpIncoming};

use crate::supervisor::ChildContext;

/// Runs an actix-web server until it fails or the process drains.
pub async fn serve_http(ctx: ChildContext, server: actix_web::dev::Server) -> anyhow::Result<()> {
    let handle = server.handle();
    ctx.set_ready();
    tokio::select! {
        result = server => Ok(result?),
        _ = ctx.shutdown.cancelled() => {
            handle.stop(true).await;
            Ok(())
        }
    }
}

/// Runs a tonic router (the shell's `grpc.health.v1` already added) until it fails or the
/// process drains.
pub async fn serve_grpc(ctx: ChildContext, addr: SocketAddr, router: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    ctx.set_ready();
    // The server's own TCP_NODELAY default does not reach a listener handed in: without it,
    // Nagle holds a stream's small messages (a token, a moderation answer) for an ACK.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    router.serve_with_incoming_shutdown(incoming, ctx.shutdown.cancelled()).await?;
    Ok(())
}

/// A stage consumer as a supervised child: ready once it consumes, drained on shutdown.
pub fn consumer_child<H: millrace_bus::Handler>(
    name: &'static str,
    consumer: std::sync::Arc<millrace_bus::StageConsumer<H>>,
) -> crate::ChildSpec {
    crate::ChildSpec::new(name, move |ctx| {
        let consumer = consumer.clone();
        async move { Ok(consumer.run(ctx.shutdown.clone(), || ctx.set_ready()).await?) }
    })
}
