//! The OpenAI-compatible chat API end to end: NATS and all seven services as deployed (one
//! process each), asked real questions over `POST /v1/chat/completions`. Needs
//! `models/prepared/manifest.json` (`scripts/prepare-models.sh`) and every service binary
//! (`cargo build --workspace --bins`). When `.tools/venv/bin/python` has the `openai` package,
//! the official client is driven against the API too.
use std::process::Command;
use std::time::Duration;

use millrace_testkit::mesh::{Mesh, MeshOptions};
use millrace_testkit::{ServiceProcess, workspace_root};
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

async fn chat(mesh: &Mesh, session: &str, body: &Value) -> reqwest::Response {
    client()
        .post(mesh.ingest_url("/v1/chat/completions"))
        .header("x-session-id", session)
        .json(body)
        .send()
        .await
        .expect("POST /v1/chat/completions")
}

fn question(text: &str) -> Value {
    json!({
        "model": "smollm2-135m",
        "messages": [
            { "role": "system", "content": "You are a helpful assistant." },
            { "role": "user", "content": text },
        ],
        "temperature": 0,
        "max_tokens": 48,
        "user": "oai-test",
    })
}

/// The data of each `data:` event of a server-sent-event body.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {e:?}")).to_owned())
        .collect()
}

#[tokio::test]
async fn openai_chat_completions_over_the_whole_mesh() {
    let mesh = Mesh::start(MeshOptions::default()).await.expect("mesh");

    // Plain: the answer is the sink's row, in OpenAI's shape.
    let response = chat(&mesh, "oai-sync", &question("What is the capital of France?")).await;
    assert_eq!(response.status().as_u16(), 200, "logs:\n{}", mesh.logs());
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], format!("chatcmpl-{request_id}"), "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "smollm2-135m");
    assert!(body["created"].as_i64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{body}");
    eprintln!("plain answer: {content:?}");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()), "{body}");
    let usage = &body["usage"];
    let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert!(prompt > 0 && completion > 0, "{body}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() <= prompt, "{body}");

    // Streaming: role chunk, content chunks, a finishing chunk, [DONE]; the pieces are the
    // stored completion.
    let mut streamed = question("What is the capital of Germany?");
    streamed["stream"] = json!(true);
    let response = chat(&mesh, "oai-stream", &streamed).await;
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let events = sse_events(&response.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert_eq!(chunk["id"], format!("chatcmpl-{request_id}"));
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert!(["stop", "length"].contains(&last["finish_reason"].as_str().unwrap()), "{last}");
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let row = mesh.stored_row(&request_id).await.unwrap();
    assert_eq!(row["status"], "COMPLETED", "{row}");
    assert!(!text.is_empty());
    assert_eq!(text, row["completion"].as_str().unwrap(), "{chunks:?}");

    // Errors in OpenAI's shape.
    for (body, status, code, param) in [
        (json!({ "model": "smollm2-135m", "messages": [] }), 400, "no_user_message", "messages"),
        (
            json!({ "model": "gpt-9", "messages": [{ "role": "user", "content": "hi" }] }),
            404,
            "model_not_found",
            "model",
        ),
        (
            json!({ "messages": [{ "role": "user", "content": "hi" }, { "role": "assistant", "content": "yo" }] }),
            400,
            "no_user_message",
            "messages",
        ),
        (
            json!({ "messages": [{ "role": "tool", "content": "x" }, { "role": "user", "content": "hi" }] }),
            400,
            "unsupported_role",
            "messages",
        ),
        (
            json!({ "messages": [{ "role": "user", "content": "hi" }], "temperature": 5 }),
            400,
            "bad_params",
            "temperature",
        ),
    ] {
        let response = chat(&mesh, "oai-errors", &body).await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert_eq!(error["error"]["code"], code, "{error}");
        assert_eq!(error["error"]["param"], param, "{error}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
    }

    // The official Python client (scripts/test.sh installs it into .tools/venv).
    let python = workspace_root().join(".tools/venv/bin/python");
    let has_clients = Command::new(&python)
        .args(["-c", "import openai, langchain_openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_clients,
        "no `openai` / `langchain-openai` package in {}: run scripts/test.sh (it installs them)",
        python.display()
    );
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
messages = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=48,
                                   extra_headers={"X-Session-Id": "oai-python"})
assert r.object == "chat.completion", r
assert "Paris" in r.choices[0].message.content, r
assert r.usage.total_tokens > 0, r
parts, finish = [], None
for chunk in client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=48,
                                            stream=True, extra_headers={"X-Session-Id": "oai-python-stream"}):
    if chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    finish = chunk.choices[0].finish_reason or finish
assert finish in ("stop", "length"), finish
assert "Paris" in "".join(parts), parts
try:
    client.chat.completions.create(model="gpt-9", messages=messages)
    raise SystemExit("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
assert client.models.retrieve("smollm2-135m").id == "smollm2-135m"
try:
    client.models.retrieve("gpt-9")
    raise SystemExit("unknown model listed")
except openai.NotFoundError:
    pass

# Stateless (no X-Session-Id): the request's messages are the conversation.
def prompt_tokens(msgs, **kw):
    return client.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0, max_tokens=4,
                                          **kw).usage.prompt_tokens
bare = prompt_tokens(messages)
system = "You are a meticulous assistant for a shipping company. " * 20
with_system = prompt_tokens([{"role": "system", "content": system}] + messages)
assert with_system > bare + 150, (bare, with_system)
history = [{"role": "user", "content": "Hello, I am planning a trip to Europe next spring."},
           {"role": "assistant", "content": "That sounds wonderful. Which countries would you like to visit?"}]
with_history = prompt_tokens(history + messages)
assert with_history > bare + 20, (bare, with_history)
# Two anonymous clients never share a conversation: another client's turn does not reach ours.
prompt_tokens([{"role": "user", "content": "Remember this: my name is Zebedee and my code word is heliotrope."}])
assert prompt_tokens(messages) == bare, "another anonymous client's text reached this prompt"
assert prompt_tokens(messages, user="someone") == bare, "a named user without a session shares nothing either"
# stream_options.include_usage: a last chunk without choices, with the usage.
chunks = list(client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=8,
                                             stream=True, stream_options={"include_usage": True}))
assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == bare, chunks[-1]
assert 0 <= chunks[-1].usage.prompt_tokens_details.cached_tokens <= bare, chunks[-1].usage
assert all(c.usage is None for c in chunks[:-1])
# Refused, not ignored: typed errors from the client.
# Penalties are applied by the sampler (a repeat-heavy greedy answer changes under them).
repeat = [{"role": "user", "content": "Write the word hello ten times, separated by spaces."}]
plain = client.chat.completions.create(model="smollm2-135m", messages=repeat, temperature=0, max_tokens=24)
penalized = client.chat.completions.create(model="smollm2-135m", messages=repeat, temperature=0, max_tokens=24,
                                           frequency_penalty=2.0, presence_penalty=2.0)
assert penalized.choices[0].message.content != plain.choices[0].message.content, (plain, penalized)
# logit_bias: a strongly favoured token is generated (greedy).
favoured = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=3,
                                          logit_bias={"42": 100}, logprobs=True)
