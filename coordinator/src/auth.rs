//! Who is calling: bearer tokens checked on every rpc before a handler
//! runs.
//!
//! Three kinds of caller hold tokens.
//!
//! - *Clients* (the CLI, notebooks, other front ends) submit and watch jobs;
//!   each client token names the client, which scopes its idempotency keys,
//!   its job quota and the jobs it may see ([`require_owner`]).
//! - *Workers about to join* hold a worker token: the shared `worker_token`
//!   (any role) or a role's own token (`actor_token`, `learner_token`,
//!   `reward_server_token`). It is good for one thing only: Register, as a
//!   role the token allows ([`require_registrar`]).
//! - *Members* hold the token Register gave them ([`member_token`]). It names
//!   the member and carries its rights and nothing more: its own membership
//!   calls ([`verify_member`] and [`require_self`]), and for the job it is
//!   assigned to, what its role does there ([`require_assigned`]). A member
//!   token is checked against the SHA-256 kept in the member's record, so it
//!   survives a coordinator restart and dies with the membership.
//!
//! [`Authenticator::check`] turns the `authorization: Bearer <token>` header
//! into a [`Caller`] stored in the request's extensions; each rpc then asks
//! for what it needs.
//!
//! Configured tokens are compared through their sha256, so the comparison
//! does not leak a token's prefix through timing.

use std::collections::HashMap;
use std::sync::Arc;

use encore_proto::v1::{Role, assignment};
use encore_store::{MemberRecord, Store, StoredJob};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::Request;

use crate::error::Error;

/// The authenticated caller of an rpc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A client, by the name its token was issued to.
    Client(String),
    /// A process holding a worker token: it may register as these roles.
    Registrar(Vec<Role>),
    /// A registered member, by the token Register gave it. Not yet checked
    /// against the member's record: [`verify_member`] does that.
    Member {
        /// The member the token names.
        member_id: String,
        /// SHA-256 of the token's secret.
        secret_sha256: [u8; 32],
    },
}

/// The tokens the coordinator accepts.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    by_hash: Arc<HashMap<[u8; 32], Caller>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What a member token starts with; configured tokens may not.
const MEMBER_TOKEN_PREFIX: &str = "encore-member.";

/// A fresh token for `member_id` and the SHA-256 of its secret, which is
/// what the member's record keeps.
pub fn member_token(member_id: &str) -> (String, [u8; 32]) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let secret = hex::encode(secret);
    (
        format!("{MEMBER_TOKEN_PREFIX}{member_id}.{secret}"),
        digest(&secret),
    )
}

/// The member id and secret hash of a member token; `None` if `token` is
/// not shaped like one.
fn parse_member_token(token: &str) -> Option<Caller> {
    let (member_id, secret) = token.strip_prefix(MEMBER_TOKEN_PREFIX)?.rsplit_once('.')?;
    (!member_id.is_empty() && secret.len() == 64).then(|| Caller::Member {
        member_id: member_id.to_owned(),
        secret_sha256: digest(secret),
    })
}

