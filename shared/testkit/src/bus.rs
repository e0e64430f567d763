//! The test's side of the bus: a publisher on the test's NATS server, and reads of what the
//! mesh's streams hold (every message on an edge, a request's terminal result). The reads take
//! a JetStream context (`publisher.jetstream()`, or one on a plain connection where the test
//! must not provision the mesh itself) and panic with what went wrong, as an assertion would.
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind, stream::Stream};
use millrace_bus::topology::Edge;
use millrace_bus::{BusSettings, Publisher};
use millrace_proto::Message;
use millrace_proto::v1::Result as TerminalResult;

use crate::NatsServer;

/// A publisher on `nats` that has provisioned the mesh's streams and consumers (with default
/// settings), as every service does when it starts.
pub async fn publisher(nats: &NatsServer) -> Publisher {
    publisher_with(nats, BusSettings::default()).await
}

/// The same with `settings`, their NATS URL aside. Where the test and a service both provision
/// the consumers, their settings must agree.
pub async fn publisher_with(nats: &NatsServer, settings: BusSettings) -> Publisher {
    let settings = BusSettings { nats_url: nats.url(), ..settings };
    millrace_bus::connect_mesh(&settings, "test")
        .await
        .unwrap_or_else(|e| panic!("connecting to {} and provisioning the mesh: {e}", settings.nats_url))
}

/// The stream of `edge`.
pub async fn stream(js: &jetstream::Context, edge: Edge) -> Stream {
    js.get_stream(edge.stream).await.unwrap_or_else(|e| panic!("stream {}: {e}", edge.stream))
}

/// How many messages the stream of `edge` holds now.
pub async fn stream_len(js: &jetstream::Context, edge: Edge) -> u64 {
    let mut stream = stream(js, edge).await;
    stream.info().await.unwrap_or_else(|e| panic!("info of {}: {e}", edge.stream)).state.messages
}

/// Every message the stream of `edge` holds, oldest first, decoded as `M`, each with its
/// `Nats-Msg-Id` (empty when it has none). A message removed while they are read is passed over.
pub async fn stream_messages<M: Message + Default>(js: &jetstream::Context, edge: Edge) -> Vec<(String, M)> {
    let mut stream = stream(js, edge).await;
    let state = stream.info().await.unwrap_or_else(|e| panic!("info of {}: {e}", edge.stream)).state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        match stream.get_raw_message(sequence).await {
            Ok(m) => {
                let id = m.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.to_string()).unwrap_or_default();
                let message = M::decode(m.payload).unwrap_or_else(|e| panic!("{} #{sequence}: {e}", edge.stream));
                messages.push((id, message));
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => panic!("{} #{sequence}: {e}", edge.stream),
        }
    }
    messages
}

/// The terminal result RESULTS holds for `request_id` (the last on its subject), with its
/// `Nats-Msg-Id`; `None` while there is none.
pub async fn result(js: &jetstream::Context, request_id: &str) -> Option<(String, TerminalResult)> {
    let subject = Edge::RESULTS.subject_for(request_id);
    match stream(js, Edge::RESULTS).await.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let id = m.headers.get(async_nats::header::NATS_MESSAGE_ID).map(|v| v.to_string()).unwrap_or_default();
            Some((id, TerminalResult::decode(m.payload).unwrap_or_else(|e| panic!("the result on {subject}: {e}"))))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
        Err(e) => panic!("the result on {subject}: {e}"),
    }
}

/// The terminal result of `request_id`, waiting up to `timeout` for it.
pub async fn wait_result(js: &jetstream::Context, request_id: &str, timeout: Duration) -> (String, TerminalResult) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = result(js, request_id).await {
            return found;
        }
        assert!(Instant::now() < deadline, "no result for {request_id} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
