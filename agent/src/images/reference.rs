//! Image references: what a front-end names when it asks for an image.
//!
//! An [`ImageRef`] is parsed at the edge and cannot hold an invalid value:
//! its URL is `http://`, `https://` or an absolute, `..`-free `file://`
//! path, and its checksum is a [`Sha256`] (64 lowercase hex digits). The
//! checksum, not the URL, names the image everywhere after the edge: the
//! cache, the policy and the events all key on it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use reqwest::Url;
use stratus_core::error::{Error, Result};

/// A SHA-256 digest as 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(String);

impl Sha256 {
    /// Accepts 64 hex digits in either case and keeps them lowercase, so one
    /// image has one name.
    pub fn parse(s: &str) -> Result<Sha256> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "sha256 {s:?}: expected 64 hex digits"
            )));
        }
        Ok(Sha256(s.to_ascii_lowercase()))
    }

    /// The name of a digest just computed.
    pub fn from_digest(digest: [u8; 32]) -> Sha256 {
        use std::fmt::Write;
        let mut s = String::with_capacity(64);
        for b in digest {
            let _ = write!(s, "{b:02x}");
        }
        Sha256(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256({})", self.0)
    }
}

impl FromStr for Sha256 {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Sha256::parse(s)
    }
}

/// The format the reference declares. `Auto` takes what the image's magic
/// says; `Raw` is honoured even for bytes that look like qcow2 (the guest
/// sees exactly the published bytes, which is the safe direction); `Qcow2`
/// is refused for an image that is not qcow2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeclaredFormat {
    Raw,
    Qcow2,
    #[default]
    Auto,
}

impl FromStr for DeclaredFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(DeclaredFormat::Raw),
            "qcow2" => Ok(DeclaredFormat::Qcow2),
            "auto" | "" => Ok(DeclaredFormat::Auto),
            other => Err(Error::invalid(format!(
                "image format {other:?}: expected raw, qcow2 or auto"
            ))),
        }
    }
}

impl fmt::Display for DeclaredFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeclaredFormat::Raw => "raw",
            DeclaredFormat::Qcow2 => "qcow2",
            DeclaredFormat::Auto => "auto",
        })
    }
}

/// Where the bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// An `http://` or `https://` URL with a host and no credentials.
    Http(Url),
    /// An absolute path on this host, percent-decoded, without `..`.
    File(PathBuf),
    /// `pdisk:///<volume>`: an image that exists only as a pdisk base volume
    /// (one saved from a guest's disk). It cannot be downloaded, only cloned.
    Pdisk(String),
}

/// A validated image reference: URL, checksum, declared format, endorser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    url: String,
    source: ImageSource,
    sha256: Sha256,
    format: DeclaredFormat,
    endorser: Option<String>,
    /// A signed manifest for it, checked by the image policy
    /// ([`super::endorsement`]).
    /// Boxed: a manifest is large beside the rest, and rarely there.
    endorsement: Option<Box<super::Endorsement>>,
}

/// Longest URL accepted; a marketplace URL is far shorter.
const MAX_URL_LEN: usize = 4096;
/// Longest endorser accepted (an e-mail address or a DN).
const MAX_ENDORSER_LEN: usize = 256;

impl ImageRef {
    pub fn new(
        url: &str,
        sha256: &str,
        format: DeclaredFormat,
        endorser: Option<String>,
    ) -> Result<ImageRef> {
        let source = parse_source(url)?;
        let sha256 = Sha256::parse(sha256).map_err(|e| e.context(format!("image {url}")))?;
        let endorser = match endorser {
            None => None,
            Some(e) if e.is_empty() => None,
            Some(e) => {
                if e.len() > MAX_ENDORSER_LEN || e.chars().any(char::is_control) {
                    return Err(Error::invalid(format!(
                        "image {url}: endorser {e:?} is not a printable name of at most \
                         {MAX_ENDORSER_LEN} bytes"
                    )));
                }
                Some(e)
            }
        };
        Ok(ImageRef {
            url: url.to_owned(),
            source,
            sha256,
            format,
            endorser,
            endorsement: None,
        })
    }

    /// With an endorsement token (None or empty: none); a malformed token is
    /// InvalidArgument here, whether it is genuine is the policy's to say.
    pub fn with_endorsement(mut self, token: Option<&str>) -> Result<ImageRef> {
        self.endorsement = match token {
            None | Some("") => None,
            Some(t) => Some(Box::new(
                super::Endorsement::parse(t)
                    .map_err(|e| e.context(format!("image {}", self.url)))?,
            )),
        };
        Ok(self)
    }

    pub fn endorsement(&self) -> Option<&super::Endorsement> {
        self.endorsement.as_deref()
    }

    /// The URL as given, for messages and the cache's metadata.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn source(&self) -> &ImageSource {
        &self.source
    }

    pub fn sha256(&self) -> &Sha256 {
        &self.sha256
    }

    pub fn format(&self) -> DeclaredFormat {
        self.format
    }

    pub fn endorser(&self) -> Option<&str> {
        self.endorser.as_deref()
    }
}