impl Authenticator {
    /// Accepts `clients` (client name, token), the shared `worker` token
    /// (any role; may be empty when every role has its own) and `roles`
    /// (role, token): a token that registers only that role. Fails if a
    /// token is given to two callers, or could be mistaken for a member
    /// token.
    pub fn new<'a>(
        clients: impl IntoIterator<Item = (&'a str, &'a str)>,
        worker: &str,
    ) -> Result<Self, String> {
        Self::with_role_tokens(clients, worker, [])
    }

    /// [`Authenticator::new`] with tokens that register one role each.
    pub fn with_role_tokens<'a>(
        clients: impl IntoIterator<Item = (&'a str, &'a str)>,
        worker: &str,
        roles: impl IntoIterator<Item = (Role, &'a str)>,
    ) -> Result<Self, String> {
        let mut by_hash = HashMap::new();
        let mut add = |token: &str, caller: Caller, who: String| {
            if token.is_empty() {
                return Err(format!("the token of {who} is empty"));
            }
            if token.starts_with(MEMBER_TOKEN_PREFIX) {
                return Err(format!(
                    "the token of {who} starts with {MEMBER_TOKEN_PREFIX:?}, which marks the \
                     tokens the coordinator issues to members"
                ));
            }
            if by_hash.insert(digest(token), caller).is_some() {
                return Err(format!(
                    "the token of {who} is also given to another caller"
                ));
            }
            Ok(())
        };
        let mut any_worker = false;
        if !worker.is_empty() {
            add(
                worker,
                Caller::Registrar(vec![Role::Actor, Role::Learner, Role::RewardServer]),
                "the workers".into(),
            )?;
            any_worker = true;
        }
        for (role, token) in roles {
            add(
                token,
                Caller::Registrar(vec![role]),
                format!("role {}", role.as_str_name()),
            )?;
            any_worker = true;
        }
        if !any_worker {
            return Err("no worker token: workers could not register".into());
        }
        for (client, token) in clients {
            add(
                token,
                Caller::Client(client.to_owned()),
                format!("client {client:?}"),
            )?;
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
            })?
            .trim();
        if let Some(caller) = self.by_hash.get(&digest(token)) {
            return Ok(caller.clone());
        }
        parse_member_token(token)
            .ok_or_else(|| Error::Unauthenticated("unknown bearer token".into()))
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
        _ => Err(Error::PermissionDenied(
            "this service takes client tokens; worker and member tokens are for \
             ClusterService, RolloutQueueService and WeightService"
                .into(),
        )),
    }
}

/// Passes a worker token that may register `role`; PERMISSION_DENIED for
/// any other caller, naming what the token allows.
pub fn require_registrar<T>(request: &Request<T>, role: Role) -> Result<(), Error> {
    match caller_of(request)? {
        // An unstated role is for Register's validation to refuse.
        Caller::Registrar(roles) if role == Role::Unspecified || roles.contains(&role) => Ok(()),
        Caller::Registrar(roles) => Err(Error::PermissionDenied(format!(
            "this worker token registers only {}, not {}",
            roles
                .iter()
                .map(|r| r.as_str_name())
                .collect::<Vec<_>>()
                .join(", "),
            role.as_str_name()
        ))),
        Caller::Member { member_id, .. } => Err(Error::PermissionDenied(format!(
            "Register takes a worker token; this is member {member_id:?}'s token"
        ))),
        Caller::Client(_) => Err(Error::PermissionDenied(
            "Register takes a worker token; client tokens are for JobService and reading \
             weights"
                .into(),
        )),
    }
}

/// Passes any authenticated caller.
pub fn require_any<T>(request: &Request<T>) -> Result<Caller, Error> {
    caller_of(request).cloned()
}

/// The member id a member token names; PERMISSION_DENIED for any other
/// caller.
pub fn member_id_of(caller: &Caller) -> Result<&str, Error> {
    match caller {
        Caller::Member { member_id, .. } => Ok(member_id),
        Caller::Registrar(_) => Err(Error::PermissionDenied(
            "a worker token only registers; send the member token Register returned".into(),
        )),
        Caller::Client(_) => Err(Error::PermissionDenied(
            "this rpc takes a member token; client tokens are for JobService and reading \
             weights"
                .into(),
        )),
    }
}

/// The record of the member whose token `caller` holds, if the token is
/// still its token. A member the store no longer has, or whose lease is
/// gone, is FAILED_PRECONDITION (reason LEASE_EXPIRED): it registers again.
/// A token whose secret does not match is UNAUTHENTICATED.
pub async fn verify_member(store: &dyn Store, caller: &Caller) -> Result<MemberRecord, Error> {
    let Caller::Member {
        member_id,
        secret_sha256,
    } = caller
    else {
        return Err(member_id_of(caller)
            .err()
            .unwrap_or_else(|| Error::PermissionDenied("this rpc takes a member token".into())));
    };
    match store.get_member(member_id).await? {
        Some(record) if record.member.token_sha256 != secret_sha256 => Err(Error::Unauthenticated(
            format!("the token for member {member_id:?} is not the one it was last issued"),
        )),
        Some(record) if record.is_alive(store.now()) => Ok(record),
        _ => Err(Error::LeaseExpired(member_id.to_owned())),
    }
}

