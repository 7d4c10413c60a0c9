//! Stratus identities and the transport that carries them.
//!
//! - [`identity`]: the `stratus://ROLE/NAME` scheme, [`identity::Caller`];
//! - [`issue`]: the CA and the certificates `stratus-pki` makes (rcgen);
//! - [`tls`]: TLS 1.3 settings (ring, client certificates required);
//! - [`serve`]: a daemon's listeners (mTLS, local socket, loopback plain
//!   TCP) as one connection stream for tonic, each connection tagged with its
//!   caller, and the SIGHUP reload;
//! - [`connect`]: how clients reach a daemon;
//! - [`tenancy`]: projects: the scope of a call, creators, reserved labels;
//! - [`audit`]: the audit record of every mutating call (log + JSON Lines);
//! - [`metrics`]: the `/metrics` endpoint and the RPC latency histograms.

pub mod audit;
pub mod authz;
pub mod connect;
pub mod gate;
pub mod identity;
pub mod issue;
pub mod metrics;
pub mod serve;
pub mod tenancy;
pub mod tls;

pub use connect::{Dialer, Target};
pub use identity::{Caller, Identity, Role, Transport};
pub use tls::TlsFiles;

/// The innermost cause of an error chain ("connection refused" rather than
/// "transport error").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
