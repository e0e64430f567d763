//! The ledger against a real nats-server that is killed and restarted on its store: what it
//! decided stands, where the stream's duplicate window has forgotten.
use std::time::Duration;

use millrace_bus::metrics::OUTCOMES_OVERRULED;
use millrace_bus::topology::Edge;
use millrace_bus::{BusSettings, Outbound, Publisher, terminal_result};
use millrace_proto::v1::{RequestContext, TerminalStatus};
use millrace_testkit::NatsServer;
use millrace_testkit::bus::{publisher_with, result, stream, stream_len};

fn outcome(request_id: &str, status: TerminalStatus, stage: &str) -> Outbound {
    let ctx = RequestContext { request_id: request_id.into(), ..Default::default() };
    Outbound::terminal(&terminal_result(stage, Some(ctx), None, status, "why", "detail"))
}

/// Kills the server, restarts it on the same store and port, and waits until the publisher's
/// connection is back.
async fn restart(nats: &mut NatsServer, publisher: &Publisher) {
    nats.restart().await.expect("nats-server restarts on its store");
    let client = publisher.client();
    for _ in 0..200 {
        if client.connection_state() == async_nats::connection::State::Connected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the publisher did not reconnect");
}

#[tokio::test]
async fn a_decided_outcome_stands_across_a_broker_restart() {
    let mut nats = NatsServer::start().await.unwrap();
    let publisher = publisher_with(&nats, BusSettings::default()).await;
    let js = publisher.jetstream().clone();

    publisher.publish(outcome("r1", TerminalStatus::RateLimited, "session")).await.unwrap();
    publisher.publish(outcome("r1", TerminalStatus::RateLimited, "session")).await.unwrap();
    assert_eq!(OUTCOMES_OVERRULED.get(), 0, "a stage repeating its own outcome is not overruled");
    // Every reader acked it: interest retention deletes it, and with it the stream's memory of its id.
    stream(&js, Edge::RESULTS).await.purge().await.unwrap();
    restart(&mut nats, &publisher).await;

    let again = publisher.publish(outcome("r1", TerminalStatus::Completed, "moderation-output")).await.unwrap();
    assert!(!again.duplicate, "past the restart the stream no longer knows the id");
    let (msg_id, stored) = result(&js, "r1").await.expect("a result is stored");
    assert_eq!(msg_id, "r1/outcome");
    assert_eq!(
        (stored.status(), stored.stage.as_str()),
        (TerminalStatus::RateLimited, "session"),
        "the later proposal is overruled by the decided outcome"
    );
    assert_eq!(OUTCOMES_OVERRULED.get(), 1);

    let decided = publisher.ledger().decide("r2", "first".into()).await.unwrap();
    assert!(decided.first);
    let later = publisher.ledger().decide("r2", "second".into()).await.unwrap();
    assert_eq!((later.first, later.payload.as_ref()), (false, b"first".as_ref()));
}

#[tokio::test]
async fn accepted_keys_and_published_completions_are_remembered_across_a_restart() {
    let mut nats = NatsServer::start().await.unwrap();
    let publisher = publisher_with(&nats, BusSettings::default()).await;
    let ledger = publisher.ledger().clone();
    assert!(!ledger.was_accepted("k1").await.unwrap());
    ledger.record_accepted("k1").await.unwrap();
    ledger.record_accepted("k1").await.unwrap();
    ledger.record_completion("c1").await.unwrap();
    restart(&mut nats, &publisher).await;
    assert!(ledger.was_accepted("k1").await.unwrap());
    assert!(!ledger.was_accepted("k2").await.unwrap());
    assert!(ledger.completion_published("c1").await.unwrap());
    assert!(!ledger.completion_published("c2").await.unwrap());
    assert_eq!(stream_len(publisher.jetstream(), Edge::RESULTS).await, 0, "records are not results");
}

#[tokio::test]
async fn a_window_shorter_than_the_retry_horizon_is_refused_at_start_up() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), duplicate_window_s: Some(60), ..Default::default() };
    let refused = millrace_bus::connect_mesh(&settings, "test").await.err().expect("refused");
    assert!(refused.to_string().contains("retry horizon"), "{refused}");
}

#[tokio::test]
async fn a_decided_outcome_whose_publish_was_lost_is_published_by_whoever_meets_it_again() {
    let nats = NatsServer::start().await.unwrap();
    let publisher = publisher_with(&nats, BusSettings::default()).await;
    let js = publisher.jetstream().clone();

    // A stage decided r3's outcome, then lost its publish (the results leader died before the
    // PubAck): the ledger holds it, RESULTS does not.
    let lost = terminal_result(
        "session",
        Some(RequestContext { request_id: "r3".into(), ..Default::default() }),
        None,
        TerminalStatus::RateLimited,
        "rate_limited",
        "over the limit",
    );
    publisher.ledger().decide("r3", millrace_proto::Message::encode_to_vec(&lost).into()).await.unwrap();
    assert!(result(&js, "r3").await.is_none(), "decided, not published");

    assert!(publisher.republish_outcome("r3").await.unwrap(), "r3's outcome is decided");
    let (msg_id, stored) = result(&js, "r3").await.expect("the decided outcome is in RESULTS now");
    assert_eq!(
        (msg_id.as_str(), stored.status(), stored.stage.as_str()),
        ("r3/outcome", TerminalStatus::RateLimited, "session")
    );

    assert!(publisher.republish_outcome("r3").await.unwrap());
    assert_eq!(stream_len(&js, Edge::RESULTS).await, 1, "a second copy is dropped by its dedup id");
    assert!(!publisher.republish_outcome("r4").await.unwrap(), "nothing decided for r4: nothing published");
    assert_eq!(stream_len(&js, Edge::RESULTS).await, 1);
}