/// Passes a member acting as itself: `member_id` (the request's field) must
/// be the member the token names.
pub fn require_self(caller: &Caller, member_id: &str) -> Result<(), Error> {
    let own = member_id_of(caller)?;
    if own == member_id {
        Ok(())
    } else {
        Err(Error::PermissionDenied(format!(
            "the token is member {own:?}'s; it may not act for member {member_id:?}"
        )))
    }
}

/// What a member does with a job, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobRight {
    /// Append scored rollouts to the job's queue: its actors.
    Produce,
    /// Read, acknowledge and claim the job's rollouts: its learner ranks.
    Consume,
    /// The queue's length and pending count: its actors and learner ranks.
    InspectQueue,
    /// Read the job's weights: its actors and learner ranks.
    ReadWeights,
    /// Publish the job's weights: its learner's rank 0.
    Publish,
}

/// Passes a member assigned to `job_id` in a role that has `right`; for
/// anything else FAILED_PRECONDITION (reason NOT_ASSIGNED) naming the
/// member, its assignment and the job.
pub fn require_assigned(record: &MemberRecord, job_id: &str, right: JobRight) -> Result<(), Error> {
    let assignment = record
        .member
        .assignment
        .as_ref()
        .filter(|a| a.job_id == job_id);
    let details = assignment.and_then(|a| a.details.as_ref());
    let allowed = match (right, details) {
        (JobRight::Produce, Some(assignment::Details::Actor(_))) => true,
        (JobRight::Consume, Some(assignment::Details::Learner(_))) => true,
        (JobRight::InspectQueue | JobRight::ReadWeights, Some(_)) => true,
        (JobRight::Publish, Some(assignment::Details::Learner(l))) => l.rank == 0,
        _ => false,
    };
    if allowed {
        return Ok(());
    }
    let role = Role::try_from(record.member.role).unwrap_or(Role::Unspecified);
    let holds = match record.member.assignment.as_ref() {
        Some(a) if !a.job_id.is_empty() => format!("is assigned to job {:?}", a.job_id),
        _ => "has no job".to_owned(),
    };
    Err(Error::NotAssigned {
        member_id: record.member.member_id.clone(),
        why: format!(
            "({}) {holds}; {right:?} on job {job_id:?} needs {}",
            role.as_str_name(),
            match right {
                JobRight::Produce => "one of the job's actors",
                JobRight::Consume => "one of the job's learner ranks",
                JobRight::InspectQueue | JobRight::ReadWeights =>
                    "one of the job's actors or learner ranks",
                JobRight::Publish => "rank 0 of the job's learner",
            }
        ),
    })
}

/// [`verify_member`] then [`require_assigned`]: the caller's record.
pub async fn require_member_right(
    store: &dyn Store,
    caller: &Caller,
    job_id: &str,
    right: JobRight,
) -> Result<MemberRecord, Error> {
    let record = verify_member(store, caller).await?;
    require_assigned(&record, job_id, right)?;
    Ok(record)
}

