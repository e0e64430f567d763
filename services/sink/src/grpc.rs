//! gRPC `millrace.v1.Results`: `Get` and `List`.
use millrace_proto::v1::results_server::Results;
use millrace_proto::v1::{GetResultRequest, ListResultsRequest, ListResultsResponse, ResultRecord, TerminalStatus};
use tonic::{Request, Response, Status};

use crate::api::{self, ListParams};
use crate::store::Store;

pub struct ResultsApi {
    pub store: Store,
}

#[tonic::async_trait]
impl Results for ResultsApi {
    async fn get(&self, request: Request<GetResultRequest>) -> Result<Response<ResultRecord>, Status> {
        let row = api::get(&self.store, &request.into_inner().request_id).await?;
        Ok(Response::new(row.into_record()))
    }

    async fn list(&self, request: Request<ListResultsRequest>) -> Result<Response<ListResultsResponse>, Status> {
        let r = request.into_inner();
        let status = match TerminalStatus::try_from(r.status) {
            Ok(TerminalStatus::Unspecified) => "",
            Ok(s) => s.name(),
            Err(_) => return Err(api::ApiError::BadStatus(r.status.to_string()).into()),
        };
        let page = api::list(
            &self.store,
            ListParams { user: &r.user, status, page_size: r.page_size, page_token: &r.page_token },
        )
        .await?;
        Ok(Response::new(ListResultsResponse {
            results: page.results.into_iter().map(|row| row.into_record()).collect(),
            next_page_token: page.next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unknown_status_is_a_coded_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("sink.db").display());
        let api = ResultsApi { store: Store::open(&url).await.unwrap() };
        let err = api.list(Request::new(ListResultsRequest { status: 99, ..Default::default() })).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.metadata().get(millrace_proto::CODE_METADATA).unwrap(), "bad_status");
    }
}
