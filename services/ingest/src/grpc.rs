//! gRPC `millrace.v1.Ingest`: `Submit`, validated and published exactly as `POST /v1/queries`.
use millrace_proto::now_unix_us;
use millrace_proto::v1::ingest_server::Ingest;
use millrace_proto::v1::{SubmitRequest, SubmitResponse};
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;
use crate::submit::Submission;

pub struct IngestApi {
    pub gateway: Gateway,
}

#[tonic::async_trait]
impl Ingest for IngestApi {
    async fn submit(&self, request: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        let received_unix_us = now_unix_us();
        let accepted = self.gateway.submit(submission(request.into_inner()), received_unix_us).await?;
        Ok(Response::new(SubmitResponse { request_id: accepted.request_id, created: accepted.created }))
    }
}

/// proto3 cannot tell an empty string or a zero from "not given", so both read as not given —
/// except `text`, which a submit always has: an empty one is `empty_text`.
fn submission(r: SubmitRequest) -> Submission {
    let given = |s: String| (!s.is_empty()).then_some(s);
    Submission {
        tenant: given(r.tenant),
        idempotency_key: given(r.idempotency_key),
        user: given(r.user),
        session: given(r.session),
        text: Some(r.text),
        model: given(r.model),
        params: r.params.unwrap_or_default(),
        deadline_ms: (r.deadline_ms != 0).then(|| i64::from(r.deadline_ms)),
        priority: r.priority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_values_are_not_given() {
        let s = submission(SubmitRequest { user: "u".into(), ..Default::default() });
        assert_eq!(s, Submission { user: Some("u".into()), text: Some(String::new()), ..Default::default() });
        let s = submission(SubmitRequest { deadline_ms: 250, tenant: "t".into(), ..Default::default() });
        assert_eq!((s.deadline_ms, s.tenant.as_deref()), (Some(250), Some("t")));
    }
}
