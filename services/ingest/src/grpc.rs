//! gRPC `millrace.v1.Ingest`: `Submit`, validated and published exactly as `POST /v1/queries`,
//! and `Generate`, which also follows the request: `accepted`, the moderated text as `token`
//! events, then the terminal `result` (as `Results.Get` returns it). Cancelling the call before
//! the result cancels the request. Every answer carries the request id in `x-request-id`
//! metadata.
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use millrace_proto::now_unix_us;
use millrace_proto::v1::generate_event::Event as GenerateEventKind;
use millrace_proto::v1::ingest_server::Ingest;
use millrace_proto::v1::{GenerateEvent, SubmitRequest, SubmitResponse, TokenChunk};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::auth::{ApiKeys, KeyTenant};
use crate::follow::{Event, Follower, Frontend};
use crate::submit::Submission;

const REQUEST_ID: &str = "x-request-id";

pub struct IngestApi {
    pub frontend: Frontend,
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestApi {
    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        let received_unix_us = now_unix_us();
        let accepted = self.frontend.gateway.submit(submission(request), received_unix_us).await?;
        let request_id = accepted.request_id.clone();
        Ok(with_request_id(
            Response::new(SubmitResponse { request_id: accepted.request_id, created: accepted.created }),
            &request_id,
        ))
    }

    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<SubmitRequest>) -> Result<Response<GenerateStream>, Status> {
        let received_unix_us = now_unix_us();
        let (accepted, follower) = self.frontend.submit_and_follow(submission(request), received_unix_us).await?;
        let request_id = accepted.request_id.clone();
        let first = GenerateEvent {
            event: Some(GenerateEventKind::Accepted(SubmitResponse {
                request_id: accepted.request_id,
                created: accepted.created,
            })),
        };
        let events = futures::stream::once(async move { Ok(first) }).chain(follow(follower));
        Ok(with_request_id(Response::new(Box::pin(events) as GenerateStream), &request_id))
    }
}

/// The gRPC API's key check (an interceptor): `authorization: Bearer <key>` metadata, the
/// key's tenant into the request's extensions, or `UNAUTHENTICATED` with the code.
pub fn authenticate(keys: Arc<ApiKeys>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut request: Request<()>| {
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        if let Some(tenant) = keys.authenticate(authorization)? {
            request.extensions_mut().insert(tenant);
        }
        Ok(request)
    }
}

fn with_request_id<T>(mut response: Response<T>, request_id: &str) -> Response<T> {
    if let Ok(value) = MetadataValue::try_from(request_id) {
        response.metadata_mut().insert(REQUEST_ID, value);
    }
    response
}

/// The follower's events as gRPC events; the stream owns the follower, so tonic dropping it
/// (the client cancelled) cancels the request.
fn follow(follower: Follower) -> impl Stream<Item = Result<GenerateEvent, Status>> + Send {
    futures::stream::unfold((follower, 0u32), |(mut follower, index)| async move {
        let (event, index) = match follower.next().await? {
            Ok(Event::Text(text)) => {
                let request_id = follower.request_id().to_owned();
                (GenerateEventKind::Token(TokenChunk { request_id, index, text, last: false }), index + 1)
            }
            Ok(Event::Finished(row)) => (GenerateEventKind::Result(row.into_record()), index),
            Err(e) => return Some((Err(Status::from(e)), (follower, index))),
        };
        Some((Ok(GenerateEvent { event: Some(event) }), (follower, index)))
    })
}

/// proto3 cannot tell an empty string or a zero from "not given", so both read as not given —
/// except `text`, which a submit always has: an empty one is `empty_text`.
/// With API keys on, the key's tenant (put there by [`authenticate`]) replaces the request's.
fn submission(request: Request<SubmitRequest>) -> Submission {
    let key_tenant = request.extensions().get::<KeyTenant>().map(|KeyTenant(t)| t.clone());
    let r = request.into_inner();
    let given = |s: String| (!s.is_empty()).then_some(s);
    Submission {
        tenant: key_tenant.or(given(r.tenant)),
        idempotency_key: given(r.idempotency_key),
        user: given(r.user),
        session: given(r.session),
        text: Some(r.text),
        model: given(r.model),
        params: r.params.unwrap_or_default(),
        deadline_ms: (r.deadline_ms != 0).then(|| i64::from(r.deadline_ms)),
        priority: r.priority,
        messages: r.messages,
        stateless: r.stateless,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_values_are_not_given() {
        let s = submission(Request::new(SubmitRequest { user: "u".into(), ..Default::default() }));
        assert_eq!(s, Submission { user: Some("u".into()), text: Some(String::new()), ..Default::default() });
        let s = submission(Request::new(SubmitRequest { deadline_ms: 250, tenant: "t".into(), ..Default::default() }));
        assert_eq!((s.deadline_ms, s.tenant.as_deref()), (Some(250), Some("t")));
    }

    #[test]
    fn a_key_names_the_tenant_and_a_missing_one_is_unauthenticated() {
        use sha2::{Digest, Sha256};
        let entry = format!("{} acme", hex::encode(Sha256::digest(b"secret")));
        let check = authenticate(Arc::new(ApiKeys::load(None, &entry).unwrap()));
        let mut request = Request::new(());
        request.metadata_mut().insert("authorization", "Bearer secret".parse().unwrap());
        let passed = check(request).unwrap();
        let mut request = Request::new(SubmitRequest { tenant: "other".into(), ..Default::default() });
        request.extensions_mut().insert(passed.extensions().get::<KeyTenant>().unwrap().clone());
        assert_eq!(submission(request).tenant.as_deref(), Some("acme"), "the key's tenant wins");
        let refused = check(Request::new(())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.metadata().get(millrace_proto::CODE_METADATA).unwrap(), "missing_api_key");
    }
}
