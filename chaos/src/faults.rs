//! The faults, each injected while the load goes on and followed until the mesh has recovered:
//! every service ready again and a request sent after the restart (or the fault's end) completed.
use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use millrace_bus::topology::{Edge, EdgeKey};
use millrace_testkit::metrics::metric;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cluster;
use crate::config::{Fault, Plan};
use crate::db::Db;
use crate::load::{KeyRecord, Load};
use crate::mesh::{ChaosMesh, READY, rss_kib};
use millrace_proto::now_unix_ms;

/// What happened during one fault.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultRecord {
    pub name: String,
    pub detail: String,
    pub injected_ms: i64,
    /// The restarted process ready again, or the fault's end.
    pub ready_ms: Option<i64>,
    /// Every service answering `/readyz` 200 again.
    pub all_ready_ms: Option<i64>,
    /// The first terminal COMPLETED row of a request sent after `ready_ms`.
    pub first_completion_ms: Option<i64>,
    /// `first_completion_ms − ready_ms`, seconds.
    pub recovery_s: Option<f64>,
    pub recovery_met: bool,
    /// Logical requests whose intended send time fell in [injected, ready].
    pub window_requests: usize,
    pub window_accepted: usize,
    pub window_gave_up: usize,
    /// Submit attempts answered in the window without being accepted, by outcome.
    pub window_failed_attempts: BTreeMap<String, usize>,
    pub notes: Vec<String>,
    pub error: Option<String>,
    /// When the fault's injection ended (a killed node started again, a partition healed, and
    /// the cluster's streams current again), for the cluster faults.
    pub ended_ms: Option<i64>,
    /// Cluster faults: from the injection until every replicated stream had a leader on a node
    /// other than the one killed or cut off, seconds.
    pub leaders_moved_s: Option<f64>,
    /// Cluster faults: from the node's restart (or the partition's heal) until every replicated
    /// stream had all its replicas current again, seconds.
    pub rejoined_s: Option<f64>,
    /// Cluster faults: the longest stretch in [injected, ended] without an accepted submit, s.
    pub accept_stall_s: Option<f64>,
    /// Cluster faults: the longest stretch in [injected, ended] without a COMPLETED row, s.
    pub completion_stall_s: Option<f64>,
}

/// An injected undecodable message.
#[derive(Debug, Clone, Serialize)]
pub struct Poison {
    pub stream: String,
    pub subject: String,
    pub request_id: String,
    pub sequence: u64,
}

/// Peak resident memory of one process during the outage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rss {
    pub before_kib: u64,
    pub peak_kib: u64,
}

/// What the outage fault measured besides recovery.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutageReport {
    pub stage: String,
    pub secs: f64,
    pub rss: BTreeMap<String, Rss>,
    /// Largest number of messages each stream held during it.
    pub peak_stream_msgs: BTreeMap<String, u64>,
    /// Submit answers during it, by outcome (`ACCEPTED`, `overloaded`, …).
    pub answers: BTreeMap<String, usize>,
}

/// The suite's side of a run: the mesh, the load and what faults leave behind.
pub struct Runner {
    pub plan: Plan,
    pub mesh: ChaosMesh,
    pub db: Db,
    pub js: jetstream::Context,
    pub load: Load,
    pub poison: Vec<Poison>,
    pub outage: Option<OutageReport>,
    /// Metrics of processes scraped just before they were killed (their counters restart).
    pub killed_metrics: Vec<(String, String)>,
    rng: StdRng,
}

impl Runner {
    pub fn new(plan: Plan, mesh: ChaosMesh, db: Db, js: jetstream::Context, load: Load) -> Runner {
        let rng = StdRng::seed_from_u64(plan.seed ^ 0x5eed);
        Runner { plan, mesh, db, js, load, poison: Vec::new(), outage: None, killed_metrics: Vec::new(), rng }
    }

