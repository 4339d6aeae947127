//! Who is calling: bearer tokens checked on every rpc before a handler
//! runs.
//!
//! Two kinds of caller hold tokens. *Clients* (the CLI, notebooks, other
//! front ends) submit and watch jobs; each client token names the client,
//! which scopes its idempotency keys and its job quota. *Workers* (actors,
//! learner ranks, reward servers) share one worker token and use the
//! cluster and weight services. [`Authenticator::check`] turns the
//! `authorization: Bearer <token>` header into a [`Caller`] stored in the
//! request's extensions; each service then asks for the kind it serves with
//! [`require_client`], [`require_worker`] or [`require_any`], and an rpc
//! about one job asks [`require_owner`] whether the caller may see or
//! change that job: a client only its own, a worker any.
//!
//! Tokens are compared through their sha256, so the comparison does not
//! leak a token's prefix through timing.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::Request;

use encore_store::StoredJob;

use crate::error::Error;

/// The authenticated caller of an rpc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A client, by the name its token was issued to.
    Client(String),
    /// A worker process (actor, learner rank, reward server).
    Worker,
}

/// The tokens the coordinator accepts.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_hash: Arc<HashMap<[u8; 32], Caller>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Authenticator {
    /// Accepts `clients` (client name, token) and the `worker` token.
    /// Fails if a token is empty or given to two callers.
    pub fn new<'a>(
        clients: impl IntoIterator<Item = (&'a str, &'a str)>,
        worker: &str,
    ) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        let mut add = |token: &str, caller: Caller| {
            if token.is_empty() {
                return Err(format!("the token of {caller:?} is empty"));
            }
            if by_hash.insert(digest(token), caller.clone()).is_some() {
                return Err(format!(
                    "the token of {caller:?} is also given to another caller"
                ));
            }
            Ok(())
        };
        add(worker, Caller::Worker)?;
        for (client, token) in clients {
            add(token, Caller::Client(client.to_owned()))?;
        }
        Ok(Self {
            by_hash: Arc::new(by_hash),
        })
    }

    /// Resolves the request's bearer token to a [`Caller`] and stores it in
    /// the request's extensions. UNAUTHENTICATED without a known token.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let caller = self.caller(&request).map_err(tonic::Status::from)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Error> {
        let Some(header) = request.metadata().get("authorization") else {
            return Err(Error::Unauthenticated(
                "missing `authorization: Bearer <token>` metadata".into(),
            ));
        };
        let header = header.to_str().map_err(|_| {
            Error::Unauthenticated("the authorization metadata is not ASCII".into())
        })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization metadata is not `Bearer <token>`".into())
            })?;
        self.by_hash
            .get(&digest(token.trim()))
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("unknown bearer token".into()))
    }
}

/// The client side: a tonic interceptor adding `authorization: Bearer
/// <token>` to every call (the CLI with a client token; actors, learners
/// and reward servers with the worker token).
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    /// An interceptor sending `token`; an empty token sends none. Fails if
    /// the token cannot be a header value (not visible ASCII).
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Ok(Self(None));
        }
        format!("Bearer {token}")
            .parse()
            .map(|v| Self(Some(v)))
            .map_err(|_| "the token must be visible ASCII".to_owned())
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn caller_of<T>(request: &Request<T>) -> Result<&Caller, Error> {
    // The interceptor always runs first; a request without a caller means a
    // service was mounted without it, which is our bug.
    request
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| Error::Unauthenticated("no authenticated caller".into()))
}

/// The client name of a client call; PERMISSION_DENIED for a worker.
pub fn require_client<T>(request: &Request<T>) -> Result<String, Error> {
    match caller_of(request)? {
        Caller::Client(name) => Ok(name.clone()),
        Caller::Worker => Err(Error::PermissionDenied(
            "this service takes client tokens; the worker token is for ClusterService and \
             WeightService"
                .into(),
        )),
    }
}

/// Passes a worker call; PERMISSION_DENIED for a client.
pub fn require_worker<T>(request: &Request<T>) -> Result<(), Error> {
    match caller_of(request)? {
        Caller::Worker => Ok(()),
        Caller::Client(_) => Err(Error::PermissionDenied(
            "this rpc takes the worker token; client tokens are for JobService and reading \
             weights"
                .into(),
        )),
    }
}

/// Passes any authenticated caller.
pub fn require_any<T>(request: &Request<T>) -> Result<Caller, Error> {
    caller_of(request).cloned()
}

/// Passes a worker, or the client that submitted `job` (its
/// [`StoredJob::owner`]); PERMISSION_DENIED naming the job for any other
/// client. There is no operator identity that may act on every job: an
/// operator acts through the store or with the owner's token.
///
/// PERMISSION_DENIED rather than NOT_FOUND: job ids are no secret (List
/// shows every job to every client), so pretending another client's job
/// does not exist would hide nothing, and would make a wrong token look
/// like a wrong id.
pub fn require_owner(caller: &Caller, job: &StoredJob) -> Result<(), Error> {
    match caller {
        Caller::Worker => Ok(()),
        Caller::Client(name) if *name == job.owner => Ok(()),
        Caller::Client(name) => Err(Error::PermissionDenied(format!(
            "job {:?} was submitted by another client; client {name:?} may only get, cancel, \
             watch and read the weights of its own jobs",
            job.job.job_id
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn tokens_resolve_to_their_callers() {
        let auth =
            Authenticator::new([("alice", "a-token"), ("bob", "b-token")], "w-token").unwrap();
        let caller = |h| auth.check(with_header(h)).map(|r| require_any(&r).unwrap());
        assert_eq!(
            caller(Some("Bearer a-token")).unwrap(),
            Caller::Client("alice".into())
        );
        assert_eq!(caller(Some("Bearer w-token")).unwrap(), Caller::Worker);
        for bad in [
            None,
            Some("Bearer nope"),
            Some("a-token"),
            Some("Basic a-token"),
        ] {
            let status = caller(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn each_service_takes_its_own_kind_of_token() {
        let auth = Authenticator::new([("alice", "a")], "w").unwrap();
        let client = auth.check(with_header(Some("Bearer a"))).unwrap();
        let worker = auth.check(with_header(Some("Bearer w"))).unwrap();
        assert_eq!(require_client(&client).unwrap(), "alice");
        assert!(matches!(
            require_client(&worker),
            Err(Error::PermissionDenied(_))
        ));
        assert!(require_worker(&worker).is_ok());
        assert!(matches!(
            require_worker(&client),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn empty_and_shared_tokens_are_refused() {
        assert!(Authenticator::new([("alice", "")], "w").is_err());
        assert!(Authenticator::new([("alice", "w")], "w").is_err());
    }
}
