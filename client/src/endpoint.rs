//! Reaching the coordinator: its URL, TLS towards it, and the HTTP/2
//! settings of connections that carry weights (which the coordinator's
//! server uses too).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// TLS towards the coordinator, for its clients (actors, learner ranks,
/// reward servers, the CLI), whose coordinator URL is then `https://`. Its
/// certificate must chain to `ca`: the processes trust no system roots, so
/// an `https://` coordinator needs this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorTls {
    /// CA certificate(s), PEM, that the coordinator's certificate chains to.
    pub ca: PathBuf,
}

/// HTTP/2 stream receive window for connections that carry weights, in
/// bytes; the server and the clients should both set it (with
/// [`HTTP2_CONNECTION_WINDOW_BYTES`] and [`HTTP2_MAX_FRAME_BYTES`]). With
/// hyper's defaults (a 1 MiB window on the server, 16 KiB frames) a Publish
/// stalls on window updates: `weight-bench` measured about 75 MB/s for a
/// 100 MB publish on loopback, against about 300 MB/s (fsync included) with
/// these settings, and Fetch gained about half again.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// HTTP/2 connection receive window for connections that carry weights.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 16 << 20;
/// Largest HTTP/2 frame to accept on connections that carry weights: one
/// chunk per frame rather than 64.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 1 << 20;

/// Whether a failed call says only that its peer is out of reach for now
/// (restarting, or the connection cut mid-call, which surfaces as
/// UNKNOWN), so that the same call is worth making again later.
pub fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
    )
}

/// An endpoint for the coordinator at `url`: TLS trusting `tls.ca` for an
/// `https://` URL, which needs it, plaintext for `http://`. Errors name the
/// setting relative to the client's section (`coordinator`, `tls.ca`).
pub fn endpoint(url: &str, tls: Option<&CoordinatorTls>) -> Result<Endpoint, String> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|e| format!("coordinator: {e}"))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    match (tls, https) {
        (Some(tls), true) => {
            let pem =
                std::fs::read(&tls.ca).map_err(|e| format!("tls.ca: {}: {e}", tls.ca.display()))?;
            endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| format!("tls.ca: {e}"))
        }
        (None, true) => Err(format!(
            "tls.ca: required for the https:// coordinator {url}: the CA certificate (PEM) \
             its certificate chains to"
        )),
        (Some(_), false) => Err(format!(
            "tls: set, but the coordinator URL {url} is not https://"
        )),
        (None, false) => Ok(endpoint),
    }
}

/// `endpoint` with the HTTP/2 settings for moving weights
/// ([`HTTP2_STREAM_WINDOW_BYTES`] and its
/// siblings): larger receive windows and frames, which keep a 1 MiB chunk
/// from waiting on window updates.
pub fn tune_endpoint(endpoint: Endpoint) -> Endpoint {
    endpoint
        .initial_stream_window_size(Some(HTTP2_STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(HTTP2_CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(HTTP2_MAX_FRAME_BYTES))
}
