//! gRPC `millrace.v1.Sessions`: `Get` a conversation, `Delete` it ("forget me").
//!
//! A key with an empty `session` means ingest's default session (`default`), as a submit
//! without one does. An empty `user` is `INVALID_ARGUMENT` (`missing_user`); an unknown,
//! expired or forgotten conversation is `NOT_FOUND` (`session_not_found`) on `Get`.
use std::sync::Arc;

use millrace_proto::v1::sessions_server::Sessions;
use millrace_proto::v1::{DeleteSessionResponse, SessionKey, SessionState, Turn};
use millrace_proto::{ErrorClass, coded_status};
use tonic::{Request, Response, Status};

use crate::key::SessionId;
use crate::stage::SessionCore;
use crate::state::Conversation;
use crate::store::{KvBackend, StoreError};

pub struct SessionsApi<B> {
    pub core: Arc<SessionCore<B>>,
}

fn session_id(key: &SessionKey) -> Result<SessionId, Status> {
    if key.user.is_empty() {
        return Err(coded_status(ErrorClass::BadRequest, "missing_user", "`user` is required"));
    }
    Ok(SessionId::resolve(&key.tenant, &key.user, &key.session))
}

fn unavailable(e: StoreError) -> Status {
    coded_status(ErrorClass::Unavailable, "store_unavailable", e)
}

impl<B> SessionCore<B> {
    /// The API's view of a stored conversation: its exchanges as user/assistant turns, their
    /// size in tokens of the conversation's model (0 if that model is gone) and in bytes.
    pub fn state(&self, key: SessionKey, c: &Conversation, revision: u64) -> SessionState {
        let turns: Vec<Turn> = c
            .exchanges
            .iter()
            .flat_map(|e| {
                [
                    Turn {
                        role: "user".into(),
                        content: e.user.clone(),
                        request_id: e.request_id.clone(),
                        at_unix_ms: e.asked_unix_ms,
                    },
                    Turn {
                        role: "assistant".into(),
                        content: e.assistant.clone(),
                        request_id: e.request_id.clone(),
                        at_unix_ms: e.answered_unix_ms,
                    },
                ]
            })
            .collect();
        let tokens = self
            .models
            .get(&c.model)
            .map(|m| turns.iter().map(|t| m.count(&t.content).unwrap_or(0)).sum::<usize>())
            .unwrap_or(0);
        let bytes: usize = turns.iter().map(|t| t.content.len()).sum();
        SessionState {
            key: Some(key),
            turns,
            tokens: tokens.min(u32::MAX as usize) as u32,
            bytes: bytes.min(u32::MAX as usize) as u32,
            updated_unix_ms: c.updated_unix_ms,
            expires_unix_ms: c.updated_unix_ms + self.idle_ttl.as_millis() as i64,
            revision,
        }
    }
}

#[tonic::async_trait]
impl<B: KvBackend> Sessions for SessionsApi<B> {
    async fn get(&self, request: Request<SessionKey>) -> Result<Response<SessionState>, Status> {
        let key = request.into_inner();
        let id = session_id(&key)?;
        let loaded = self.core.store.load(&id).await.map_err(unavailable)?;
        let Some(conversation) = loaded.conversation else {
            return Err(coded_status(
                ErrorClass::NotFound,
                "session_not_found",
                "no such conversation (never started, expired or forgotten)",
            ));
        };
        let core = self.core.clone();
        let state = tokio::task::spawn_blocking(move || core.state(key, &conversation, loaded.revision))
            .await
            .map_err(|e| coded_status(ErrorClass::Internal, "internal", e))?;
        Ok(Response::new(state))
    }

    async fn delete(&self, request: Request<SessionKey>) -> Result<Response<DeleteSessionResponse>, Status> {
        let id = session_id(request.get_ref())?;
        let existed = self.core.store.forget(&id).await.map_err(unavailable)?;
        Ok(Response::new(DeleteSessionResponse { existed }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn an_empty_user_is_invalid_and_an_empty_session_is_the_default() {
        let e = session_id(&SessionKey { tenant: "t".into(), user: String::new(), session: "s".into() }).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("missing_user: "));
        let id = session_id(&SessionKey { tenant: "t".into(), user: "u".into(), session: String::new() }).unwrap();
        assert_eq!(id, SessionId::new("t", "u", "default"));
    }
}
