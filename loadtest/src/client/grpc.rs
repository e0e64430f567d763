//! `millrace.v1.Ingest/Generate`: one server stream per request (accepted, tokens, result).
use millrace_proto::CODE_METADATA;
use millrace_proto::v1::generate_event::Event;
use millrace_proto::v1::ingest_client::IngestClient;
use millrace_proto::v1::{GenerationParams, SubmitRequest, TerminalStatus};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::{ClientError, Trace};
use crate::record::{Ending, Told};
use crate::workload::Query;

pub struct GrpcClient {
    channels: Vec<IngestClient<Channel>>,
    authorization: Option<MetadataValue<Ascii>>,
}

impl GrpcClient {
    pub async fn connect(url: &str, api_key: Option<&str>, channels: usize) -> Result<Self, ClientError> {
        let authorization = api_key
            .map(|key| MetadataValue::try_from(format!("Bearer {key}")).map_err(|_| ClientError::ApiKey))
            .transpose()?;
        let endpoint = Endpoint::from_shared(url.to_owned())?;
        let mut connected = Vec::with_capacity(channels);
        for _ in 0..channels {
            // Each `connect` opens its own HTTP/2 connection, so streams spread over them.
            connected.push(IngestClient::new(endpoint.connect().await?));
        }
        Ok(Self { channels: connected, authorization })
    }

    pub async fn execute(&self, query: &Query, trace: &mut Trace) -> Result<Ending, ClientError> {
        let mut client = self.channels[query.seq as usize % self.channels.len()].clone();
        let mut request = tonic::Request::new(SubmitRequest {
            user: query.user.clone(),
            session: query.session.clone(),
            text: query.text.to_owned(),
            model: query.model.clone(),
            params: Some(GenerationParams {
                max_new_tokens: query.max_new_tokens,
                ignore_eos: query.ignore_eos,
                ..Default::default()
            }),
            deadline_ms: query.deadline_ms.unwrap_or(0),
            ..Default::default()
        });
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        let mut events = match client.generate(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Ok(Ending::Rejected { code: error_code(&status) }),
        };
        loop {
            match events.message().await {
                Ok(Some(message)) => match message.event {
                    Some(Event::Accepted(accepted)) => trace.accepted(accepted.request_id),
                    Some(Event::Token(token)) => trace.token(&token.text),
                    Some(Event::Result(result)) => {
                        let status = TerminalStatus::try_from(result.status).unwrap_or_default();
                        return Ok(trace.terminal(Told::Status(status)));
                    }
                    None => continue,
                },
                Ok(None) => return Err(ClientError::Protocol("the stream ended without a result")),
                // Before acceptance an error status is a refusal, like an HTTP error answer.
                Err(status) if trace.request_id.is_none() => return Ok(Ending::Rejected { code: error_code(&status) }),
                Err(status) => return Err(status.into()),
            }
        }
    }
}

/// Millrace's machine-readable code from the status metadata, else the gRPC code's name.
fn error_code(status: &tonic::Status) -> String {
    match status.metadata().get(CODE_METADATA).and_then(|v| v.to_str().ok()) {
        Some(code) => code.to_owned(),
        None => format!("grpc_{:?}", status.code()).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_prefer_millrace_metadata() {
        let coded = millrace_proto::coded_status(millrace_proto::ErrorClass::Overloaded, "overloaded", "busy");
        assert_eq!(error_code(&coded), "overloaded");
        assert_eq!(error_code(&tonic::Status::unavailable("down")), "grpc_unavailable");
    }
}
