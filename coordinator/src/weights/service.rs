//! The tonic `WeightService` implementation: each rpc checks its caller,
//! runs its handler under [`Metrics::rpc`](crate::metrics::Metrics::rpc)
//! (latency, outcome, the one conversion of errors to statuses), and hands
//! over to the module that implements it. GetManifest and ListVersions,
//! which are single store reads, live here.

use encore_proto::status::Violations;
use encore_proto::v1::weight_service_server::WeightService;
use encore_proto::v1::{
    ErrorReason, FetchRequest, GetManifestRequest, ListVersionsRequest, ListVersionsResponse,
    PublishRequest, WeightManifest,
};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};
use tracing::Span;

use super::fetch::FetchStream;
use super::{Weights, check_job_id, version_of};
use crate::error::{Error, Result};

/// Page size when a request asks for 0 (`common.proto`'s `Page`).
const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page; larger requests get this many.
const MAX_PAGE_SIZE: usize = 1000;

#[tonic::async_trait]
impl WeightService for Weights {
    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<WeightManifest>, Status> {
        let body = self.publish_stream(request);
        self.inner
            .metrics
            .rpc("WeightService/Publish", body)
            .await
            .map(Response::new)
    }

    type FetchStream = FetchStream;

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let body = self.fetch_stream(request);
        self.inner
            .metrics
            .rpc("WeightService/Fetch", body)
            .await
            .map(Response::new)
    }

    async fn get_manifest(
        &self,
        request: Request<GetManifestRequest>,
    ) -> Result<Response<WeightManifest>, Status> {
        let body = self.get_manifest_body(request);
        self.inner
            .metrics
            .rpc("WeightService/GetManifest", body)
            .await
            .map(Response::new)
    }

    async fn list_versions(
        &self,
        request: Request<ListVersionsRequest>,
    ) -> Result<Response<ListVersionsResponse>, Status> {
        let body = self.list_versions_body(request);
        self.inner
            .metrics
            .rpc("WeightService/ListVersions", body)
            .await
            .map(Response::new)
    }
}

impl Weights {
    #[tracing::instrument(name = "get_manifest", skip_all, fields(job_id))]
    async fn get_manifest_body(
        &self,
        request: Request<GetManifestRequest>,
    ) -> Result<WeightManifest> {
        let caller = crate::auth::require_any(&request)?;
        let request = request.into_inner();
        let mut v = Violations::default();
        check_job_id(&mut v, "job_id", &request.job_id);
        v.into_result()?;
        Span::current().record("job_id", request.job_id.as_str());
        self.require_reader(&caller, &request.job_id).await?;
        self.resolve(&request.job_id, request.version).await
    }

    #[tracing::instrument(name = "list_versions", skip_all, fields(job_id))]
    async fn list_versions_body(
        &self,
        request: Request<ListVersionsRequest>,
    ) -> Result<ListVersionsResponse> {
        let caller = crate::auth::require_any(&request)?;
        let request = request.into_inner();
        let page = request.page.unwrap_or_default();
        let mut v = Violations::default();
        check_job_id(&mut v, "job_id", &request.job_id);
        v.into_result()?;
        Span::current().record("job_id", request.job_id.as_str());
        self.require_reader(&caller, &request.job_id).await?;
        let below = decode_page_token(&request.job_id, &page.page_token)?;
        let page_size = match page.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };

        // A job retains a handful of versions, so one read and a filter is
        // the whole cost of paging.
        let all = self.inner.store.list_manifests(&request.job_id).await?;
        if all.is_empty() {
            self.require_job(&request.job_id).await?;
        }
        let mut rest = all
            .into_iter()
            .filter(|m| below.is_none_or(|below| version_of(m) < below))
            .peekable();
        let manifests: Vec<_> = rest.by_ref().take(page_size).collect();
        let next_page_token = match (rest.peek(), manifests.last()) {
            (Some(_), Some(last)) => encode_page_token(&request.job_id, version_of(last)),
            _ => String::new(),
        };
        Ok(ListVersionsResponse {
            manifests,
            next_page_token,
        })
    }
}

/// A short tag of the job a page token was issued for, so that a token is
/// refused with another job rather than silently paging it.
fn job_tag(job_id: &str) -> String {
    hex::encode(&Sha256::digest(job_id.as_bytes())[..6])
}

/// The token of the page after the one that ended with version `last`.
fn encode_page_token(job_id: &str, last: u64) -> String {
    format!("v1.{}.{last:x}", job_tag(job_id))
}

/// The version a page continues below; `None` for the first page.
fn decode_page_token(job_id: &str, token: &str) -> Result<Option<u64>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        let mut v = Violations::default();
        v.push(
            "page.page_token".into(),
            ErrorReason::InvalidPageToken,
            format!("{why}; start again with an empty token"),
        );
        Error::Invalid(v)
    };
    let mut parts = token.split('.');
    let (Some("v1"), Some(tag), Some(last), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("is not a token this server issued"));
    };
    if tag != job_tag(job_id) {
        return Err(bad("was issued for another job"));
    }
    u64::from_str_radix(last, 16)
        .map(Some)
        .map_err(|_| bad("is not a token this server issued"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_job() {
        let token = encode_page_token("j1", 41);
        assert_eq!(decode_page_token("j1", &token).unwrap(), Some(41));
        assert_eq!(decode_page_token("j1", "").unwrap(), None);
        for bad in [token.as_str(), "garbage", "v1.x.y", "v1..1.2"] {
            let err = decode_page_token(if bad == token { "j2" } else { "j1" }, bad).unwrap_err();
            let status = Status::from(err);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(status.message().contains("page.page_token"), "{bad}");
        }
    }
}