fn parse_source(url: &str) -> Result<ImageSource> {
    let bad = |why: &str| Error::invalid(format!("image URL {url:?}: {why}"));
    if url.len() > MAX_URL_LEN {
        return Err(bad(&format!("longer than {MAX_URL_LEN} bytes")));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("contains spaces or control characters"));
    }
    let scheme_end = url
        .find("://")
        .ok_or_else(|| bad("not a URL (expected http://, https:// or file://)"))?;
    match url[..scheme_end].to_ascii_lowercase().as_str() {
        "http" | "https" => {
            let parsed = Url::parse(url).map_err(|e| bad(&e.to_string()))?;
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(bad("no host"));
            }
            // Credentials in a URL would end up in logs, events and errors.
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err(bad("credentials in image URLs are not accepted"));
            }
            Ok(ImageSource::Http(parsed))
        }
        "file" => {
            // Checked on the raw text: URL parsing would quietly resolve `..`.
            let rest = &url[scheme_end + 3..];
            let path_part = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path_part.starts_with('/') {
                return Err(bad(
                    "a file:// URL needs an absolute path (file:///dir/image)",
                ));
            }
            if path_part.contains(['?', '#']) {
                return Err(bad("a file:// URL has no query or fragment"));
            }
            let decoded = percent_decode(path_part).ok_or_else(|| bad("bad %-escape"))?;
            if decoded.contains('\0') {
                return Err(bad("NUL in path"));
            }
            if decoded.split('/').any(|seg| seg == "..") {
                return Err(bad("`..` is not allowed in a file:// path"));
            }
            let path = PathBuf::from(&decoded);
            debug_assert!(path.is_absolute());
            if path == Path::new("/") {
                return Err(bad("names a directory"));
            }
            Ok(ImageSource::File(path))
        }
        "pdisk" => {
            let volume = url[scheme_end + 3..].trim_start_matches('/');
            volume
                .parse::<stratus_core::types::VolumeName>()
                .map_err(|e| bad(&format!("pdisk:///VOLUME: {e}")))?;
            Ok(ImageSource::Pdisk(volume.to_owned()))
        }
        other => Err(bad(&format!(
            "scheme {other:?} is not supported (use http://, https://, file:// or pdisk:///)"
        ))),
    }
}

/// `%XX` decoding for file:// paths; `None` on a malformed escape or a
/// result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_core::error::ErrorKind;

    const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn r(url: &str) -> Result<ImageRef> {
        ImageRef::new(url, SHA, DeclaredFormat::Auto, None)
    }

    #[test]
    fn accepts_http_https_and_absolute_file_urls() {
        let i = r("https://marketplace.example/images/debian.qcow2?x=1").unwrap();
        assert!(matches!(i.source(), ImageSource::Http(u) if u.scheme() == "https"));
        assert_eq!(
            i.url(),
            "https://marketplace.example/images/debian.qcow2?x=1"
        );
        assert!(matches!(
            r("http://127.0.0.1:8080/a").unwrap().source(),
            ImageSource::Http(_)
        ));
        let f = r("file:///srv/images/my%20disk.img").unwrap();
        assert_eq!(
            f.source(),
            &ImageSource::File(PathBuf::from("/srv/images/my disk.img"))
        );
        let f = r("file://localhost/srv/a.img").unwrap();
        assert_eq!(f.source(), &ImageSource::File(PathBuf::from("/srv/a.img")));
    }

    #[test]
    fn refuses_other_schemes_relative_paths_and_dotdot() {
        for bad in [
            "ftp://host/a.img",
            "/srv/a.img",
            "s3://bucket/a",
            "file://srv/a.img",
            "file:///srv/../etc/shadow",
            "file:///srv/%2e%2e/etc/shadow",
            "file:///srv/a.img?x",
            "http://",
            "http://user:pw@host/a.img",
            "http://host/a b.img",
            "file:///",
        ] {
            let err = r(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{bad}: {err}");
            assert!(err.message().contains("image URL"), "{err}");
        }
    }

    #[test]
    fn checksums_are_64_hex_digits_kept_lowercase() {
        let upper = SHA.to_ascii_uppercase();
        let i = ImageRef::new("http://h/a", &upper, DeclaredFormat::Raw, None).unwrap();
        assert_eq!(i.sha256().as_str(), SHA);
        for bad in [&SHA[1..], "zz", &format!("{}g", &SHA[1..])] {
            let err = ImageRef::new("http://h/a", bad, DeclaredFormat::Raw, None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument);
            assert!(err.message().contains("64 hex digits"), "{err}");
        }
        let mut digest = [0u8; 32];
        digest[0] = 0xab;
        digest[31] = 0x01;
        let s = Sha256::from_digest(digest);
        assert_eq!(s.as_str().len(), 64);
        assert!(s.as_str().starts_with("ab00") && s.as_str().ends_with("0001"));
    }

    #[test]
    fn formats_and_endorsers_parse() {
        assert_eq!(
            "qcow2".parse::<DeclaredFormat>().unwrap(),
            DeclaredFormat::Qcow2
        );
        assert_eq!(
            "raw".parse::<DeclaredFormat>().unwrap(),
            DeclaredFormat::Raw
        );
        assert_eq!(
            "auto".parse::<DeclaredFormat>().unwrap(),
            DeclaredFormat::Auto
        );
        assert!("vmdk".parse::<DeclaredFormat>().is_err());
        let i = ImageRef::new(
            "http://h/a",
            SHA,
            DeclaredFormat::Auto,
            Some("ops@example.org".into()),
        )
        .unwrap();
        assert_eq!(i.endorser(), Some("ops@example.org"));
        let i =
            ImageRef::new("http://h/a", SHA, DeclaredFormat::Auto, Some(String::new())).unwrap();
        assert_eq!(i.endorser(), None);
        assert!(
            ImageRef::new("http://h/a", SHA, DeclaredFormat::Auto, Some("a\nb".into())).is_err()
        );
    }
}