/// Passes the client that submitted `job` (its [`StoredJob::owner`]);
/// PERMISSION_DENIED naming the job for any other client. Workers read a
/// job's weights as its members ([`require_member_right`]). There is no
/// operator identity that may act on every job: an operator acts through
/// the store or with the owner's token.
///
/// PERMISSION_DENIED rather than NOT_FOUND: a wrong token should not look
/// like a wrong id.
pub fn require_owner(caller: &Caller, job: &StoredJob) -> Result<(), Error> {
    match caller {
        Caller::Client(name) if *name == job.owner => Ok(()),
        Caller::Client(name) => Err(Error::PermissionDenied(format!(
            "job {:?} was submitted by another client; client {name:?} may only get, cancel, \
             watch and read the weights of its own jobs",
            job.job.job_id
        ))),
        _ => Err(Error::PermissionDenied(format!(
            "job {:?}: only the client that submitted it may do this",
            job.job.job_id
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_proto::v1::{ActorAssignment, Assignment, LearnerAssignment};
    use encore_store::Member;

    fn with_header(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    const ALL: [Role; 3] = [Role::Actor, Role::Learner, Role::RewardServer];

    #[test]
    fn tokens_resolve_to_their_callers() {
        let auth = Authenticator::with_role_tokens(
            [("alice", "a-token"), ("bob", "b-token")],
            "w-token",
            [(Role::Actor, "actor-token")],
        )
        .unwrap();
        let caller = |h| auth.check(with_header(h)).map(|r| require_any(&r).unwrap());
        assert_eq!(
            caller(Some("Bearer a-token")).unwrap(),
            Caller::Client("alice".into())
        );
        assert_eq!(
            caller(Some("Bearer w-token")).unwrap(),
            Caller::Registrar(ALL.to_vec())
        );
        assert_eq!(
            caller(Some("Bearer actor-token")).unwrap(),
            Caller::Registrar(vec![Role::Actor])
        );
        let (token, hash) = member_token("actor-1");
        let header = format!("Bearer {token}");
        assert_eq!(
            caller(Some(&header)).unwrap(),
            Caller::Member {
                member_id: "actor-1".into(),
                secret_sha256: hash
            }
        );
        for bad in [
            None,
            Some("Bearer nope"),
            Some("a-token"),
            Some("Basic a-token"),
            Some("Bearer encore-member.actor-1.short"),
        ] {
            let status = caller(bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn worker_tokens_register_only_their_roles() {
        let auth =
            Authenticator::with_role_tokens([("alice", "a")], "", [(Role::Learner, "l")]).unwrap();
        let learner = auth.check(with_header(Some("Bearer l"))).unwrap();
        let client = auth.check(with_header(Some("Bearer a"))).unwrap();
        assert!(require_registrar(&learner, Role::Learner).is_ok());
        for (request, role) in [(&learner, Role::Actor), (&client, Role::Learner)] {
            assert!(
                matches!(
                    require_registrar(request, role),
                    Err(Error::PermissionDenied(_))
                ),
                "{role:?}"
            );
        }
        assert_eq!(require_client(&client).unwrap(), "alice");
        assert!(matches!(
            require_client(&learner),
            Err(Error::PermissionDenied(_))
        ));
        // A worker token is no member: it cannot act for one.
        assert!(matches!(
            require_self(&require_any(&learner).unwrap(), "learner-1"),
            Err(Error::PermissionDenied(_))
        ));
    }

    #[test]
    fn empty_shared_and_member_shaped_tokens_are_refused() {
        assert!(Authenticator::new([("alice", "")], "w").is_err());
        assert!(Authenticator::new([("alice", "w")], "w").is_err());
        assert!(Authenticator::new([("alice", "a")], "").is_err());
        assert!(Authenticator::new([("alice", "encore-member.x.y")], "w").is_err());
    }

    fn record(role: Role, assignment: Option<Assignment>) -> MemberRecord {
        MemberRecord {
            member: Member {
                member_id: "m".into(),
                role: role as i32,
                assignment,
                ..Member::default()
            },
            status: None,
            revision: 1,
            lease_deadline: std::time::SystemTime::now(),
        }
    }

    #[test]
    fn members_act_only_on_their_job_and_in_their_role() {
        let on = |job: &str, details| Assignment {
            job_id: job.into(),
            details: Some(details),
            ..Assignment::default()
        };
        let actor = record(
            Role::Actor,
            Some(on(
                "j",
                assignment::Details::Actor(ActorAssignment::default()),
            )),
        );
        let learner = |rank| {
            record(
                Role::Learner,
                Some(on(
                    "j",
                    assignment::Details::Learner(LearnerAssignment {
                        rank,
                        ..LearnerAssignment::default()
                    }),
                )),
            )
        };
        let idle = record(Role::Actor, None);
        use JobRight::*;
        let cases = [
            (&actor, Produce, true),
            (&actor, Consume, false),
            (&actor, InspectQueue, true),
            (&actor, ReadWeights, true),
            (&actor, Publish, false),
            (&learner(0), Produce, false),
            (&learner(0), Consume, true),
            (&learner(0), Publish, true),
            (&learner(1), Publish, false),
            (&learner(1), ReadWeights, true),
            (&idle, ReadWeights, false),
        ];
        for (member, right, allowed) in cases {
            assert_eq!(
                require_assigned(member, "j", right).is_ok(),
                allowed,
                "{right:?} for {:?}",
                member.member.assignment
            );
            assert!(
                matches!(
                    require_assigned(member, "other", right),
                    Err(Error::NotAssigned { .. })
                ),
                "another job's {right:?}"
            );
        }
    }
}