    /// Injects `fault`, follows the recovery, and says what happened.
    pub async fn inject(&mut self, fault: &Fault) -> FaultRecord {
        let mut record = FaultRecord { name: fault.name(), injected_ms: now_unix_ms(), ..Default::default() };
        eprintln!("[chaos] {}: injecting", record.name);
        let outcome = match fault {
            Fault::Kill { target } => self.kill(target, &mut record).await,
            Fault::KillNats => self.kill_nats(&mut record).await,
            Fault::Stall { target, secs } => self.stall(target, *secs, &mut record).await,
            Fault::Poison => self.inject_poison(&mut record).await,
            Fault::DbLock { secs } => self.lock_db(*secs, &mut record).await,
            Fault::Outage { target, secs } => self.outage(target, *secs, &mut record).await,
            Fault::KillLeader => self.kill_leader(&mut record).await,
            Fault::Partition { secs } => self.partition(*secs, &mut record).await,
        };
        if let Err(e) = outcome {
            record.error = Some(format!("{e:#}"));
        }
        self.recover(&mut record).await;
        if matches!(fault, Fault::KillNats | Fault::KillLeader) && record.error.is_none() {
            self.resubmit_after_restart(&mut record).await;
        }
        eprintln!(
            "[chaos] {}: ready after {:.1} s, first completion {} s later{}",
            record.name,
            record.ready_ms.map_or(f64::NAN, |r| (r - record.injected_ms) as f64 / 1000.0),
            record.recovery_s.map_or("—".to_owned(), |s| format!("{s:.2}")),
            record.error.as_deref().map_or(String::new(), |e| format!(" (error: {e})")),
        );
        record
    }

    async fn kill(&mut self, target: &str, record: &mut FaultRecord) -> anyhow::Result<()> {
        let down = Duration::from_secs_f64(self.plan.down_s);
        let service = self.mesh.service_mut(target)?;
        if let Ok(text) = service.process.metrics().await {
            self.killed_metrics.push((target.to_owned(), text));
        }
        let service = self.mesh.service_mut(target)?;
        let pid = service.process.pid().map_or("?".to_owned(), |p| p.to_string());
        record.detail = format!("kill -9 of {target} (pid {pid}), restarted after {down:?}");
        record.injected_ms = now_unix_ms();
        service.process.kill();
        tokio::time::sleep(down).await;
        let moved = service.process.restart_in_place(READY).await?;
        record.ready_ms = Some(now_unix_ms());
        if moved {
            record.notes.push(format!("{target} came back on fresh ports: its old ones were taken"));
            if target == "ingest" {
                self.load.retarget(self.mesh.ingest_http().to_string());
            } else {
                record.notes.push("ingest still names the old address for it (status reads, streaming)".into());
            }
        }
        Ok(())
    }

    async fn kill_nats(&mut self, record: &mut FaultRecord) -> anyhow::Result<()> {
        let down = Duration::from_secs_f64(self.plan.down_s);
        let nats = self.mesh.nats.process_mut()?;
        let pid = nats.pid().map_or("?".to_owned(), |p| p.to_string());
        record.detail =
            format!("kill -9 of nats-server (pid {pid}), restarted on the same store and port after {down:?}");
        record.injected_ms = now_unix_ms();
        nats.kill();
        tokio::time::sleep(down).await;
        nats.restart().await?;
        record.ready_ms = Some(now_unix_ms());
        Ok(())
    }

    /// The NATS node leading the most replicated streams now, and the streams it leads.
    async fn busiest_leader(&self) -> anyhow::Result<(String, Vec<String>)> {
        let leaders = cluster::stream_leaders(&self.js, &replicated_streams()).await;
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (stream, leader) in leaders {
            by_node.entry(leader.unwrap_or_else(|| "none".into())).or_default().push(stream);
        }
        by_node.remove("none");
        by_node
            .into_iter()
            .max_by_key(|(_, streams)| streams.len())
            .ok_or_else(|| anyhow::anyhow!("no stream reports a leader"))
    }

