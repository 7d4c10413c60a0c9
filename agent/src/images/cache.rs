//! The host's image cache: a directory of verified images named by their
//! SHA-256 (`STATE_DIR/images` in agentd), for `local` disks, which are
//! qcow2 overlays on a cached base.
//!
//! Layout: `<sha256>.img` (the image, exactly the published bytes),
//! `<sha256>.json` (url, size, detected format, fetched_at, last_used), and
//! `.partial-*` temporaries. Nothing else is ours; other files are left
//! alone.
//!
//! Invariants, including after a crash at any moment:
//! 1. A `<sha256>.img` holds bytes whose SHA-256 is `<sha256>`: downloads
//!    are written to a `.partial-*` name, verified, fsynced and only then
//!    renamed (the directory fsynced too). No partial file is ever taken for
//!    a cached image; [`LocalCache::open`] deletes every `.partial-*`.
//! 2. The metadata is written (durably) before the image is renamed into
//!    place, so a `.json` without its `.img` is a download that did not
//!    finish and is removed at open; an `.img` without `.json` (removed by
//!    hand) gets its metadata rebuilt from the file.
//! 3. One download per checksum at a time (single flight): concurrent
//!    requests for an image being fetched wait for that download, share its
//!    progress and its result, success or error.
//! 4. A pinned image is never evicted, by quota or by [`LocalCache::evict`].
//!    Pins live in memory only: at start, before the first
//!    [`LocalCache::get_or_fetch`], the agent pins again the base of every
//!    guest that still has an overlay on it.
//! 5. Quota: the images' sizes plus the bytes reserved by downloads in
//!    progress stay within the quota, at every moment, however many
//!    downloads run. Room is made *before* a download as soon as its size
//!    is announced (Content-Length, or a file's length), by evicting
//!    unpinned images least recently used first; if the image alone is
//!    larger than the quota, or pinned images and other downloads leave too
//!    little room, the request fails with ResourceExhausted before the body
//!    is read and nothing is evicted. A download whose size is not announced
//!    (or whose body runs past it) reserves as it streams, in steps of
//!    [`GROW_STEP`], before each piece is written; when the quota cannot
//!    give the next piece room it is cut there with ResourceExhausted, its
//!    partial file removed and its reservation released, like every failed
//!    download's.
//!    The quota is enforced when an image is added, not when it is lowered.
//!
//! Single flight is keyed by checksum: a request that arrives while the
//! same checksum is being fetched from another URL shares that download.
//!
//! The policy, when configured, is checked first, before the cache is even
//! looked at: an image the policy refuses is neither fetched nor served.
//! A qcow2 with a backing file is cached like any other bytes but refused by
//! [`crate::images::overlay`] (and by pdisk's import), where it would be used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::fetch::{FetchTimeouts, Fetcher, Need};
use super::policy::{Endorsed, Policy};
use super::reference::{DeclaredFormat, ImageRef, Sha256};
use super::staging::{self, PARTIAL_PREFIX};
use stratus_core::error::{Error, ErrorKind, Result};
use stratus_core::image::detect_format;
use stratus_core::image::ImageFormat;

/// How a cache is set up.
#[derive(Debug, Clone, Default)]
pub struct CacheOptions {
    /// Bytes the cached images may take; `None`: no limit.
    pub quota: Option<u64>,
    /// Checked before every use; `None`: every image is allowed.
    pub policy: Option<Policy>,
    pub timeouts: FetchTimeouts,
    /// Directories `file://` images may be read from (opened beneath them);
    /// `None`: anywhere the agent can read. agentd always sets it: a
    /// `file://` reference lets whoever calls the API copy any file the
    /// agent can read into a guest's disk.
    pub file_roots: Option<Vec<PathBuf>>,
    /// The addresses downloads may reach (default: no loopback,
    /// link-local or own address).
    pub egress: crate::images::Egress,
}

