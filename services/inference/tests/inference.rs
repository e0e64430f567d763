//! The inference service against a real nats-server and the real prepared models, run as the
//! deployed binary. Needs `models/prepared/manifest.json` (`scripts/prepare-models.sh`).
use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use millrace_bus::topology::{Edge, ephemeral};
use millrace_bus::{Outbound, Publisher};
use millrace_engine::embed::cosine;
use millrace_engine::{ChatMessage, Manifest};
use millrace_proto::v1::inference_client::InferenceClient;
use millrace_proto::v1::{
    Batch, ChatTurn, ClassifyRequest, Completion, EmbedRequest, GenerateChunk, GenerateRequest, GenerationParams,
    Prompt, RequestContext, Result as TerminalResult, TerminalStatus, TokenChunk, Verdict,
};
use millrace_proto::{Message as _, now_unix_ms};
use millrace_testkit::bus::{publisher, result, stream, stream_messages};
use millrace_testkit::metrics::metric;
use millrace_testkit::{NatsServer, ServiceProcess, models_dir};
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "smollm2-135m";
/// How long a test waits for a manifest that another tool may still be writing.
const MANIFEST_WAIT: Duration = Duration::from_secs(60);

/// The prepared models' manifest, waiting for it while `scripts/prepare-models.sh` finishes.
async fn manifest() -> Manifest {
    let dir = models_dir();
    let deadline = Instant::now() + MANIFEST_WAIT;
    loop {
        match Manifest::load(&dir) {
            Ok(manifest) => return manifest,
            Err(e) if Instant::now() > deadline => {
                panic!("no usable {}/manifest.json: run scripts/prepare-models.sh first ({e})", dir.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

struct Inference {
    process: ServiceProcess,
}

impl Inference {
    async fn start(nats: &NatsServer, extra: &[&str]) -> Inference {
        let mut args = vec![
            format!("--nats-url={}", nats.url()),
            format!("--models-dir={}", models_dir().display()),
            // The tests run side by side on few cores: one thread per session each.
            "--intra-threads=1".to_owned(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let process =
            ServiceProcess::start("inference", &args, &["--grpc-addr"], Duration::from_secs(120)).await.unwrap();
        Inference { process }
    }

    async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(format!("http://{}", self.process.addr("--grpc-addr"))).await.unwrap()
    }
}

/// A batch member as session would send it: the question rendered with the model's template.
fn prompt(manifest: &Manifest, request_id: &str, question: &str, max_new_tokens: u32) -> Prompt {
    let template = manifest.chat_template(MODEL).unwrap();
    Prompt {
        ctx: Some(RequestContext {
            request_id: request_id.to_owned(),
            model: MODEL.to_owned(),
            params: Some(GenerationParams { max_new_tokens, ..Default::default() }),
            ..Default::default()
        }),
        prompt: template.render(&[ChatMessage::new("user", question)], true).unwrap(),
        user_text: question.to_owned(),
        verdicts: vec![Verdict { stage: "input".into(), action: "allow".into(), ..Default::default() }],
        ..Default::default()
    }
}

/// Publishes the batch as the batcher does and returns its stream sequence.
async fn publish_batch(publisher: &Publisher, batch_id: &str, prompts: Vec<Prompt>) -> u64 {
    let batch = Batch { batch_id: batch_id.to_owned(), model: MODEL.to_owned(), prompts, ..Default::default() };
    publisher.publish(Outbound::batch(&batch)).await.unwrap().sequence
}

/// Waits until the inference consumer has acked the batch at `sequence`: its outputs are all
/// published by then (ack after effect).
async fn wait_acked(publisher: &Publisher, sequence: u64, service: &Inference) {
    let mut consumer: PullConsumer =
        stream(publisher.jetstream(), Edge::BATCHES).await.get_consumer("inference").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while consumer.info().await.unwrap().ack_floor.stream_sequence < sequence {
        assert!(Instant::now() < deadline, "batch {sequence} never acked; log:\n{}", service.process.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every completion on `COMPLETIONS`, by request id, with its `Nats-Msg-Id`.
async fn completions(publisher: &Publisher) -> HashMap<String, (String, Completion)> {
    let mut found = HashMap::new();
    for (id, completion) in stream_messages::<Completion>(publisher.jetstream(), Edge::COMPLETIONS).await {
        let previous = found.insert(completion.ctx.clone().unwrap().request_id, (id, completion));
        assert!(previous.is_none(), "two completions for one request");
    }
    found
}

async fn terminal_result(publisher: &Publisher, request_id: &str) -> (String, TerminalResult) {
    result(publisher.jetstream(), request_id).await.unwrap_or_else(|| panic!("no result for {request_id}"))
}

/// Token chunks by request id, read until every id in `ids` has sent its last chunk; `on_first`
/// runs once per request on its first chunk.
async fn read_tokens(
    tokens: &mut async_nats::Subscriber,
    ids: &[&str],
    mut on_first: impl AsyncFnMut(&str),
) -> HashMap<String, Vec<TokenChunk>> {
    let mut chunks: HashMap<String, Vec<TokenChunk>> = HashMap::new();
    while !ids.iter().all(|id| chunks.get(*id).is_some_and(|c| c.last().is_some_and(|c| c.last))) {
        let message =
            tokio::time::timeout(Duration::from_secs(180), tokens.next()).await.expect("token stream stalled").unwrap();
        let chunk = TokenChunk::decode(message.payload).unwrap();
        assert_eq!(message.subject.as_str(), ephemeral::tokens(&chunk.request_id));
        let seen = chunks.entry(chunk.request_id.clone()).or_default();
        if seen.is_empty() {
            on_first(&chunk.request_id).await;
        }
        seen.push(chunk);
    }
    chunks
}

/// The streamed text of one request, checking the chunks are numbered in order and end once.
fn streamed_text(chunks: &[TokenChunk]) -> String {
    assert!(chunks.iter().enumerate().all(|(i, c)| c.index as usize == i), "chunks out of order");
    assert!(chunks.iter().rev().skip(1).all(|c| !c.last), "one last chunk, at the end");
    chunks.iter().map(|c| c.text.as_str()).collect()
}

#[tokio::test]
async fn a_batch_streams_its_tokens_and_publishes_one_completion_per_request() {
    let manifest = manifest().await;
    let version = manifest.model(MODEL).unwrap().version.clone();
    let nats = NatsServer::start().await.unwrap();
    let service = Inference::start(&nats, &[]).await;
    let publisher = publisher(&nats).await;
    let client = publisher.client();
    let mut tokens = client.subscribe(ephemeral::tokens("*")).await.unwrap();
    client.flush().await.unwrap();

    let ids = ["a-france", "a-colour", "a-sum"];
    let questions = ["What is the capital of France?", "Name one primary colour.", "What is 2 + 2?"];
    let prompts = ids.iter().zip(questions).map(|(id, q)| prompt(&manifest, id, q, 24)).collect();
    let sequence = publish_batch(&publisher, "batch-a", prompts).await;
    let chunks = read_tokens(&mut tokens, &ids, async |_| {}).await;
    wait_acked(&publisher, sequence, &service).await;

    let completions = completions(&publisher).await;
    assert_eq!(completions.len(), 3, "one completion per request: {:?}", completions.keys());
    for (id, question) in ids.iter().zip(questions) {
        let (msg_id, c) = &completions[*id];
        assert_eq!(msg_id, &format!("{id}/inference"));
        assert_eq!(c.text, streamed_text(&chunks[*id]), "streamed pieces make the completion of {id}");
        assert!(!c.text.is_empty() && c.completion_tokens > 0 && c.completion_tokens <= 24, "{c:?}");
        assert!(c.prompt_tokens > 5, "{c:?}");
        assert_eq!(c.model_version, version);
        assert!(["eos", "length"].contains(&c.finish_reason.as_str()), "{c:?}");
        assert_eq!((c.user_text.as_str(), c.verdicts.len()), (question, 1));
        let timing = c.timings.as_ref().unwrap().stages.last().unwrap().clone();
        assert_eq!(timing.stage, "inference");
        assert!(timing.finished_unix_us >= timing.received_unix_us && timing.received_unix_us > 0);
    }
    let france = &completions["a-france"].1.text;
    assert!(france.contains("Paris"), "{france:?}");

    // The same members again under a batch id the stream does not know (a batch re-formed after
    // a crash, past a broker restart): their completions are published, so none is generated.
    let again = ids.iter().zip(questions).map(|(id, q)| prompt(&manifest, id, q, 24)).collect();
    let sequence = publish_batch(&publisher, "batch-a-again", again).await;
    wait_acked(&publisher, sequence, &service).await;
    assert_eq!(self::completions(&publisher).await.len(), 3, "no second completion");
    let metrics = service.process.metrics().await.unwrap();
    let skipped = metric(&metrics, "millrace_inference_skipped_total", &[("reason", "completion_published")]);
    assert_eq!(skipped, Some(3.0), "{metrics}");
}

#[tokio::test]
async fn a_later_batch_joins_the_running_one_finishes_first_and_capacity_is_reported() {
    let manifest = manifest().await;
    let nats = NatsServer::start().await.unwrap();
    let service = Inference::start(&nats, &["--max-running=4"]).await;
    let publisher = publisher(&nats).await;
    let client = publisher.client();
    let mut tokens = client.subscribe(ephemeral::tokens("*")).await.unwrap();
    let mut reports = client.subscribe(ephemeral::capacity(MODEL)).await.unwrap();
    client.flush().await.unwrap();

    let long = prompt(&manifest, "j-long", "Write a very long story about a dragon.", 120);
    publish_batch(&publisher, "batch-long", vec![long]).await;
    let mut order = Vec::new();
    // The short request is sent once the long one streams: it joins the running set at the next
    // step instead of waiting for the long one's last token.
    let short = prompt(&manifest, "j-short", "What is 2 + 2?", 6);
    let mut sent_short = false;
    while order.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(180), tokens.next())
            .await
            .unwrap_or_else(|_| panic!("token stream stalled; log:\n{}", service.process.logs()))
            .unwrap();
        let chunk = TokenChunk::decode(message.payload).unwrap();
        if !sent_short {
            publish_batch(&publisher, "batch-short", vec![short.clone()]).await;
            sent_short = true;
        }
        if chunk.last {
            order.push(chunk.request_id);
        }
    }
    assert_eq!(order, ["j-short", "j-long"], "the later, shorter request ended first");
    let completions = completions(&publisher).await;
    let long = &completions["j-long"].1;
    assert_eq!((long.completion_tokens, long.finish_reason.as_str()), (120, "length"), "it went on undisturbed");

    // Reports name this replica's room: four sequences at most, one of them busy at some point.
    let mut busy_seen = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline.into(), reports.next()).await {
        let report = millrace_proto::v1::ReplicaCapacity::decode(message.payload).unwrap();
        assert_eq!((report.model.as_str(), report.max_running), (MODEL, 4));
        assert!(report.kv_used_tokens <= report.kv_budget_tokens && report.heartbeat_ms > 0, "{report:?}");
        busy_seen |= report.running > 0;
        if report.running == 0 && report.waiting == 0 && busy_seen {
            break;
        }
    }
    assert!(busy_seen, "a report showed the running sequences");
}

#[tokio::test]
async fn a_tenfold_overload_stays_bounded_and_every_request_completes() {
    let manifest = manifest().await;
    let nats = NatsServer::start().await.unwrap();
    // Two sequences at a time and 40 requests in 5 batches of 8 at once: 20 × what can run.
    let service = Inference::start(&nats, &["--max-running=2", "--capacity-heartbeat-ms=50"]).await;
    let publisher = publisher(&nats).await;
    let mut reports = publisher.client().subscribe(ephemeral::capacity(MODEL)).await.unwrap();
    publisher.client().flush().await.unwrap();
    let mut last = 0;
    for b in 0..5 {
        let prompts = (0..8).map(|i| prompt(&manifest, &format!("o-{b}-{i}"), "Say yes.", 4)).collect();
        last = publish_batch(&publisher, &format!("batch-o{b}"), prompts).await;
    }
    let watcher = tokio::spawn(async move {
        let (mut most_running, mut most_waiting) = (0, 0);
        while let Some(message) = reports.next().await {
            let r = millrace_proto::v1::ReplicaCapacity::decode(message.payload).unwrap();
            assert!(r.kv_used_tokens <= r.kv_budget_tokens, "{r:?}");
            (most_running, most_waiting) = (most_running.max(r.running), most_waiting.max(r.waiting));
            if (most_running, most_waiting) != (0, 0) && r.running == 0 && r.waiting == 0 {
                break;
            }
        }
        (most_running, most_waiting)
    });
    wait_acked(&publisher, last, &service).await;
    let (most_running, most_waiting) = watcher.await.unwrap();
    assert_eq!(most_running, 2, "never more than --max-running at once");
    // Inference pulls at most sessions × max-running batches: 2 batches of 8 held at once (a
    // request admitted during a step may be counted as waiting until the step's report).
    assert!(most_waiting <= 16, "the rest waits in the stream, not in memory: {most_waiting}");
    assert_eq!(completions(&publisher).await.len(), 40, "every request completed");
}

#[tokio::test]
async fn cancelled_and_expired_requests_get_terminal_results_and_the_rest_complete() {
    let manifest = manifest().await;
    let nats = NatsServer::start().await.unwrap();
    let service = Inference::start(&nats, &[]).await;
    let publisher = publisher(&nats).await;
    let client = publisher.client();
    let mut tokens = client.subscribe(ephemeral::tokens("*")).await.unwrap();
    // Cancelled before its batch arrives: the notice is remembered.
    client.publish(ephemeral::cancel("b-early"), Default::default()).await.unwrap();
    client.flush().await.unwrap();

    let mut expired = prompt(&manifest, "b-expired", "What is 2 + 2?", 16);
    expired.ctx.as_mut().unwrap().deadline_unix_ms = now_unix_ms() - 1;
    let prompts = vec![
        prompt(&manifest, "b-france", "What is the capital of France?", 16),
        prompt(&manifest, "b-story", "Write a very long story about a dragon and a knight.", 400),
        prompt(&manifest, "b-colour", "Name one primary colour.", 16),
        prompt(&manifest, "b-early", "Say hello.", 16),
        expired,
    ];
    let sequence = publish_batch(&publisher, "batch-b", prompts).await;
    let cancel = async |id: &str| {
        if id == "b-story" {
            client.publish(ephemeral::cancel(id), Default::default()).await.unwrap();
        }
    };
    let chunks = read_tokens(&mut tokens, &["b-france", "b-story", "b-colour", "b-early", "b-expired"], cancel).await;
    wait_acked(&publisher, sequence, &service).await;

    let completions = completions(&publisher).await;
    let mut completed: Vec<_> = completions.keys().map(String::as_str).collect();
    completed.sort();
    assert_eq!(completed, ["b-colour", "b-france"], "only the requests that ran to the end complete");
    assert!(completions["b-france"].1.text.contains("Paris"), "{:?}", completions["b-france"].1.text);

    let (msg_id, story) = terminal_result(&publisher, "b-story").await;
    assert_eq!(msg_id, "b-story/outcome");
    assert_eq!(
        (story.status(), story.reason.as_str(), story.stage.as_str()),
        (TerminalStatus::Cancelled, "cancelled", "inference")
    );
    assert!(story.completion_tokens >= 1 && story.completion_tokens < 400, "stopped mid-generation: {story:?}");
    assert_eq!(story.completion, streamed_text(&chunks["b-story"]));
    let (_, early) = terminal_result(&publisher, "b-early").await;
    assert_eq!((early.status(), early.completion_tokens), (TerminalStatus::Cancelled, 0));
    let (_, late) = terminal_result(&publisher, "b-expired").await;
    assert_eq!(
        (late.status(), late.reason.as_str(), late.completion_tokens),
        (TerminalStatus::Expired, "deadline_exceeded", 0)
    );
}

fn question(text: &str, max_new_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        messages: vec![ChatTurn { role: "user".into(), content: text.into() }],
        params: Some(GenerationParams { max_new_tokens, ..Default::default() }),
        ..Default::default()
    }
}

async fn generate_all(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> Result<Vec<GenerateChunk>, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

fn assert_invalid(status: tonic::Status, code: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with(&format!("{code}: ")), "{status:?}");
}

#[tokio::test]
async fn grpc_generates_embeds_and_classifies_and_refuses_bad_input() {
    let manifest = manifest().await;
    let nats = NatsServer::start().await.unwrap();
    // One sequence at a time: a second call waits for admission, a third is refused.
    let service = Inference::start(&nats, &["--max-running=1"]).await;
    let mut client = service.client().await;

    let chunks = generate_all(&mut client, question("What is the capital of France?", 16)).await.unwrap();
    let (last, pieces) = chunks.split_last().unwrap();
    let text: String = pieces.iter().map(|c| c.text.as_str()).collect();
    assert!(text.contains("Paris"), "{text:?}");
    assert!(last.last && pieces.iter().all(|c| !c.last && !c.text.is_empty()), "{chunks:?}");
    assert!(["eos", "length"].contains(&last.finish_reason.as_str()), "{last:?}");
    assert!(last.prompt_tokens > 5 && last.completion_tokens > 0 && last.completion_tokens <= 16, "{last:?}");
    assert_eq!(last.model_version, manifest.model(MODEL).unwrap().version);

    // While a generation runs, a second call waits its turn and a third is refused at once;
    // dropping the running stream cancels it, which frees its place long before 2000 tokens.
    let mut running =
        client.generate(question("Write a very long story about a dragon.", 2000)).await.unwrap().into_inner();
    running.message().await.unwrap().expect("a first piece");
    // The reply comes once the request is queued: the next call finds the queue full.
    let mut waiting = client.generate(question("Hi", 4)).await.unwrap().into_inner();
    let busy = client.generate(question("Hi", 4)).await.map(|_| ()).unwrap_err();
    assert_eq!((busy.code(), busy.message().split(':').next()), (Code::ResourceExhausted, Some("overloaded")));
    drop(running);
    let mut last = None;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), waiting.message())
        .await
        .unwrap_or_else(|_| panic!("the dropped stream did not free its place\n{}", service.process.logs()))
        .unwrap()
    {
        last = Some(chunk);
    }
    assert!(last.is_some_and(|c| c.last), "the waiting call ran once there was room");
    let chunks = generate_all(&mut client, question("Hi", 4)).await.unwrap();
    assert!(chunks.last().unwrap().last, "and a new call is taken again");

    assert_invalid(client.generate(GenerateRequest::default()).await.map(|_| ()).unwrap_err(), "empty_prompt");
    let unknown = GenerateRequest { model: "gpt-9".into(), prompt: "Hi".into(), ..Default::default() };
    assert_invalid(client.generate(unknown).await.map(|_| ()).unwrap_err(), "unknown_model");

    let texts = ["A cat sits on the mat.", "A kitten is lying on a rug.", "Quarterly revenue grew by five percent."];
    let embed = client
        .embed(EmbedRequest { texts: texts.map(String::from).to_vec(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(embed.model_version, manifest.model("minilm-l6").unwrap().version);
    let v: Vec<&[f32]> = embed.embeddings.iter().map(|e| e.values.as_slice()).collect();
    assert_eq!((v.len(), v[0].len()), (3, 384));
    // Word pieces plus [CLS] and [SEP].
    assert!(
        embed.embeddings.iter().all(|e| (7..20).contains(&e.tokens)),
        "{:?}",
        embed.embeddings.iter().map(|e| e.tokens).collect::<Vec<_>>()
    );
    assert!(
        cosine(v[0], v[1]) > cosine(v[0], v[2]),
        "related {} vs unrelated {}",
        cosine(v[0], v[1]),
        cosine(v[0], v[2])
    );
    assert_invalid(client.embed(EmbedRequest::default()).await.unwrap_err(), "empty_texts");

    let texts = vec!["You are a fucking idiot.".to_owned(), "Have a lovely day, friend.".to_owned()];
    let classified = client.classify(ClassifyRequest { texts, ..Default::default() }).await.unwrap().into_inner();
    assert_eq!(classified.model_version, manifest.model("profanity").unwrap().version);
    assert!(classified.scores[0] > 0.5 && classified.scores[0] > classified.scores[1], "{:?}", classified.scores);
    assert_invalid(client.classify(ClassifyRequest::default()).await.unwrap_err(), "empty_texts");
    let unknown = ClassifyRequest { model: "toxicity-xl".into(), texts: vec!["hi".into()] };
    assert_invalid(client.classify(unknown).await.unwrap_err(), "unknown_model");
}
