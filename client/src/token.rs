//! Bearer tokens: [`BearerToken`], what every call to the coordinator (and
//! to the reward servers) carries, and [`RequireToken`], the check of a
//! service whose callers share one token.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use tonic::Request;

type HeaderValue = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// The client side: a tonic interceptor adding `authorization: Bearer
/// <token>` to every call. The CLI sends a client token. A worker sends its
/// worker token until it registers, and from then on the member token that
/// [`BearerToken::set_member`] installed: clones share it, so every client
/// made from one [`crate::CoordinatorClient`] switches at once.
#[derive(Clone, Default)]
pub struct BearerToken {
    worker: Option<HeaderValue>,
    member: Arc<RwLock<Option<HeaderValue>>>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.write_str("BearerToken(..)")
    }
}

fn header_value(token: &str) -> Result<Option<HeaderValue>, String> {
    if token.is_empty() {
        return Ok(None);
    }
    format!("Bearer {token}")
        .parse()
        .map(Some)
        .map_err(|_| "the token must be visible ASCII".to_owned())
}

impl BearerToken {
    /// An interceptor sending `token`; an empty token sends none. Fails if
    /// the token cannot be a header value (not visible ASCII).
    pub fn new(token: &str) -> Result<Self, String> {
        Ok(Self {
            worker: header_value(token)?,
            member: Arc::default(),
        })
    }

    /// From now on this interceptor and its clones send `member_token` (what
    /// Register returned) instead of the token they were made with.
    pub fn set_member(&self, member_token: &str) -> Result<(), String> {
        let value = header_value(member_token)?;
        *self.member.write().unwrap_or_else(|p| p.into_inner()) = value;
        Ok(())
    }

    /// An interceptor that always sends the token this one was made with
    /// (what Register needs), never the member token.
    pub fn registrar(&self) -> Self {
        Self {
            worker: self.worker.clone(),
            member: Arc::default(),
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let member = self
            .member
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(value) = member.or_else(|| self.worker.clone()) {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The other side of a shared token: a tonic interceptor letting through
/// only calls that bear `token`, for a service whose callers all hold one
/// secret (the reward servers, called by actors). The comparison goes
/// through SHA-256, so it does not leak a prefix through timing. Anything
/// else is UNAUTHENTICATED, saying what was wrong with the header.
#[derive(Clone)]
pub struct RequireToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireToken(..)")
    }
}

impl RequireToken {
    /// Accepts calls bearing `token`; fails if `token` is empty.
    pub fn new(token: &str) -> Result<Self, String> {
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        Ok(Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `request` bears the token; UNAUTHENTICATED naming the
    /// problem if not.
    #[allow(clippy::result_large_err)]
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), tonic::Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| {
                tonic::Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?
            .to_str()
            .map_err(|_| {
                tonic::Status::unauthenticated("the authorization metadata is not ASCII")
            })?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                tonic::Status::unauthenticated("the authorization metadata is not `Bearer <token>`")
            })?
            .trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if digest == self.digest {
            Ok(())
        } else {
            Err(tonic::Status::unauthenticated("unknown bearer token"))
        }
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, tonic::Status> {
        self.check(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_token_replaces_the_worker_token_in_every_clone() {
        use tonic::service::Interceptor;
        let sent = |bearer: &mut BearerToken| {
            bearer
                .call(Request::new(()))
                .unwrap()
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let mut token = BearerToken::new("w").unwrap();
        let mut clone = token.clone();
        let mut registrar = token.registrar();
        token.set_member("encore-member.m.s").unwrap();
        assert_eq!(
            sent(&mut token).as_deref(),
            Some("Bearer encore-member.m.s")
        );
        assert_eq!(
            sent(&mut clone).as_deref(),
            Some("Bearer encore-member.m.s")
        );
        assert_eq!(sent(&mut registrar).as_deref(), Some("Bearer w"));
        assert_eq!(sent(&mut BearerToken::new("").unwrap()), None);
    }

    #[test]
    fn only_the_shared_token_is_let_through() {
        let check = RequireToken::new("secret").unwrap();
        let with = |header: Option<&str>| {
            let mut request = Request::new(());
            if let Some(header) = header {
                request
                    .metadata_mut()
                    .insert("authorization", header.parse().unwrap());
            }
            check.check(&request).map_err(|s| s.code())
        };
        assert_eq!(with(Some("Bearer secret")), Ok(()));
        for refused in [
            None,
            Some("Bearer secre"),
            Some("Bearer encore-member.m.s"),
            Some("secret"),
        ] {
            assert_eq!(
                with(refused),
                Err(tonic::Code::Unauthenticated),
                "{refused:?}"
            );
        }
        assert!(RequireToken::new("").is_err());
    }
}
