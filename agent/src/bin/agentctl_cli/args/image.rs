//! `agentctl image ...`: pull, list and rm, their checks, and the image
//! reference as the API takes it.

use agent::images::{DeclaredFormat, ImageRef, Sha256};
use clap::{Args, Subcommand};
use stratus_proto::agent::v1::{ImageFormat, ImageRef as PbImageRef, PullImageRequest};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Fetch an image into this host's cache ahead of the guests that use it,
    /// verifying its SHA-256; with --pdisk, also import it into a pdisk base
    /// volume for clone disks. Prints the cached image.
    Pull(PullArgs),
    /// List the images in this host's cache and the pdisk base volumes made
    /// from images.
    List,
    /// Evict an image from this host's cache and/or pdisk: both unless
    /// --local or --pdisk narrows it. Refused while a guest uses it (a local
    /// overlay, or a clone of its pdisk base).
    Rm(RmArgs),
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Where to fetch the image: an http:// or https:// URL, or a file:///
    /// URL naming an absolute path on this host.
    #[arg(value_name = "URL", value_parser = image_url)]
    pub url: String,

    /// The SHA-256 the image must hash to (64 hex digits); a download that
    /// hashes otherwise is refused and dropped.
    #[arg(long, value_name = "HEX", value_parser = sha256_arg)]
    pub sha256: Sha256,

    /// The image's format: raw, qcow2, or auto (what its header says).
    #[arg(long, value_name = "FORMAT", default_value = "auto", value_parser = format_arg)]
    pub format: DeclaredFormat,

    /// Who endorsed the image, checked against the host's image policy.
    #[arg(long, value_name = "NAME")]
    pub endorser: Option<String>,

    /// A signed endorsement of the image (`stratus-image sign`), or @FILE
    /// holding one: checked against the host policy's trusted keys.
    #[arg(long, value_name = "TOKEN|@FILE", value_parser = endorsement_arg)]
    pub endorsement: Option<String>,

    /// Also import the image into a pdisk base volume (for clone disks).
    #[arg(long)]
    pub pdisk: bool,

    /// The agent's pdisk server to import it into (with --pdisk)
    /// [default: the server named default]
    #[arg(long, value_name = "NAME", requires = "pdisk", value_parser = super::disk::server_arg)]
    pub server: Option<agent::spec::ServerName>,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The image's SHA-256, or a unique prefix of it of at least
    /// 8 hex digits (as `image list` shows).
    #[arg(value_name = "SHA256", value_parser = sha256_prefix)]
    pub sha256: String,

    /// Only from this host's cache.
    #[arg(long)]
    pub local: bool,

    /// Only the pdisk base volume.
    #[arg(long)]
    pub pdisk: bool,

    /// The agent's pdisk server whose base volume goes
    /// [default: the server named default]
    #[arg(long, value_name = "NAME", value_parser = super::disk::server_arg)]
    pub server: Option<agent::spec::ServerName>,
}

impl PullArgs {
    /// The PullImage request, after the checks that span the arguments (the
    /// endorser, in the agent's words).
    pub fn request(&self) -> Result<PullImageRequest, String> {
        let image = ImageRef::new(
            &self.url,
            self.sha256.as_str(),
            self.format,
            self.endorser.clone(),
        )
        .and_then(|i| i.with_endorsement(self.endorsement.as_deref()))
        .map_err(|e| e.to_string())?;
        Ok(PullImageRequest {
            request_id: String::new(),
            image: Some(image_pb(&image)),
            to_pdisk: self.pdisk,
            server: self
                .server
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        })
    }
}

impl RmArgs {
    /// The whole checksum when one was given.
    pub fn whole(&self) -> Option<&str> {
        (self.sha256.len() == 64).then_some(self.sha256.as_str())
    }

    /// The distinct checksums among `listed` that start with the one given,
    /// sorted (an image both cached here and in pdisk is listed twice).
    pub fn matching<'a>(&self, listed: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut found: Vec<String> = listed
            .into_iter()
            .filter(|s| s.starts_with(&self.sha256))
            .map(str::to_owned)
            .collect();
        found.sort();
        found.dedup();
        found
    }

    /// (local, pdisk) as EvictImage takes them: neither flag means both.
    pub fn caches(&self) -> (bool, bool) {
        if self.local || self.pdisk {
            (self.local, self.pdisk)
        } else {
            (true, true)
        }
    }
}

/// Digits of a SHA-256 prefix that `image rm` accepts at least.
pub const MIN_SHA256_PREFIX: usize = 8;

/// An image URL, checked by the agent's own rules (scheme, host, absolute
/// `file://` path, no `..`). The reference type needs a checksum too; a
/// placeholder stands in, as only the URL's checks can fail here.
pub(super) fn image_url(s: &str) -> Result<String, String> {
    const PLACEHOLDER: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    ImageRef::new(s, PLACEHOLDER, DeclaredFormat::Auto, None).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// An endorsement token, or `@FILE` holding one (as `stratus-image sign`
/// prints it); checked for form only, here.
pub(super) fn endorsement_arg(s: &str) -> Result<String, String> {
    let token = match s.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
        None => s.to_owned(),
    };
    let token = token.trim().to_owned();
    agent::images::Endorsement::parse(&token).map_err(|e| e.to_string())?;
    Ok(token)
}

/// `--sha256`: 64 hex digits, kept lowercase.
pub(super) fn sha256_arg(s: &str) -> Result<Sha256, String> {
    Sha256::parse(s).map_err(|e| e.to_string())
}

/// `--format`: raw, qcow2 or auto.
pub(super) fn format_arg(s: &str) -> Result<DeclaredFormat, String> {
    if s.is_empty() {
        return Err("expected raw, qcow2 or auto".into());
    }
    s.parse()
        .map_err(|e: stratus_core::error::Error| e.to_string())
}

/// `image rm`'s checksum: 8 to 64 hex digits, lowercased.
pub(super) fn sha256_prefix(s: &str) -> Result<String, String> {
    if !(MIN_SHA256_PREFIX..=64).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a SHA-256 or a prefix of one: {MIN_SHA256_PREFIX} to 64 hex digits"
        ));
    }
    Ok(s.to_ascii_lowercase())
}

/// The proto's format for the agent's.
pub fn format_pb(f: DeclaredFormat) -> ImageFormat {
    match f {
        DeclaredFormat::Raw => ImageFormat::Raw,
        DeclaredFormat::Qcow2 => ImageFormat::Qcow2,
        DeclaredFormat::Auto => ImageFormat::Auto,
    }
}

/// An image reference as the API takes it.
pub fn image_pb(i: &ImageRef) -> PbImageRef {
    PbImageRef {
        url: i.url().to_owned(),
        sha256: i.sha256().to_string(),
        format: format_pb(i.format()) as i32,
        endorser: i.endorser().unwrap_or_default().to_owned(),
        endorsement: i
            .endorsement()
            .map(|e| e.token().to_owned())
            .unwrap_or_default(),
    }
}
