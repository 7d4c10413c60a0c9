//! Images on the agent's host: references, policy, the verified local
//! cache, and copy-on-write overlays for guest disks.
//!
//! - [`ImageRef`] (in `reference`): URL (`http`, `https`, absolute
//!   `file`), [`Sha256`], [`DeclaredFormat`], endorser; validated at the edge.
//! - [`Policy`]: which checksums and endorsers this host accepts; refusals
//!   happen before any download.
//! - [`LocalCache`]: `<sha256>.img` files in one directory, fetched once
//!   (single flight per checksum), verified while streaming, published only
//!   once verified, pinned while guests use them, evicted least recently used
//!   first under a quota. Its module documentation states the invariants
//!   that hold after a crash; the short form: a `<sha256>.img` is always
//!   complete and verified, and a crash leaves only `.partial-*` files,
//!   removed at the next open.
//! - [`overlay`]: a qcow2 overlay on a cached base with `qemu-img create`.
//!
//! Errors follow the crate's map: InvalidArgument for a bad reference or a
//! checksum mismatch (both checksums shown), FailedPrecondition for a policy
//! refusal or an image in use, NotFound for HTTP 404/410 or a missing file,
//! Unavailable for connection failures, timeouts and cut-off downloads,
//! ResourceExhausted when the quota cannot hold the image.

mod cache;
mod egress;
pub mod endorsement;
mod fetch;
mod overlay;
mod policy;
mod reference;
mod staging;
#[cfg(test)]
mod test_http;

pub use cache::{
    CacheOptions, CacheStats, CachedImage, CachedImageInfo, EvictedImage, LocalCache, PinGuard,
    PulledImage,
};
pub use egress::Egress;
pub use endorsement::{Endorsement, PublicKey, SigningKey};
pub use fetch::{FetchTimeouts, PROGRESS_STEP};
pub use overlay::{is_partial as is_partial_overlay, overlay};
pub use policy::{Endorsed, Policy};
pub use reference::{DeclaredFormat, ImageRef, ImageSource, Sha256};
