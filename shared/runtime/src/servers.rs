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

/// A stage consumer as a supervised child named after its durable consumer (which is also
/// the stage's name): ready once it consumes, drained on shutdown.
pub fn consumer_child<H: millrace_bus::DeferringHandler>(consumer: millrace_bus::StageConsumer<H>) -> crate::ChildSpec {
    let consumer = std::sync::Arc::new(consumer);
    crate::ChildSpec::new(consumer.stage(), move |ctx| {
        let consumer = consumer.clone();
        async move { Ok(consumer.run(ctx.shutdown.clone(), || ctx.set_ready()).await?) }
    })
}

/// The `cancel-listener` child: follows every request's cancel notice and hands its request id
/// to `on_cancel` (see [`millrace_bus::follow_cancels`]).
pub fn cancel_listener_child<F, Fut>(publisher: &millrace_bus::Publisher, on_cancel: F) -> crate::ChildSpec
where
    F: Fn(String) -> Fut + Clone + 'static,
    Fut: Future<Output = ()>,
{
    let client = publisher.client();
    crate::ChildSpec::new("cancel-listener", move |ctx| {
        let (client, on_cancel) = (client.clone(), on_cancel.clone());
        async move { Ok(millrace_bus::follow_cancels(client, ctx.shutdown.clone(), || ctx.set_ready(), on_cancel).await?) }
    })
}