/// A verified image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    pub sha256: Sha256,
    /// Absolute: `<cache dir>/<sha256>.img`.
    pub path: PathBuf,
    pub size: u64,
    /// From [`LocalCache::get_or_fetch`]: the format to open it with (the
    /// declared one, checked against the magic). From [`LocalCache::list`]:
    /// the format its magic shows.
    pub format: ImageFormat,
}

/// One entry of [`LocalCache::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImageInfo {
    pub image: CachedImage,
    /// The URL it was fetched from ("" when its metadata was rebuilt).
    pub url: String,
    pub fetched_at: SystemTime,
    pub last_used: SystemTime,
    /// Live pins: guests using it.
    pub pins: usize,
    /// The endorsement verified when it was fetched.
    pub endorsed: Option<Endorsed>,
}

/// An image removed to make room (for IMAGE_EVICTED events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictedImage {
    pub sha256: Sha256,
    pub url: String,
    pub size: u64,
}

/// What [`LocalCache::get_or_fetch`] gives back.
#[derive(Debug)]
pub struct PulledImage {
    pub image: CachedImage,
    /// Taken before the image could be evicted again; drop it when no guest
    /// needs the image (a prefetch drops it at once).
    pub pin: PinGuard,
    /// This call started the download that brought the image in (of
    /// concurrent callers, exactly one sees `true`).
    pub downloaded: bool,
    /// Images evicted to make room for it; reported to the caller that
    /// started the download only (and always logged).
    pub evicted: Vec<EvictedImage>,
}

/// Keeps an image from being evicted while it lives.
pub struct PinGuard {
    cache: Arc<Inner>,
    sha256: Sha256,
}

impl PinGuard {
    pub fn sha256(&self) -> &Sha256 {
        &self.sha256
    }
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinGuard({})", self.sha256)
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let touched = {
            let mut st = self.cache.state();
            if let Some(n) = st.pins.get_mut(&self.sha256) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(&self.sha256);
                }
            }
            // Just stopped being used: the most recent use.
            st.images.get_mut(&self.sha256).map(|e| {
                e.last_used = SystemTime::now();
                e.clone()
            })
        };
        if let Some(e) = touched {
            self.cache.save_last_used(&self.sha256, &e);
        }
    }
}

/// The content-addressed image cache of this host. Cheap to clone.
#[derive(Clone)]
pub struct LocalCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalCache({})", self.inner.dir.display())
    }
}

struct Inner {
    dir: PathBuf,
    quota: Option<u64>,
    policy: Option<Policy>,
    fetcher: Fetcher,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    images: HashMap<Sha256, Entry>,
    pins: HashMap<Sha256, usize>,
    /// Downloads in progress, by checksum.
    flights: HashMap<Sha256, watch::Receiver<Flight>>,
    /// Bytes promised to downloads in progress.
    reserved: u64,
    /// For `/metrics`: requests served from the cache, requests that
    /// waited for a download, images removed (quota or EvictImage).
    hits: u64,
    misses: u64,
    evictions: u64,
}

/// The cache's figures for `/metrics` (counts since agentd started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub images: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    url: String,
    size: u64,
    format: ImageFormat,
    fetched_at: SystemTime,
    last_used: SystemTime,
    /// The endorsement the policy verified when it was fetched.
    endorsed: Option<Endorsed>,
}

/// A download's state as its waiters see it.
#[derive(Debug, Clone)]
enum Flight {
    /// `(done, total)` once the download started.
    Running(Option<(u64, u64)>),
    /// Evicted images, or the error (kind and message; sources are not shared).
    Done(std::result::Result<Vec<EvictedImage>, (ErrorKind, String)>),
}

/// The `.json` beside each image.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    sha256: String,
    url: String,
    size: u64,
    format: ImageFormat,
    fetched_at: String,
    last_used: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endorser: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endorser_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endorsement_expires: Option<String>,
}

/// How far ahead a download without an announced size reserves, so it
/// takes the cache's lock once per step rather than once per piece.
const GROW_STEP: u64 = 4 << 20;

/// Rounds of "fetch, then pin" before giving up; more than one only when
/// other downloads evict the image between its arrival and the pin.
const MAX_ROUNDS: usize = 3;