assert all(t.token == favoured.choices[0].logprobs.content[0].token for t in favoured.choices[0].logprobs.content), favoured
for kwargs, param in [({"presence_penalty": 3.0}, "presence_penalty"), ({"logit_bias": {"1": 500}}, "logit_bias"),
                      ({"temperature": 5}, "temperature")]:
    try:
        client.chat.completions.create(model="smollm2-135m", messages=messages, **kwargs)
        raise SystemExit(f"{kwargs} accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == param, e.body
# n candidates in one batch, each moderated; re-ranked by similarity to the conversation.
r = client.chat.completions.create(model="smollm2-135m", messages=messages, n=3, temperature=1.0, seed=7,
                                   max_tokens=12, extra_body={"millrace_rerank": True})
assert [c.index for c in r.choices] == [0, 1, 2], r
scores = [c.to_dict()["millrace_score"] for c in r.choices]
assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores), scores
assert len(set(c.message.content for c in r.choices)) > 1, "the candidates are sampled apart"
assert r.usage.completion_tokens > 12, r.usage
try:
    client.chat.completions.create(model="smollm2-135m", messages=messages, n=2, stream=True)
    raise SystemExit("streamed n > 1 accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "n", err.body
# Structured output by constrained decoding: JSON mode and a JSON schema always parse.
import json
schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
          "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24}}}
ask = [{"role": "user", "content": "Describe Paris as JSON."}]
r = client.chat.completions.create(model="smollm2-135m", messages=ask, max_tokens=64, temperature=0,
                                   response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
city = json.loads(r.choices[0].message.content)
assert set(city) == {"city", "country"} and all(isinstance(v, str) for v in city.values()), city
r = client.chat.completions.create(model="smollm2-135m", messages=ask, max_tokens=64, temperature=0,
                                   response_format={"type": "json_object"})
content = r.choices[0].message.content
# As OpenAI documents: JSON mode output is whole unless the token budget cut it ("length").
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(content), dict), content
else:
    assert r.choices[0].finish_reason == "length" and content.lstrip().startswith("{"), r
try:
    client.chat.completions.create(model="smollm2-135m", messages=ask, max_tokens=8, response_format={
        "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 12}}})
    raise SystemExit("a schema that does not compile was accepted")
except openai.BadRequestError as err:
    assert err.body["code"] == "invalid_response_format", err.body
# A required tool call: arguments matching the function's parameters, plain and streamed.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
          "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                         "properties": {"city": {"type": "string", "maxLength": 32}}}}}]
weather = [{"role": "user", "content": "What is the weather in Oslo?"}]
r = client.chat.completions.create(model="smollm2-135m", messages=weather, tools=tools, tool_choice="required",
                                   temperature=0, max_tokens=48)
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}, call
chunks = list(client.chat.completions.create(model="smollm2-135m", messages=weather, tools=tools, temperature=0,
                                             max_tokens=48, stream=True,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}}))
streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
assert len(streamed) == 1 and streamed[0].function.arguments == call.function.arguments, streamed
assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
# tool_choice "auto" (the default): the model answers with a call or with text, never a mix.
r = client.chat.completions.create(model="smollm2-135m", messages=weather, tools=tools, temperature=0, max_tokens=48)
if r.choices[0].finish_reason == "tool_calls":
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"], r
else:
    assert r.choices[0].message.content and not r.choices[0].message.content.startswith("{"), r
    assert r.choices[0].message.tool_calls is None, r
print("auto tool choice:", r.choices[0].finish_reason, r.choices[0].message.content or r.choices[0].message.tool_calls)
# Log probabilities from the model's own distribution (greedy: the chosen token is the top one).
r = client.chat.completions.create(model="smollm2-135m", messages=messages, temperature=0, max_tokens=8,
                                   logprobs=True, top_logprobs=2)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens and "".join(t.token for t in content) == r.choices[0].message.content
assert all(t.logprob <= 0 and t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 2 for t in content), content
# Legacy completions: the prompt is continued as it is (no chat template around it).
c = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0)
assert c.object == "text_completion" and c.choices[0].text and c.choices[0].finish_reason in ("stop", "length"), c
assert c.usage.prompt_tokens == 5, c.usage
parts = [ch.choices[0].text for ch in client.completions.create(model="smollm2-135m", prompt="The capital of France is",
                                                                  max_tokens=8, temperature=0, stream=True) if ch.choices]
assert "".join(parts) == c.choices[0].text, (parts, c.choices[0].text)
# Embeddings: related texts closer than unrelated ones; base64 is the same vector.
import base64, struct
texts = ["A cat sits on the mat.", "A kitten is lying on a rug.", "Quarterly revenue grew by five percent."]
e = client.embeddings.create(model="minilm-l6", input=texts)
v = [d.embedding for d in e.data]
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
assert len(v) == 3 and len(v[0]) == 384 and e.usage.prompt_tokens > 15, e.usage
assert dot(v[0], v[1]) > dot(v[0], v[2]) + 0.1, (dot(v[0], v[1]), dot(v[0], v[2]))
assert e.model == "minilm-l6", e.model
b64 = client.embeddings.create(model="minilm-l6", input=texts[0], encoding_format="base64").data[0].embedding
b64 = struct.unpack(f"<{len(v[0])}f", base64.b64decode(b64))
assert all(abs(a - b) < 1e-6 for a, b in zip(b64, v[0])), "base64 differs from float"
try:
    client.embeddings.create(model="minilm-l6", input=texts[0], dimensions=16)
    raise SystemExit("dimensions accepted")
except openai.BadRequestError as err:
    assert err.body["param"] == "dimensions", err.body
# Moderations: the mesh's own policy.
m = client.moderations.create(input=["You are a worthless idiot.", "What a lovely day for a walk."])
assert m.results[0].flagged and not m.results[1].flagged, m
# A second widely used client: LangChain's ChatOpenAI, plain and streamed, with a system prompt
# and history (stateless: the messages it sends are the conversation).
from langchain_openai import ChatOpenAI
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
llm = ChatOpenAI(base_url=sys.argv[1], api_key="unused", model="smollm2-135m", temperature=0, max_tokens=24,
                 max_retries=0)
conversation = [SystemMessage("You are a geography teacher."), HumanMessage("Hi!"), AIMessage("Hello! Ask me."),
                HumanMessage("What is the capital of France?")]
answer = llm.invoke(conversation)
assert "Paris" in answer.content, answer
assert answer.usage_metadata["input_tokens"] > bare, answer.usage_metadata
assert "".join(chunk.content for chunk in llm.stream(conversation)) == answer.content
# API keys (the second ingest has them on): missing or wrong → AuthenticationError; right → answered.
for key in ["", "key-wrong"]:
    try:
        openai.OpenAI(base_url=sys.argv[2], api_key=key or "-", max_retries=0).chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=4)
        raise SystemExit(f"key {key!r} accepted")
    except openai.AuthenticationError as err:
        assert err.status_code == 401 and err.body["code"] in ("missing_api_key", "invalid_api_key"), err.body
keyed = openai.OpenAI(base_url=sys.argv[2], api_key="key-acme", max_retries=0)
assert keyed.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=4).choices[0].message.content
print("official client OK: prompt tokens bare", bare, "system", with_system, "history", with_history)
"#;
    // A second ingest on the same mesh with API keys on, for the client's authentication errors.
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"key-acme"));
    let keyed_args = [
        format!("--nats-url={}", mesh.nats.url()),
        "--stream-storage=memory".to_owned(),
        format!("--sink-url=http://{}", mesh.sink_http),
        "--allowed-models=smollm2-135m".to_owned(),
        format!("--api-keys={digest} acme"),
    ];
    let keyed = ServiceProcess::start("ingest", &keyed_args, &["--http-addr", "--grpc-addr"], Duration::from_secs(30))
        .await
        .expect("keyed ingest");
    let keyed_url = format!("http://{}/v1", keyed.addr("--http-addr"));
    let output = Command::new(&python).args(["-c", script, &mesh.ingest_url("/v1"), &keyed_url]).output().unwrap();
    assert!(
        output.status.success(),
        "official client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
}