    /// Waits until every replicated stream has a leader other than `node`; seconds since
    /// `since_ms`, `None` within the recovery timeout.
    async fn leaders_moved_from(&self, node: &str, since_ms: i64) -> Option<f64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(self.plan.recovery_timeout_s);
        let streams = replicated_streams();
        loop {
            let leaders = cluster::stream_leaders(&self.js, &streams).await;
            if leaders.iter().all(|(_, leader)| leader.as_deref().is_some_and(|l| l != node)) {
                return Some((now_unix_ms() - since_ms) as f64 / 1000.0);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every replicated stream has all its replicas current; seconds since
    /// `since_ms`, `None` within the recovery timeout.
    async fn streams_current(&self, since_ms: i64) -> Option<f64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(self.plan.recovery_timeout_s);
        let streams = replicated_streams();
        loop {
            if cluster::all_current(&self.js, &streams).await {
                return Some((now_unix_ms() - since_ms) as f64 / 1000.0);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `docker kill` of the node leading the most streams; `ready_ms` is when every stream
    /// has a leader among the survivors (the mesh can go on); `docker start` after `down_s`,
    /// then its replicas catch up.
    async fn kill_leader(&mut self, record: &mut FaultRecord) -> anyhow::Result<()> {
        let down = Duration::from_secs_f64(self.plan.down_s);
        let (node, led) = self.busiest_leader().await?;
        record.detail = format!(
            "docker kill of NATS node {node}, leader of {} of {} replicated streams ({}), docker start after {down:?}",
            led.len(),
            replicated_streams().len(),
            led.join(", ")
        );
        record.injected_ms = now_unix_ms();
        self.mesh.nats.cluster()?.kill(&node).await?;
        record.leaders_moved_s = self.leaders_moved_from(&node, record.injected_ms).await;
        let moved_ms = record.leaders_moved_s.map(|s| record.injected_ms + (s * 1000.0) as i64);
        record.ready_ms = Some(moved_ms.unwrap_or_else(now_unix_ms));
        if record.leaders_moved_s.is_none() {
            record.notes.push(format!("the streams led by {node} found no other leader in time"));
        }
        let since_kill = Duration::from_millis((now_unix_ms() - record.injected_ms).max(0) as u64);
        tokio::time::sleep(down.saturating_sub(since_kill)).await;
        self.mesh.nats.cluster()?.start_node(&node).await?;
        let started_ms = now_unix_ms();
        record.rejoined_s = self.streams_current(started_ms).await;
        record.notes.push(format!(
            "{node} started again {:.1} s after the kill; every replica current {} s after that",
            (started_ms - record.injected_ms) as f64 / 1000.0,
            record.rejoined_s.map_or("(not in time)".to_owned(), |s| format!("{s:.1}")),
        ));
        record.ended_ms = Some(now_unix_ms());
        Ok(())
    }

    /// `docker network disconnect` of the node leading the most streams for `secs` (cut off
    /// from the other nodes and from the services alike), then `docker network connect`.
    async fn partition(&mut self, secs: f64, record: &mut FaultRecord) -> anyhow::Result<()> {
        let (node, led) = self.busiest_leader().await?;
        record.detail = format!(
            "docker network disconnect of NATS node {node} (leader of {} streams: {}) for {secs} s, then connect",
            led.len(),
            led.join(", ")
        );
        record.injected_ms = now_unix_ms();
        self.mesh.nats.cluster()?.disconnect(&node).await?;
        record.leaders_moved_s = self.leaders_moved_from(&node, record.injected_ms).await;
        let moved_ms = record.leaders_moved_s.map(|s| record.injected_ms + (s * 1000.0) as i64);
        record.ready_ms = Some(moved_ms.unwrap_or_else(now_unix_ms));
        let since = Duration::from_millis((now_unix_ms() - record.injected_ms).max(0) as u64);
        tokio::time::sleep(Duration::from_secs_f64(secs).saturating_sub(since)).await;
        self.mesh.nats.cluster()?.connect(&node).await?;
        let healed_ms = now_unix_ms();
        record.rejoined_s = self.streams_current(healed_ms).await;
        record.notes.push(format!(
            "healed {:.1} s after the cut; every replica current {} s after that",
            (healed_ms - record.injected_ms) as f64 / 1000.0,
            record.rejoined_s.map_or("(not in time)".to_owned(), |s| format!("{s:.1}")),
        ));
        record.ended_ms = Some(now_unix_ms());
        Ok(())
    }

    /// The cluster faults' stalls, from the final records and rows: the longest stretch in
    /// [injected, ended] without an accepted submit, and without a COMPLETED row.
    pub fn stall_figures(records: &[KeyRecord], completed_ms: &[i64], fault: &mut FaultRecord) {
        let Some(end) = fault.ended_ms else { return };
        let start = fault.injected_ms;
        let accepted: Vec<i64> =
            records.iter().flat_map(|r| &r.answers).filter(|a| a.accepted()).map(|a| a.at_ms).collect();
        fault.accept_stall_s = Some(longest_gap(start, end, &accepted));
        fault.completion_stall_s = Some(longest_gap(start, end, completed_ms));
    }

    /// Keys accepted before the broker restart, submitted again: each must be answered 200
    /// DUPLICATE with its original request id.
    async fn resubmit_after_restart(&mut self, record: &mut FaultRecord) {
        let before: Vec<KeyRecord> = self
            .load
            .records()
            .into_iter()
            .filter(|r| r.accepted_ms.is_some_and(|at| at < record.injected_ms) && r.request_id().is_some())
            .collect();
        let n = self.plan.resubmit.min(before.len());
        if n == 0 {
            record.notes.push("no key was accepted before the restart: nothing to submit again".into());
            return;
        }
        // Up to half of them requests that ended RATE_LIMITED (the outcome the defect re-ran),
        // the rest evenly over the run so far, the oldest included.
        let rows = self.db.results().await.unwrap_or_default();
        let status = |r: &KeyRecord| r.request_id().and_then(|id| rows.get(id)).map(|row| row.status.clone());
        let (limited, others): (Vec<KeyRecord>, Vec<KeyRecord>) =
            before.into_iter().partition(|r| status(r).as_deref() == Some("RATE_LIMITED"));
        let mut sample: Vec<KeyRecord> = limited.iter().take(n / 2).cloned().collect();
        let rest = (n - sample.len()).min(others.len());
        if rest > 0 {
            let step = others.len() as f64 / rest as f64;
            sample.extend((0..rest).map(|i| others[(i as f64 * step) as usize].clone()));
        }
        let by_status = sample.iter().fold(BTreeMap::<String, usize>::new(), |mut m, r| {
            *m.entry(status(r).unwrap_or_else(|| "no row yet".into())).or_default() += 1;
            m
        });
        record.notes.push(format!("resubmitted keys by their row's status before the restart: {by_status:?}"));
        let done = self.load.resubmit(sample).await;
        let held = done.iter().filter(|r| r.held()).count();
        let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
        for r in &done {
            let last = r.answers.last().map_or("none".to_owned(), |a| format!("{} {}", a.http, a.outcome));
            *outcomes.entry(last).or_default() += 1;
        }
        record.notes.push(format!(
            "{} keys accepted before the restart submitted again: {held} answered 200 DUPLICATE with their id; answers {outcomes:?}",
            done.len()
        ));
    }

    async fn stall(&mut self, target: &str, secs: f64, record: &mut FaultRecord) -> anyhow::Result<()> {
        // Stop it while it holds work, so the work is redelivered elsewhere meanwhile.
        let admin = self.mesh.service(target)?.process.admin();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut running = 0.0;
        while tokio::time::Instant::now() < deadline {
            if let Ok(text) = millrace_testkit::metrics::scrape(admin).await {
                running = metric(&text, "millrace_inference_load", &[("what", "running")]).unwrap_or(0.0);
                if running > 0.0 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = self.replica_counters().await;
        let service = self.mesh.service(target)?;
        record.detail = format!("SIGSTOP of {target} for {secs} s (2 × ack wait), then SIGCONT");
        record.notes.push(format!("{target} was running {running} sequences when stopped"));
        record.injected_ms = now_unix_ms();
        service.process.pause();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        service.process.resume();
        record.ready_ms = Some(now_unix_ms());
        // What the redelivery and the late finisher came to: give the stopped replica a moment
        // to finish and publish what it held.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = self.replica_counters().await;
        let mut deltas = Vec::new();
        for ((label, name), value) in &after {
            let delta = value - before.get(&(label.clone(), name.clone())).copied().unwrap_or(0.0);
            if delta > 0.0 {
                deltas.push(format!("{label} {name} +{delta}"));
            }
        }
        record.notes.push(format!(
            "during the stall and 2 s after it: {}",
            if deltas.is_empty() {
                "no redelivery, skip or dropped duplicate counted".to_owned()
            } else {
                deltas.join(", ")
            }
        ));
        Ok(())
    }

    /// The inference replicas' redelivery evidence: redeliveries, skipped generations by
    /// reason, publishes the stream dropped as duplicates.
    async fn replica_counters(&self) -> BTreeMap<(String, String), f64> {
        let mut counters = BTreeMap::new();
        for service in self.mesh.services.iter().filter(|s| s.label.starts_with("inference")) {
            let Ok(text) = service.process.metrics().await else { continue };
            let mut put = |name: &str, value: Option<f64>| {
                counters.insert((service.label.clone(), name.to_owned()), value.unwrap_or(0.0));
            };
            put("redeliveries", metric(&text, "millrace_redeliveries_total", &[]));
            put("publish_duplicates", metric(&text, "millrace_publish_duplicates_total", &[]));
            for reason in ["completion_published", "outcome_decided"] {
                put(
                    &format!("skipped_{reason}"),
                    metric(&text, "millrace_inference_skipped_total", &[("reason", reason)]),
                );
            }
        }
        counters
    }

    async fn inject_poison(&mut self, record: &mut FaultRecord) -> anyhow::Result<()> {
        record.detail =
            format!("an undecodable message with a Nats-Msg-Id into each of the {} edge streams", Edge::ALL.len());
        for edge in Edge::ALL {
            let request_id = uuid::Uuid::from_u128(self.rng.random()).to_string();
            let subject = match edge.key {
                EdgeKey::None => edge.subject_for(""),
                EdgeKey::Request => edge.subject_for(&request_id),
                EdgeKey::Model => edge.subject_for(&self.plan.model),
                EdgeKey::Stage => edge.subject_for("chaos"),
            };
            // A length-delimited field 1 announcing 255 bytes and followed by fewer: no
            // protobuf message decodes it, whatever the random rest is.
            let mut payload = vec![0x0a, 0xff, 0x01];
            payload.extend((0..29).map(|_| self.rng.random::<u8>()));
            let mut headers = HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{request_id}/chaos-poison").as_str());
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await?
                .await
                .map_err(|e| anyhow::anyhow!("poison into {}: {e}", edge.stream))?;
            self.poison.push(Poison { stream: edge.stream.to_owned(), subject, request_id, sequence: ack.sequence });
        }
        record.ready_ms = Some(now_unix_ms());
        Ok(())
    }

    async fn lock_db(&mut self, secs: f64, record: &mut FaultRecord) -> anyhow::Result<()> {
        record.detail = format!("BEGIN EXCLUSIVE on the sink's SQLite file held for {secs} s, then rolled back");
        let lock = self.db.lock().await?;
        record.injected_ms = now_unix_ms();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        lock.release().await?;
        record.ready_ms = Some(now_unix_ms());
        Ok(())
    }

    async fn outage(&mut self, target: &str, secs: f64, record: &mut FaultRecord) -> anyhow::Result<()> {
        record.detail = format!("SIGSTOP of {target} for {secs} s under load, then SIGCONT; RSS sampled every 250 ms");
        let pids = self.mesh.pids();
        let mut report = OutageReport { stage: target.to_owned(), secs, ..Default::default() };
        for (label, pid) in &pids {
            let now = rss_kib(*pid).unwrap_or(0);
            report.rss.insert(label.clone(), Rss { before_kib: now, peak_kib: now });
        }
        let service = self.mesh.service(target)?;
        record.injected_ms = now_unix_ms();
        service.process.pause();
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        while tokio::time::Instant::now() < end {
            for (label, pid) in &pids {
                if let (Some(kib), Some(rss)) = (rss_kib(*pid), report.rss.get_mut(label)) {
                    rss.peak_kib = rss.peak_kib.max(kib);
                }
            }
            for edge in Edge::ALL {
                if let Ok(mut stream) = self.js.get_stream(edge.stream).await
                    && let Ok(info) = stream.info().await
                {
                    let peak = report.peak_stream_msgs.entry(edge.stream.to_owned()).or_default();
                    *peak = (*peak).max(info.state.messages);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let service = self.mesh.service(target)?;
        service.process.resume();
        record.ready_ms = Some(now_unix_ms());
        self.outage = Some(report);
        Ok(())
    }

    /// Every service ready again, then the first completion of a request sent after `ready_ms`.
    async fn recover(&mut self, record: &mut FaultRecord) {
        let timeout = Duration::from_secs_f64(self.plan.recovery_timeout_s);
        let ready_ms = *record.ready_ms.get_or_insert_with(now_unix_ms);
        match self.mesh.wait_all_ready(timeout).await {
            Ok(()) => record.all_ready_ms = Some(now_unix_ms()),
            Err(unready) => record.notes.push(format!("still not ready after {timeout:?}: {unready:?}")),
        }
        record.first_completion_ms = self.first_completion_after(ready_ms, timeout).await;
        record.recovery_s = record.first_completion_ms.map(|c| (c - ready_ms) as f64 / 1000.0);
        record.recovery_met = record.recovery_s.is_some_and(|s| s <= self.plan.recovery_target_s);
    }

    /// When the first request sent at or after `since_ms` was stored COMPLETED; `None` within
    /// `timeout`.
    pub async fn first_completion_after(&self, since_ms: i64, timeout: Duration) -> Option<i64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(rows) = self.db.completed_since(since_ms).await
                && !rows.is_empty()
            {
                let sent_after: std::collections::HashSet<String> = self
                    .load
                    .records()
                    .into_iter()
                    .filter(|r| r.intended_ms >= since_ms)
                    .filter_map(|r| r.request_id().map(str::to_owned))
                    .collect();
                if let Some(first) = rows.iter().filter(|(id, _)| sent_after.contains(id)).map(|(_, at)| *at).min() {
                    return Some(first);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fills in each fault's window figures from the final records.
    pub fn window_figures(records: &[KeyRecord], fault: &mut FaultRecord) {
        let end = fault.ready_ms.unwrap_or(fault.injected_ms);
        let in_window = |at: i64| at >= fault.injected_ms && at <= end;
        for r in records.iter().filter(|r| in_window(r.intended_ms)) {
            fault.window_requests += 1;
            if r.accepted_ms.is_some() {
                fault.window_accepted += 1;
            }
            if r.gave_up {
                fault.window_gave_up += 1;
            }
        }
        for answer in records.iter().flat_map(|r| &r.answers).filter(|a| !a.accepted() && in_window(a.at_ms)) {
            let key =
                if answer.http == 0 { answer.outcome.clone() } else { format!("{} {}", answer.http, answer.outcome) };
            *fault.window_failed_attempts.entry(key).or_default() += 1;
        }
    }

    /// Answers during the outage by outcome.
    pub fn outage_answers(records: &[KeyRecord], fault: &FaultRecord) -> BTreeMap<String, usize> {
        let end = fault.ready_ms.unwrap_or(fault.injected_ms);
        let mut answers = BTreeMap::new();
        for a in records.iter().flat_map(|r| &r.answers).filter(|a| a.at_ms >= fault.injected_ms && a.at_ms <= end) {
            *answers
                .entry(if a.http == 0 { a.outcome.clone() } else { format!("{} {}", a.http, a.outcome) })
                .or_default() += 1;
        }
        answers
    }
}

/// Every stream the mesh replicates: the edges, the ledger's buckets and session's bucket.
pub fn replicated_streams() -> Vec<String> {
    let mut streams: Vec<String> = Edge::ALL.iter().map(|e| e.stream.to_owned()).collect();
    for bucket in [millrace_bus::ledger::IDEMPOTENCY_BUCKET, millrace_bus::ledger::OUTCOMES_BUCKET, "MR_SESSIONS"] {
        streams.push(format!("KV_{bucket}"));
    }
    streams
}

/// The longest stretch of [start, end] holding none of `times`, seconds.
pub fn longest_gap(start: i64, end: i64, times: &[i64]) -> f64 {
    let mut inside: Vec<i64> = times.iter().copied().filter(|&t| t >= start && t <= end).collect();
    inside.sort_unstable();
    let mut previous = start;
    let mut longest = 0;
    for t in inside.into_iter().chain([end]) {
        longest = longest.max(t - previous);
        previous = t;
    }
    longest as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_window_edges() {
        assert_eq!(longest_gap(0, 10_000, &[]), 10.0);
        assert_eq!(longest_gap(1_000, 10_000, &[500, 2_000, 3_000, 9_000, 11_000]), 6.0);
        assert_eq!(longest_gap(0, 1_000, &[0, 500, 1_000]), 0.5);
    }
}