impl LocalCache {
    /// Opens (creating) the cache directory: removes `.partial-*` left by a
    /// crash, drops metadata of images that never arrived, and indexes the
    /// images.
    pub fn open(dir: impl Into<PathBuf>, options: CacheOptions) -> Result<LocalCache> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display(), e))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::io(dir.display(), e))?;
        let images = scan(&dir)?;
        tracing::info!(dir = %dir.display(), images = images.len(),
            bytes = images.values().map(|e| e.size).sum::<u64>(), quota = ?options.quota,
            "image cache opened");
        Ok(LocalCache {
            inner: Arc::new(Inner {
                fetcher: Fetcher::new(
                    options.timeouts,
                    options.file_roots.as_deref(),
                    options.egress,
                )?,
                dir,
                quota: options.quota,
                policy: options.policy,
                state: Mutex::new(State {
                    images,
                    ..State::default()
                }),
            }),
        })
    }

    /// The cache directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The image, pinned: from the cache, or fetched once (concurrent
    /// callers share one download). `progress(done, total)` follows the
    /// download this call waits for, its own or a shared one (total 0 when
    /// unknown), at most about once per MiB; it is never called on a cache
    /// hit, so its first call can announce a pull.
    ///
    /// Errors: the policy's refusal (FailedPrecondition, before anything
    /// else); HTTP errors naming the URL and status; timeouts (Unavailable);
    /// a checksum mismatch (InvalidArgument, showing both checksums); an
    /// image larger than the quota or a cache full of pinned images
    /// (ResourceExhausted); a declared format the image does not have
    /// (InvalidArgument). A failed fetch leaves nothing in the directory.
    pub async fn get_or_fetch(
        &self,
        image: &ImageRef,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<PulledImage> {
        if let Some(policy) = &self.inner.policy {
            policy.check(image)?;
        }
        let sha = image.sha256();
        let mut downloaded = false;
        let mut evicted = Vec::new();
        // Whether this call waited for a download (a miss) or found the
        // image at once (a hit).
        let mut waited = false;
        for _ in 0..MAX_ROUNDS {
            let (mut rx, leader) = {
                let mut st = self.inner.state();
                if let Some((cached, pin)) = self.inner.pin_locked(&mut st, sha) {
                    if waited {
                        st.misses += 1;
                    } else {
                        st.hits += 1;
                    }
                    drop(st);
                    self.inner.save_last_used_of(sha);
                    let format = resolve_format(image, cached.format)?;
                    return Ok(PulledImage {
                        image: CachedImage { format, ..cached },
                        pin,
                        downloaded,
                        evicted,
                    });
                }
                match st.flights.get(sha) {
                    Some(rx) => (rx.clone(), false),
                    None => {
                        let (tx, rx) = watch::channel(Flight::Running(None));
                        st.flights.insert(sha.clone(), rx.clone());
                        tokio::spawn(self.inner.clone().fly(image.clone(), tx));
                        (rx, true)
                    }
                }
            };
            waited = true;
            let outcome = loop {
                // Copied out: the callback must not run under the channel's lock.
                let now = rx.borrow_and_update().clone();
                match now {
                    Flight::Running(None) => {}
                    Flight::Running(Some((done, total))) => progress(done, total),
                    Flight::Done(r) => break r,
                }
                if rx.changed().await.is_err() {
                    // The sender is gone: either after its last word, or
                    // the download task died (panic, runtime shutdown).
                    match &*rx.borrow() {
                        Flight::Done(r) => break r.clone(),
                        _ => {
                            return Err(Error::internal(format!(
                                "image {}: the download stopped without a result",
                                image.url()
                            )))
                        }
                    }
                }
            };
            match outcome {
                Ok(list) if leader => {
                    downloaded = true;
                    evicted.extend(list);
                }
                Ok(_) => {}
                Err((kind, message)) => return Err(Error::new(kind, message)),
            }
        }
        Err(Error::exhausted(format!(
            "image {}: evicted again right after each download; the cache quota is too \
             small for the images in use",
            image.url()
        )))
    }

    /// What `/metrics` shows of the cache.
    pub fn stats(&self) -> CacheStats {
        let st = self.inner.state();
        CacheStats {
            images: st.images.len() as u64,
            bytes: st.images.values().map(|e| e.size).sum(),
            hits: st.hits,
            misses: st.misses,
            evictions: st.evictions,
        }
    }

    /// Pins a cached image (a guest uses it); NotFound if it is not cached.
    /// The agent calls it at start for each guest whose overlay uses it.
    pub fn pin(&self, sha256: &Sha256) -> Result<PinGuard> {
        let pinned = {
            let mut st = self.inner.state();
            self.inner.pin_locked(&mut st, sha256)
        };
        match pinned {
            Some((_, pin)) => {
                self.inner.save_last_used_of(sha256);
                Ok(pin)
            }
            None => Err(Error::not_found(format!(
                "image {sha256} is not in the image cache"
            ))),
        }
    }

    /// Every cached image, most recently used first.
    pub fn list(&self) -> Vec<CachedImageInfo> {
        let st = self.inner.state();
        let mut out: Vec<CachedImageInfo> = st
            .images
            .iter()
            .map(|(sha, e)| CachedImageInfo {
                image: self.inner.cached(sha, e),
                url: e.url.clone(),
                fetched_at: e.fetched_at,
                last_used: e.last_used,
                pins: st.pins.get(sha).copied().unwrap_or(0),
                endorsed: e.endorsed.clone(),
            })
            .collect();
        out.sort_by(|a, b| (b.last_used, &a.image.sha256).cmp(&(a.last_used, &b.image.sha256)));
        out
    }

    /// Removes an image. NotFound when absent; FailedPrecondition when a
    /// guest uses it (pinned) or it is still being downloaded.
    pub fn evict(&self, sha256: &Sha256) -> Result<EvictedImage> {
        let mut st = self.inner.state();
        if !st.images.contains_key(sha256) {
            if st.flights.contains_key(sha256) {
                return Err(Error::precondition(format!(
                    "image {sha256} is being downloaded"
                )));
            }
            return Err(Error::not_found(format!(
                "image {sha256} is not in the image cache"
            )));
        }
        if let Some(n) = st.pins.get(sha256) {
            return Err(Error::precondition(format!(
                "image {sha256} is in use ({n} pin{})",
                if *n == 1 { "" } else { "s" }
            )));
        }
        Ok(self.inner.remove_locked(&mut st, sha256))
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves maps that are still
        // consistent enough to serve and to clean up.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn img_path(&self, sha: &Sha256) -> PathBuf {
        self.dir.join(format!("{sha}.img"))
    }

    fn meta_path(&self, sha: &Sha256) -> PathBuf {
        self.dir.join(format!("{sha}.json"))
    }

    fn cached(&self, sha: &Sha256, e: &Entry) -> CachedImage {
        CachedImage {
            sha256: sha.clone(),
            path: self.img_path(sha),
            size: e.size,
            format: e.format,
        }
    }

    /// Under the lock: pins and touches a cached image.
    fn pin_locked(
        self: &Arc<Self>,
        st: &mut State,
        sha: &Sha256,
    ) -> Option<(CachedImage, PinGuard)> {
        let e = st.images.get_mut(sha)?;
        e.last_used = SystemTime::now();
        let cached = self.cached(sha, e);
        *st.pins.entry(sha.clone()).or_insert(0) += 1;
        Some((
            cached,
            PinGuard {
                cache: self.clone(),
                sha256: sha.clone(),
            },
        ))
    }

    /// Under the lock: deletes an image's files and forgets it. The image
    /// goes first, so a crash between leaves metadata that open() drops.
    fn remove_locked(&self, st: &mut State, sha: &Sha256) -> EvictedImage {
        let e = st.images.remove(sha).expect("caller checked presence");
        st.evictions += 1;
        for path in [self.img_path(sha), self.meta_path(sha)] {
            if let Err(err) = std::fs::remove_file(&path) {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove cached image file");
                }
            }
        }
        tracing::info!(sha256 = %sha, url = %e.url, size = e.size, "image evicted");
        EvictedImage {
            sha256: sha.clone(),
            url: e.url,
            size: e.size,
        }
    }

    fn save_last_used_of(&self, sha: &Sha256) {
        let entry = self.state().images.get(sha).cloned();
        if let Some(e) = entry {
            self.save_last_used(sha, &e);
        }
    }

    /// Best effort: a lost last-used time only changes eviction order.
    fn save_last_used(&self, sha: &Sha256, e: &Entry) {
        if let Err(err) = write_metadata(&self.meta_path(sha), sha, e, false) {
            tracing::warn!(sha256 = %sha, error = %err, "cannot record image use");
        }
    }

    /// The download task of one flight: its result goes to every waiter.
    async fn fly(self: Arc<Self>, image: ImageRef, tx: watch::Sender<Flight>) {
        struct Landing<'a>(&'a Inner, &'a Sha256);
        impl Drop for Landing<'_> {
            fn drop(&mut self) {
                self.0.state().flights.remove(self.1);
            }
        }
        let landing = Landing(&self, image.sha256());
        let result = self.download(&image, &tx).await;
        match &result {
            Ok(_) => tracing::info!(url = %image.url(), sha256 = %image.sha256(), "image cached"),
            Err(e) => tracing::warn!(url = %image.url(), error = %e, "image download failed"),
        }
        // Published (or failed) before the flight ends, so a caller that no
        // longer finds the flight finds the image, or starts a new try.
        drop(landing);
        tx.send_replace(Flight::Done(
            result.map_err(|e| (e.kind(), e.message().to_owned())),
        ));
    }

    async fn download(
        &self,
        image: &ImageRef,
        tx: &watch::Sender<Flight>,
    ) -> Result<Vec<EvictedImage>> {
        let sha = image.sha256();
        let url = image.url();
        tracing::info!(url, sha256 = %sha, "downloading image");
        let mut evicted = Vec::new();
        let mut reservation = Reservation {
            cache: self,
            bytes: 0,
        };
        let mut room = |need: Need| -> Result<()> {
            let held = reservation.bytes;
            match need {
                Need::Announced(n) if n > held => {
                    evicted.extend(self.make_room(image, need, n - held, &mut reservation)?);
                }
                Need::Received(done) if done > held => {
                    // Ahead by a step (within the quota); when only the
                    // exact bytes fit, those are enough to go on.
                    let ahead = done.div_ceil(GROW_STEP).saturating_mul(GROW_STEP);
                    let ahead = self.quota.map_or(ahead, |q| ahead.min(q)).max(done);
                    match self.make_room(image, need, ahead - held, &mut reservation) {
                        Ok(gone) => evicted.extend(gone),
                        Err(_) if ahead > done => {
                            evicted.extend(self.make_room(
                                image,
                                need,
                                done - held,
                                &mut reservation,
                            )?);
                        }
                        Err(e) => return Err(e),
                    }
                }
                _ => {}
            }
            Ok(())
        };
        let download = self
            .fetcher
            .fetch(image, &self.dir, &mut room, &mut |done, total| {
                tx.send_replace(Flight::Running(Some((done, total))));
            })
            .await?;
        debug_assert!(self.quota.is_none() || download.size <= reservation.bytes);
        // detect_format names the temporary; the user knows the URL.
        let format = detect_format(download.file.path()).map_err(|e| {
            let tmp = download.file.path().display().to_string();
            Error::new(e.kind(), e.message().replace(&tmp, url))
        })?;
        let now = SystemTime::now();
        // Recorded with the image: who vouched for it, with which key.
        let endorsed = self
            .policy
            .as_ref()
            .and_then(|p| p.check(image).ok().flatten());
        let entry = Entry {
            url: url.to_owned(),
            size: download.size,
            format,
            fetched_at: now,
            last_used: now,
            endorsed,
        };
        let meta = self.meta_path(sha);
        crate::failpoints::crash_point("image.downloaded");
        write_metadata(&meta, sha, &entry, true)?;
        crate::failpoints::crash_point("image.meta_written");
        if let Err(e) = download.file.publish(&self.img_path(sha)) {
            let _ = std::fs::remove_file(&meta);
            return Err(e);
        }
        crate::failpoints::crash_point("image.published");
        let mut st = self.state();
        st.images.insert(sha.clone(), entry);
        reservation.release(&mut st);
        Ok(evicted)
    }

    /// Reserves `more` bytes for `image`'s download, which asked for room
    /// with `need`, evicting unpinned images least recently used first.
    /// Refuses without evicting anything when the room cannot be made.
    fn make_room(
        &self,
        image: &ImageRef,
        need: Need,
        more: u64,
        reservation: &mut Reservation<'_>,
    ) -> Result<Vec<EvictedImage>> {
        let Some(quota) = self.quota else {
            return Ok(Vec::new());
        };
        let url = image.url();
        let wanted = reservation.bytes + more;
        if wanted > quota {
            return Err(Error::exhausted(match need {
                Need::Announced(n) => format!(
                    "image {url} is {n} bytes, more than the image cache quota ({quota} bytes)"
                ),
                Need::Received(done) => format!(
                    "image {url}: download cut after {done} bytes, more than the image cache \
                     quota ({quota} bytes; the server announced no size, or a smaller one); \
                     nothing was kept"
                ),
            }));
        }
        let mut st = self.state();
        let cached: u64 = st.images.values().map(|e| e.size).sum();
        let evictable: u64 = st
            .images
            .iter()
            .filter(|(sha, _)| !st.pins.contains_key(*sha))
            .map(|(_, e)| e.size)
            .sum();
        let held = cached - evictable + st.reserved;
        if held + more > quota {
            return Err(Error::exhausted(match need {
                Need::Announced(n) => format!(
                    "image {url} needs {n} bytes but the image cache quota ({quota} bytes) is \
                     held by images in use or being downloaded ({held} bytes)"
                ),
                Need::Received(done) => format!(
                    "image {url}: download cut after {done} bytes (the server announced no \
                     size, or a smaller one): the image cache quota ({quota} bytes) is held by \
                     images in use or being downloaded ({held} bytes, this download's \
                     {} included); nothing was kept",
                    reservation.bytes
                ),
            }));
        }
        let mut evicted = Vec::new();
        let mut used = cached + st.reserved;
        while used + more > quota {
            let victim = st
                .images
                .iter()
                .filter(|(sha, _)| !st.pins.contains_key(*sha))
                .min_by(|a, b| (a.1.last_used, a.0).cmp(&(b.1.last_used, b.0)))
                .map(|(sha, _)| sha.clone())
                .expect("the evictable bytes cover the need");
            let gone = self.remove_locked(&mut st, &victim);
            used -= gone.size;
            evicted.push(gone);
        }
        st.reserved += more;
        reservation.bytes += more;
        Ok(evicted)
    }
}

