//! The bus on a three-node JetStream cluster of real nats-server processes (`--stream-replicas
//! 3`): what it provisions is replicated three times, an acknowledged publish survives
//! `kill -9` of its stream's leader, and provisioning again keeps the replica count; and a
//! connection given a list of URLs whose first is dead.
use std::net::TcpListener;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream::Stream};
use millrace_bus::ledger::{IDEMPOTENCY_BUCKET, OUTCOMES_BUCKET};
use millrace_bus::publisher::Outbound;
use millrace_bus::topology::Edge;
use millrace_bus::{BusSettings, Dedup, Ledger, Topology};
use millrace_testkit::{NatsCluster, NatsServer};

/// How long the survivors may take to elect new leaders.
const FAILOVER: Duration = Duration::from_secs(30);

/// Every stream the mesh provisions: the edges and the ledger's buckets.
fn mesh_streams() -> Vec<String> {
    let mut names: Vec<String> = Edge::ALL.iter().map(|e| e.stream.to_owned()).collect();
    names.extend([IDEMPOTENCY_BUCKET, OUTCOMES_BUCKET].map(|b| format!("KV_{b}")));
    names
}

/// The stream's info, retried while the cluster has no leader for it (after a kill).
async fn info(js: &jetstream::Context, name: &str) -> jetstream::stream::Info {
    let deadline = Instant::now() + FAILOVER;
    loop {
        let attempt = async {
            let mut stream: Stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
            stream.info().await.cloned().map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(info) if info.cluster.as_ref().is_some_and(|c| c.leader.is_some()) => return info,
            outcome if Instant::now() > deadline => {
                panic!("stream {name} has no leader after {FAILOVER:?}: {outcome:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Checks every mesh stream is configured with `replicas` replicas and, within [`FAILOVER`]
/// (a scaled stream's new peers are placed after its update returns), placed on that many
/// nodes: a leader and `replicas - 1` current peers.
async fn assert_replicas(js: &jetstream::Context, replicas: usize) {
    for name in mesh_streams() {
        let deadline = Instant::now() + FAILOVER;
        loop {
            let info = info(js, &name).await;
            assert_eq!(info.config.num_replicas, replicas, "{name}'s configured replicas");
            let peers = info.cluster.expect("clustered").replicas;
            if peers.len() == replicas - 1 && peers.iter().all(|p| p.current) {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: peers besides its leader after {FAILOVER:?}: {peers:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn settings(cluster: &NatsCluster, replicas: usize) -> BusSettings {
    BusSettings { nats_url: cluster.urls(), stream_replicas: replicas, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_publish_survives_its_stream_leader_being_killed() {
    let mut cluster = NatsCluster::start().await.expect("a three-node nats cluster");
    let settings = settings(&cluster, 3);
    let publisher = millrace_bus::connect_mesh(&settings, "test").await.expect("the mesh on the cluster");
    let js = publisher.jetstream().clone();
    assert_replicas(&js, 3).await;

    let out = Outbound {
        subject: Edge::QUERIES.subject_for(""),
        msg_id: Dedup::Stage("test").msg_id("r1"),
        payload: "acknowledged before the kill".into(),
    };
    let acked = publisher.publish(out).await.expect("a PubAck from the R3 stream");
    assert!(!acked.duplicate);
    let decided = publisher.ledger().decide("r1", "decided before the kill".into()).await.unwrap();
    assert!(decided.first);

    let leader = info(&js, Edge::QUERIES.stream).await.cluster.unwrap().leader.unwrap();
    let node = cluster.node(&leader).expect("the leader is a node of the cluster");
    eprintln!("killing {leader} (pid {:?}), the leader of {}", node.server.pid(), Edge::QUERIES.stream);
    let killed_at = Instant::now();
    cluster.kill(&leader).unwrap();

    // Read back through the survivors only, on a connection of its own.
    let survivors = millrace_bus::connect(&cluster.urls_except(&leader), "survivor", Duration::from_secs(5))
        .await
        .expect("a connection to the survivors");
    let survivors = jetstream::new(survivors);
    let after = info(&survivors, Edge::QUERIES.stream).await;
    let new_leader = after.cluster.as_ref().unwrap().leader.clone().unwrap();
    eprintln!("{} led by {new_leader} {:?} after the kill", Edge::QUERIES.stream, killed_at.elapsed());
    assert_ne!(new_leader, leader);
    assert_eq!(after.state.messages, 1, "the acknowledged message is still stored");
    let deadline = Instant::now() + FAILOVER;
    let stored = loop {
        let stream = survivors.get_stream(Edge::QUERIES.stream).await.unwrap();
        match stream.get_raw_message(acked.sequence).await {
            Ok(message) => break message,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet readable: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("message {} after the kill: {e}", acked.sequence),
        }
    };
    assert_eq!(stored.payload.as_ref(), b"acknowledged before the kill");
    let ledger = Ledger::open(&survivors, &settings).await.expect("the ledger on the survivors");
    assert_eq!(ledger.outcome("r1").await.unwrap().as_deref(), Some(b"decided before the kill".as_ref()));

    // Another service starts with other limits while a node is down: the limits change, the
    // replica count stays three.
    let other = BusSettings { stream_max_msgs: 777, outcome_retention_s: 7200, ..settings.clone() };
    Topology::mesh(&other).provision(&survivors).await.expect("provisioning again on two nodes");
    Ledger::open(&survivors, &other).await.expect("the ledger again");
    for name in mesh_streams() {
        let info = info(&survivors, &name).await;
        assert_eq!(info.config.num_replicas, 3, "{name} stays R3");
    }
    assert_eq!(info(&survivors, Edge::QUERIES.stream).await.config.max_messages, 777);
    let outcomes = info(&survivors, &format!("KV_{OUTCOMES_BUCKET}")).await;
    assert_eq!(outcomes.config.max_age, Duration::from_secs(7200));

    // The killed node comes back on its store and catches up.
    cluster.restart(&leader).await.expect("the killed node restarts");
    cluster.wait_formed(FAILOVER).await.expect("the cluster forms again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_converges_existing_streams_to_the_configured_replicas() {
    let cluster = NatsCluster::start().await.expect("a three-node nats cluster");
    let r1 = millrace_bus::connect_mesh(&settings(&cluster, 1), "r1").await.expect("the mesh at R1");
    assert_replicas(r1.jetstream(), 1).await;
    // A service started with --stream-replicas=3 scales what exists up, and one started with
    // other limits only (same replicas) keeps it there.
    let r3 = millrace_bus::connect_mesh(&settings(&cluster, 3), "r3").await.expect("the mesh at R3");
    assert_replicas(r3.jetstream(), 3).await;
    let limits = BusSettings { stream_max_bytes: 1 << 20, ..settings(&cluster, 3) };
    millrace_bus::connect_mesh(&limits, "limits").await.expect("the mesh with other limits");
    assert_replicas(r3.jetstream(), 3).await;
}

#[tokio::test]
async fn a_replica_count_a_single_server_cannot_hold_is_refused_by_it() {
    let nats = NatsServer::start().await.unwrap();
    let settings = BusSettings { nats_url: nats.url(), stream_replicas: 3, ..Default::default() };
    let refused = millrace_bus::connect_mesh(&settings, "test").await.err().expect("R3 on one server is refused");
    assert!(matches!(refused, millrace_bus::BusError::Provision { .. }), "{refused}");
    let settings = BusSettings { stream_replicas: 6, ..settings };
    let refused = millrace_bus::connect_mesh(&settings, "test").await.err().expect("R6 is refused before NATS");
    assert!(refused.to_string().contains("--stream-replicas (6)"), "{refused}");
}

/// A port nothing listens on (bound, then released).
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn a_url_list_whose_first_server_is_dead_connects_to_the_next() {
    let nats = NatsServer::start().await.unwrap();
    let url = format!("nats://127.0.0.1:{},{}", dead_port(), nats.url());
    // The client tries the list in a random order: several connections try the dead one first.
    for i in 0..8 {
        let settings = BusSettings { nats_url: url.clone(), ..Default::default() };
        let publisher =
            millrace_bus::connect_mesh(&settings, &format!("test-{i}")).await.expect("connects past the dead URL");
        publisher.client().flush().await.unwrap();
        assert_eq!(
            publisher.client().server_info().port,
            nats.url().rsplit_once(':').unwrap().1.parse::<u16>().unwrap()
        );
    }
    let all_dead = format!("nats://127.0.0.1:{},nats://127.0.0.1:{}", dead_port(), dead_port());
    assert!(millrace_bus::connect(&all_dead, "test", Duration::from_secs(2)).await.is_err());
}