/// Bytes a download holds in the quota; given back when it ends.
struct Reservation<'a> {
    cache: &'a Inner,
    bytes: u64,
}

impl Reservation<'_> {
    fn release(&mut self, st: &mut State) {
        st.reserved -= self.bytes;
        self.bytes = 0;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut st = self.cache.state();
            st.reserved -= self.bytes;
        }
    }
}

/// The format to open a cached image with, given what its reference declares.
fn resolve_format(image: &ImageRef, detected: ImageFormat) -> Result<ImageFormat> {
    match (image.format(), detected) {
        (DeclaredFormat::Auto, d) => Ok(d),
        (DeclaredFormat::Raw, _) => Ok(ImageFormat::Raw),
        (DeclaredFormat::Qcow2, ImageFormat::Qcow2) => Ok(ImageFormat::Qcow2),
        (DeclaredFormat::Qcow2, ImageFormat::Raw) => Err(Error::invalid(format!(
            "image {} is declared qcow2 but its content is not qcow2",
            image.url()
        ))),
    }
}

fn write_metadata(path: &Path, sha: &Sha256, e: &Entry, durable: bool) -> Result<()> {
    let meta = Metadata {
        sha256: sha.to_string(),
        url: e.url.clone(),
        size: e.size,
        format: e.format,
        fetched_at: humantime::format_rfc3339_nanos(e.fetched_at).to_string(),
        last_used: humantime::format_rfc3339_nanos(e.last_used).to_string(),
        endorser: e.endorsed.as_ref().map(|d| d.endorser.clone()),
        endorser_key: e.endorsed.as_ref().map(|d| d.signer.clone()),
        endorsement_expires: e.endorsed.as_ref().map(|d| d.expires.clone()),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    staging::write_atomically(path, &json, durable)
}

fn read_metadata(path: &Path) -> std::result::Result<Entry, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let m: Metadata = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    let time = |s: &str| humantime::parse_rfc3339(s).map_err(|e| format!("{s}: {e}"));
    Ok(Entry {
        url: m.url,
        size: m.size,
        format: m.format,
        fetched_at: time(&m.fetched_at)?,
        last_used: time(&m.last_used)?,
        endorsed: match (m.endorser, m.endorser_key) {
            (Some(endorser), Some(signer)) => Some(Endorsed {
                endorser,
                signer,
                expires: m.endorsement_expires.unwrap_or_default(),
            }),
            _ => None,
        },
    })
}

/// Reads the directory at open: see the module's invariants 1 and 2.
fn scan(dir: &Path) -> Result<HashMap<Sha256, Entry>> {
    let mut imgs = Vec::new();
    let mut metas = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir.display(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir.display(), e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = |suffix: &str| {
            name.strip_suffix(suffix)
                .and_then(|stem| Sha256::parse(stem).ok().filter(|s| s.as_str() == stem))
        };
        if name.starts_with(PARTIAL_PREFIX) {
            tracing::info!(path = %entry.path().display(), "removing an unfinished download");
            std::fs::remove_file(entry.path()).map_err(|e| Error::io(entry.path().display(), e))?;
        } else if let Some(sha) = ours(".img") {
            imgs.push(sha);
        } else if let Some(sha) = ours(".json") {
            metas.push(sha);
        } else {
            tracing::warn!(path = %entry.path().display(), "unknown file in the image cache; left alone");
        }
    }
    let mut images = HashMap::new();
    for sha in imgs {
        let img = dir.join(format!("{sha}.img"));
        let meta_path = dir.join(format!("{sha}.json"));
        let md = std::fs::metadata(&img).map_err(|e| Error::io(img.display(), e))?;
        let entry = match read_metadata(&meta_path) {
            Ok(mut e) => {
                if e.size != md.len() {
                    tracing::warn!(path = %img.display(), recorded = e.size, actual = md.len(),
                        "cached image size differs from its metadata");
                    e.size = md.len();
                }
                e
            }
            Err(why) => {
                tracing::warn!(path = %img.display(), %why, "rebuilding image metadata");
                let format = match detect_format(&img) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(path = %img.display(), error = %e, "not indexed");
                        continue;
                    }
                };
                let mtime = md.modified().unwrap_or_else(|_| SystemTime::now());
                let e = Entry {
                    url: String::new(),
                    size: md.len(),
                    format,
                    fetched_at: mtime,
                    last_used: mtime,
                    endorsed: None,
                };
                write_metadata(&meta_path, &sha, &e, true)?;
                e
            }
        };
        images.insert(sha, entry);
    }
    for sha in metas {
        if !images.contains_key(&sha) && !dir.join(format!("{sha}.img")).exists() {
            let path = dir.join(format!("{sha}.json"));
            tracing::info!(path = %path.display(), "removing metadata of an image that never arrived");
            std::fs::remove_file(&path).map_err(|e| Error::io(path.display(), e))?;
        }
    }
    Ok(images)
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
