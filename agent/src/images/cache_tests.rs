//! Unit tests of the cache and the fetcher against the loopback test server.

use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;
use tokio::sync::Notify;

use super::*;
use crate::images::test_http::{Reply, TestHttp};
use stratus_core::error::ErrorKind;

const MIB: usize = 1 << 20;

fn sha_of(bytes: &[u8]) -> String {
    Sha256::from_digest(sha2::Sha256::digest(bytes).into()).to_string()
}

/// Distinct, non-zero content for each seed.
fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn open(dir: &Path, quota: Option<u64>) -> LocalCache {
    LocalCache::open(
        dir,
        CacheOptions {
            quota,
            egress: crate::images::Egress::allow_private(),
            ..CacheOptions::default()
        },
    )
    .unwrap()
}

fn reference(url: &str, body: &[u8]) -> ImageRef {
    ImageRef::new(url, &sha_of(body), DeclaredFormat::Auto, None).unwrap()
}

/// Serves `body` at `path` and returns its reference.
fn serve(http: &TestHttp, path: &str, body: &[u8]) -> ImageRef {
    http.route(path, Reply::Body(body.to_vec()));
    reference(&http.url(path), body)
}

async fn fetch(cache: &LocalCache, image: &ImageRef) -> Result<PulledImage> {
    cache.get_or_fetch(image, |_, _| {}).await
}

#[tokio::test]
async fn fetches_verifies_publishes_and_then_serves_from_the_cache() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let body = content(3 * MIB + 17, 1);
    let image = serve(&http, "/debian.img", &body);
    let sha = image.sha256().clone();

    let mut calls = Vec::new();
    let pulled = cache
        .get_or_fetch(&image, |done, total| calls.push((done, total)))
        .await
        .unwrap();
    assert!(pulled.downloaded);
    assert!(pulled.evicted.is_empty());
    assert_eq!(pulled.image.sha256, sha);
    assert_eq!(pulled.image.size, body.len() as u64);
    assert_eq!(pulled.image.format, ImageFormat::Raw);
    assert_eq!(pulled.image.path, cache.dir().join(format!("{sha}.img")));
    assert_eq!(std::fs::read(&pulled.image.path).unwrap(), body);
    assert_eq!(
        names(dir.path()),
        [format!("{sha}.img"), format!("{sha}.json")]
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.dir().join(format!("{sha}.json"))).unwrap())
            .unwrap();
    assert_eq!(meta["url"], image.url());
    assert_eq!(meta["format"], "raw");
    assert_eq!(meta["size"], body.len() as u64);

    // Progress: from 0 to the total, growing, about once per MiB.
    let total = body.len() as u64;
    assert_eq!(calls.first(), Some(&(0, total)));
    assert_eq!(calls.last(), Some(&(total, total)));
    assert!(calls.windows(2).all(|w| w[0].0 < w[1].0), "{calls:?}");
    assert!(calls.len() <= 3 + 2, "{calls:?}");

    drop(pulled);
    let mut called = false;
    let again = cache
        .get_or_fetch(&image, |_, _| called = true)
        .await
        .unwrap();
    assert!(!again.downloaded);
    assert!(!called);
    assert_eq!(http.requests(), 1);
    let list = cache.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].pins, 1);
    assert_eq!(list[0].url, image.url());
}

#[tokio::test]
async fn a_checksum_mismatch_shows_both_and_leaves_nothing() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let served = content(MIB + 3, 2);
    let expected = content(MIB + 3, 3);
    http.route("/img", Reply::Body(served.clone()));
    let image = reference(&http.url("/img"), &expected);

    let err = fetch(&cache, &image).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let want = format!(
        "expected sha256 {}, got {}",
        sha_of(&expected),
        sha_of(&served)
    );
    assert!(err.message().contains(&want), "{err}");
    assert!(err.message().contains(&http.url("/img")), "{err}");
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    assert!(cache.list().is_empty());
}

#[tokio::test]
async fn http_errors_name_the_url_and_status() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let image = reference(&http.url("/missing.img"), b"x");
    let err = fetch(&cache, &image).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.message().contains(&http.url("/missing.img")), "{err}");
    assert!(err.message().contains("HTTP 404 Not Found"), "{err}");

    http.route("/busy", Reply::Status(503, "Service Unavailable"));
    let err = fetch(&cache, &reference(&http.url("/busy"), b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("503"), "{err}");
    http.route("/secret", Reply::Status(403, "Forbidden"));
    let err = fetch(&cache, &reference(&http.url("/secret"), b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(names(dir.path()).is_empty());
}

#[tokio::test]
async fn a_truncated_body_is_an_error_and_leaves_nothing() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let body = content(2 * MIB, 4);
    http.route(
        "/cut",
        Reply::Truncated {
            body: body.clone(),
            sent: MIB + 5,
        },
    );
    let err = fetch(&cache, &reference(&http.url("/cut"), &body))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains(&http.url("/cut")), "{err}");
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
}

#[tokio::test]
async fn a_stalled_download_times_out_and_leaves_nothing() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(
        dir.path(),
        CacheOptions {
            timeouts: FetchTimeouts {
                connect: Duration::from_secs(10),
                idle: Duration::from_millis(300),
            },
            egress: crate::images::Egress::allow_private(),
            ..CacheOptions::default()
        },
    )
    .unwrap();
    http.route("/stall", Reply::Stall);
    let err = fetch(&cache, &reference(&http.url("/stall"), b"x"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("no data for 0.3s"), "{err}");
    assert!(names(dir.path()).is_empty());
}

#[tokio::test]
async fn a_refused_connection_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let url = format!("http://127.0.0.1:{port}/a.img");
    let err = fetch(&cache, &reference(&url, b"x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("cannot connect"), "{err}");
    assert!(err.message().contains(&url), "{err}");
}

#[tokio::test]
async fn file_urls_are_copied_verified_and_typed_by_magic() {
    let src = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let mut qcow2 = b"QFI\xfb\0\0\0\x03".to_vec();
    qcow2.extend(content(MIB, 5));
    let path = src.path().join("my image.qcow2");
    std::fs::write(&path, &qcow2).unwrap();
    let url = format!("file://{}", path.display()).replace(' ', "%20");

    let pulled = fetch(&cache, &reference(&url, &qcow2)).await.unwrap();
    assert_eq!(pulled.image.format, ImageFormat::Qcow2);
    assert_eq!(std::fs::read(&pulled.image.path).unwrap(), qcow2);
    assert!(pulled.downloaded);

    // A declared format wins over the magic only in the safe direction.
    let as_raw = ImageRef::new(&url, &sha_of(&qcow2), DeclaredFormat::Raw, None).unwrap();
    assert_eq!(
        fetch(&cache, &as_raw).await.unwrap().image.format,
        ImageFormat::Raw
    );
    let raw = content(4096, 6);
    let raw_path = src.path().join("raw.img");
    std::fs::write(&raw_path, &raw).unwrap();
    let raw_url = format!("file://{}", raw_path.display());
    let as_qcow2 = ImageRef::new(&raw_url, &sha_of(&raw), DeclaredFormat::Qcow2, None).unwrap();
    let err = fetch(&cache, &as_qcow2).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("declared qcow2"), "{err}");

    let gone = format!("file://{}/nothing.img", src.path().display());
    let err = fetch(&cache, &reference(&gone, b"x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");

    // Refused formats do not enter the cache.
    let vmdk = b"KDMV\x01\0\0\0rest".to_vec();
    let vmdk_path = src.path().join("disk.vmdk");
    std::fs::write(&vmdk_path, &vmdk).unwrap();
    let vmdk_url = format!("file://{}", vmdk_path.display());
    let err = fetch(&cache, &reference(&vmdk_url, &vmdk))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(
        err.message().contains(&format!("image {vmdk_url} is vmdk")),
        "{err}"
    );
    assert_eq!(names(dir.path()).len(), 4, "{:?}", names(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_download_once() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let body = content(2 * MIB, 7);
    let gate = Arc::new(Notify::new());
    http.route(
        "/popular.img",
        Reply::Gated {
            body: body.clone(),
            gate: gate.clone(),
        },
    );
    let image = reference(&http.url("/popular.img"), &body);

    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let (cache, image) = (cache.clone(), image.clone());
            tokio::spawn(async move { fetch(&cache, &image).await })
        })
        .collect();
    // The body is held back until the first request arrived and every task
    // had time to join its flight.
    for _ in 0..500 {
        if http.requests() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile nothing looks cached: there is only the temporary.
    let during = names(dir.path());
    assert_eq!(during.len(), 1, "{during:?}");
    assert!(during[0].starts_with(".partial-"), "{during:?}");
    assert!(cache.list().is_empty());
    // All five are waiting: on the one download, as nothing is cached yet.
    assert!(tasks.iter().all(|t| !t.is_finished()));
    gate.notify_one();

    let mut leaders = 0;
    for t in tasks {
        let pulled = t.await.unwrap().unwrap();
        assert_eq!(std::fs::read(&pulled.image.path).unwrap(), body);
        leaders += usize::from(pulled.downloaded);
    }
    assert_eq!(http.requests(), 1);
    assert_eq!(leaders, 1);
    assert_eq!(cache.list()[0].pins, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_a_failure() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let gate = Arc::new(Notify::new());
    http.route(
        "/bad.img",
        Reply::Gated {
            body: content(1000, 8),
            gate: gate.clone(),
        },
    );
    let image = reference(&http.url("/bad.img"), b"something else");
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let (cache, image) = (cache.clone(), image.clone());
            tokio::spawn(async move { fetch(&cache, &image).await })
        })
        .collect();
    for _ in 0..500 {
        if http.requests() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.notify_one();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(err.message().contains("checksum mismatch"), "{err}");
    }
    assert_eq!(http.requests(), 1);
    assert!(names(dir.path()).is_empty());
}

#[tokio::test]
async fn the_quota_evicts_least_recently_used_but_never_pinned_images() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), Some(3 * MIB as u64));
    let bodies: Vec<Vec<u8>> = (0..5).map(|i| content(MIB, 10 + i)).collect();
    let images: Vec<ImageRef> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| serve(&http, &format!("/{i}.img"), b))
        .collect();
    let [a, b, c, d, e] = &images[..] else {
        unreachable!()
    };

    // A is the oldest but pinned (a guest runs on it); C is the least
    // recently used of the others, since B is used again after C arrives.
    let pin_a = fetch(&cache, a).await.unwrap().pin;
    drop(fetch(&cache, b).await.unwrap());
    drop(fetch(&cache, c).await.unwrap());
    drop(cache.pin(b.sha256()).unwrap());

    let pulled = fetch(&cache, d).await.unwrap();
    assert_eq!(
        pulled.evicted,
        [EvictedImage {
            sha256: c.sha256().clone(),
            url: c.url().to_owned(),
            size: MIB as u64,
        }]
    );
    let mut cached: Vec<Sha256> = cache.list().into_iter().map(|i| i.image.sha256).collect();
    cached.sort();
    let mut want = vec![a.sha256().clone(), b.sha256().clone(), d.sha256().clone()];
    want.sort();
    assert_eq!(cached, want);
    assert!(!cache.dir().join(format!("{}.img", c.sha256())).exists());
    assert_eq!(names(dir.path()).len(), 6);

    // Everything pinned: no room, nothing evicted, nothing left behind.
    let pin_b = cache.pin(b.sha256()).unwrap();
    let pin_d = pulled.pin;
    let err = fetch(&cache, e).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert!(err.message().contains("in use"), "{err}");
    assert_eq!(cache.list().len(), 3);
    assert_eq!(names(dir.path()).len(), 6);

    // An image larger than the whole quota.
    let big = content(3 * MIB + 1, 20);
    let err = fetch(&cache, &serve(&http, "/big.img", &big))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert!(
        err.message().contains("more than the image cache quota"),
        "{err}"
    );

    // Unpinned, it can go.
    drop((pin_a, pin_b, pin_d));
    let pulled = fetch(&cache, e).await.unwrap();
    assert_eq!(pulled.evicted.len(), 1);
    assert_eq!(cache.list().len(), 3);
}

/// Bytes of every file in the cache directory, temporaries included.
fn bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Starts fetching `image` in a task and returns once `bytes` of it have
/// arrived (and so have been given room).
async fn fetch_until(
    cache: &LocalCache,
    image: &ImageRef,
    bytes: u64,
) -> tokio::task::JoinHandle<Result<PulledImage>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (cache, image) = (cache.clone(), image.clone());
    let task = tokio::spawn(async move {
        cache
            .get_or_fetch(&image, move |done, _| {
                let _ = tx.send(done);
            })
            .await
    });
    loop {
        let done = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("the download progresses")
            .expect("the download reached the gate");
        if done >= bytes {
            return task;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_and_unsized_downloads_stay_within_the_quota() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let quota = 5 * MIB as u64;
    let cache = open(dir.path(), Some(quota));
    let serve_unsized = |path: &str, body: &[u8], gate: Option<Arc<Notify>>| {
        http.route(
            path,
            Reply::Unsized {
                body: body.to_vec(),
                first: MIB,
                gate,
            },
        );
        reference(&http.url(path), body)
    };

    // A, with no Content-Length, is held after 1 MiB: it has reserved a
    // step ahead (4 MiB) of what arrived.
    let gate = Arc::new(Notify::new());
    let a_body = content(3 * MIB, 40);
    let a = serve_unsized("/a.img", &a_body, Some(gate.clone()));
    let a_task = fetch_until(&cache, &a, MIB as u64).await;

    // B announces 3 MiB: refused before its body is read.
    let b = serve(&http, "/b.img", &content(3 * MIB, 41));
    let err = fetch(&cache, &b).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(
        err.message().contains(&format!(
            "needs {} bytes but the image cache quota ({quota} bytes) is held by images in \
             use or being downloaded ({} bytes)",
            3 * MIB,
            4 * MIB
        )),
        "{err}"
    );

    // U, also without Content-Length, gets the 1 MiB left and is cut at the
    // piece past it: its partial file goes, A's stays.
    let u_body = content(3 * MIB, 42);
    let u = serve_unsized("/u.img", &u_body, None);
    let err = fetch(&cache, &u).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    let m = err.message();
    assert!(
        m.contains(&format!("image {}: download cut after ", u.url()))
            && m.contains(&format!("the image cache quota ({quota} bytes) is held"))
            && m.contains("nothing was kept"),
        "{m}"
    );
    let during = names(dir.path());
    assert_eq!(during.len(), 1, "{during:?}");
    assert!(during[0].starts_with(".partial-"), "{during:?}");
    assert!(bytes_on_disk(dir.path()) <= quota);

    // A completes within its reservation.
    gate.notify_one();
    let pulled = a_task.await.unwrap().unwrap();
    assert_eq!(std::fs::read(&pulled.image.path).unwrap(), a_body);
    drop(pulled);

    // The cache still works: U again, growing its reservation as it
    // streams, evicts A (unpinned, least recently used) to fit.
    let pulled = fetch(&cache, &u).await.unwrap();
    assert_eq!(std::fs::read(&pulled.image.path).unwrap(), u_body);
    assert_eq!(pulled.evicted.len(), 1);
    assert_eq!(&pulled.evicted[0].sha256, a.sha256());
    assert_eq!(names(dir.path()).len(), 2);
    assert!(bytes_on_disk(dir.path()) <= quota);

    // Without Content-Length and larger than the whole quota (an empty
    // cache): cut, told so.
    drop(pulled);
    cache.evict(u.sha256()).unwrap();
    let big = serve_unsized("/big.img", &content(5 * MIB + 1, 43), None);
    let err = fetch(&cache, &big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted, "{err}");
    assert!(
        err.message()
            .contains(&format!("more than the image cache quota ({quota} bytes")),
        "{err}"
    );
    assert!(names(dir.path()).is_empty());
}

#[tokio::test]
async fn evict_refuses_pinned_and_unknown_images() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), None);
    let body = content(1000, 30);
    let image = serve(&http, "/a.img", &body);
    let pulled = fetch(&cache, &image).await.unwrap();
    let second = cache.pin(image.sha256()).unwrap();
    let err = cache.evict(image.sha256()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.message().contains("in use (2 pins)"), "{err}");
    drop(pulled.pin);
    drop(second);
    let gone = cache.evict(image.sha256()).unwrap();
    assert_eq!(gone.size, 1000);
    assert!(names(dir.path()).is_empty());
    assert_eq!(
        cache.evict(image.sha256()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        cache.pin(image.sha256()).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn the_policy_refuses_before_any_request() {
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let denied = content(100, 40);
    let other = content(100, 41);
    let policy = Policy::from_toml(&format!(
        "deny_sha256 = [\"{}\"]\nallow_endorsers = [\"ops@example.org\"]",
        sha_of(&denied)
    ))
    .unwrap();
    let cache = LocalCache::open(
        dir.path(),
        CacheOptions {
            policy: Some(policy),
            egress: crate::images::Egress::allow_private(),
            ..CacheOptions::default()
        },
    )
    .unwrap();
    http.route("/d", Reply::Body(denied.clone()));
    http.route("/o", Reply::Body(other.clone()));
    let with = |url: &str, body: &[u8], endorser: Option<&str>| {
        ImageRef::new(
            url,
            &sha_of(body),
            DeclaredFormat::Auto,
            endorser.map(String::from),
        )
        .unwrap()
    };
    let cases = [
        (
            with(&http.url("/d"), &denied, Some("ops@example.org")),
            "denied checksum",
        ),
        (
            with(&http.url("/o"), &other, Some("eve@example.org")),
            "endorser eve@example.org not allowed",
        ),
        (with(&http.url("/o"), &other, None), "not in the allow list"),
    ];
    for (image, why) in cases {
        let err = fetch(&cache, &image).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.message().contains(why), "{err}");
    }
    assert_eq!(http.requests(), 0);
    assert!(names(dir.path()).is_empty());
    // What the policy allows goes through.
    fetch(
        &cache,
        &with(&http.url("/o"), &other, Some("ops@example.org")),
    )
    .await
    .unwrap();
    assert_eq!(http.requests(), 1);
}

#[tokio::test]
async fn endorsements_are_checked_before_any_request_and_recorded_with_the_image() {
    use crate::images::endorsement::{rfc3339, Manifest};
    use crate::images::SigningKey;
    let http = TestHttp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let body = content(3000, 60);
    http.route("/e", Reply::Body(body.clone()));
    let (_, trusted) = SigningKey::generate().unwrap();
    let (_, stranger) = SigningKey::generate().unwrap();
    let options = || CacheOptions {
        policy: Some(
            Policy::from_toml(&format!(
                "allow_endorser_keys = [\"{}\"]\nrequire_endorsement = true",
                trusted.public()
            ))
            .unwrap(),
        ),
        egress: crate::images::Egress::allow_private(),
        ..CacheOptions::default()
    };
    let cache = LocalCache::open(dir.path(), options()).unwrap();
    let now = SystemTime::now();
    let url = http.url("/e");
    let manifest = |sha: String, issued: SystemTime, expires: SystemTime| Manifest {
        url: url.clone(),
        sha256: sha,
        format: "auto".into(),
        endorser: "ops@example.org".into(),
        issued: rfc3339(issued),
        expires: rfc3339(expires),
        signer: String::new(),
    };
    let image = |token: &str| {
        ImageRef::new(&url, &sha_of(&body), DeclaredFormat::Auto, None)
            .unwrap()
            .with_endorsement(Some(token))
            .unwrap()
    };
    let hour = Duration::from_secs(3600);
    let good = trusted.sign(manifest(sha_of(&body), now - hour, now + hour));
    // Tampered: the manifest says another checksum, the signature is the good one's.
    let (_, sig) = good.split_once('.').unwrap();
    let mut changed = manifest(sha_of(&body), now - hour, now + hour);
    changed.signer = trusted.public().to_string();
    changed.sha256 = sha_of(b"something else");
    let tampered = format!(
        "{}.{sig}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&changed).unwrap()
        )
    );
    let untrusted = stranger.sign(manifest(sha_of(&body), now - hour, now + hour));
    let expired = trusted.sign(manifest(sha_of(&body), now - 2 * hour, now - hour));
    for (token, why) in [
        (tampered.as_str(), "does not verify"),
        (untrusted.as_str(), "not a trusted endorser key"),
        (expired.as_str(), "expired"),
    ] {
        let err = fetch(&cache, &image(token)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
        assert!(err.message().contains(why), "{why}: {err}");
    }
    let unendorsed = ImageRef::new(&url, &sha_of(&body), DeclaredFormat::Auto, None).unwrap();
    let err = fetch(&cache, &unendorsed).await.unwrap_err();
    assert!(err.message().contains("no endorsement"), "{err}");
    assert_eq!(http.requests(), 0, "every refusal came before any request");
    assert!(names(dir.path()).is_empty());

    drop(fetch(&cache, &image(&good)).await.unwrap());
    assert_eq!(http.requests(), 1);
    let listed = |c: &LocalCache| c.list()[0].endorsed.clone().expect("recorded");
    let e = listed(&cache);
    assert_eq!(e.endorser, "ops@example.org");
    assert_eq!(e.signer, trusted.public().to_string());
    // Kept in the image's metadata: a reopened cache still knows.
    drop(cache);
    assert_eq!(listed(&LocalCache::open(dir.path(), options()).unwrap()), e);
}

#[test]
fn open_cleans_up_what_a_crash_left() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kept = content(5000, 50);
    let orphan = content(10, 51);
    let bare = content(3000, 52);
    let (kept_sha, orphan_sha, bare_sha) = (sha_of(&kept), sha_of(&orphan), sha_of(&bare));
    {
        let cache = open(d, None);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let src = tempfile::tempdir().unwrap();
        let p = src.path().join("k.img");
        std::fs::write(&p, &kept).unwrap();
        let url = format!("file://{}", p.display());
        rt.block_on(fetch(&cache, &reference(&url, &kept))).unwrap();
    }
    // A download killed mid-way, metadata whose image never arrived, an
    // image whose metadata was lost, and someone else's file.
    std::fs::write(d.join(".partial-0123abcd"), b"half an image").unwrap();
    std::fs::write(d.join(".partial-4567.tmp"), b"{").unwrap();
    std::fs::write(d.join(format!("{orphan_sha}.json")), b"{}").unwrap();
    std::fs::write(d.join(format!("{bare_sha}.img")), &bare).unwrap();
    std::fs::write(d.join("README"), b"not ours").unwrap();

    let cache = open(d, None);
    let mut want = vec![
        format!("{kept_sha}.img"),
        format!("{kept_sha}.json"),
        format!("{bare_sha}.img"),
        format!("{bare_sha}.json"),
        "README".to_owned(),
    ];
    want.sort();
    assert_eq!(names(d), want);
    let list = cache.list();
    assert_eq!(list.len(), 2);
    let kept_info = list
        .iter()
        .find(|i| i.image.sha256.as_str() == kept_sha)
        .unwrap();
    assert!(kept_info.url.starts_with("file://"));
    assert_eq!(kept_info.image.size, 5000);
    let bare_info = list
        .iter()
        .find(|i| i.image.sha256.as_str() == bare_sha)
        .unwrap();
    assert_eq!(bare_info.url, "");
    assert_eq!(bare_info.image.format, ImageFormat::Raw);
    assert_eq!(bare_info.image.size, 3000);
    drop(cache.pin(&Sha256::parse(&bare_sha).unwrap()).unwrap());
}

#[tokio::test]
async fn file_urls_stay_inside_the_file_roots() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = LocalCache::open(
        dir.path(),
        CacheOptions {
            file_roots: Some(vec![root.path().to_owned()]),
            egress: crate::images::Egress::allow_private(),
            ..CacheOptions::default()
        },
    )
    .unwrap();
    let body = content(4096, 60);
    let secret = outside.path().join("secret");
    std::fs::write(&secret, &body).unwrap();
    std::fs::write(root.path().join("ok.img"), &body).unwrap();
    std::os::unix::fs::symlink(&secret, root.path().join("link.img")).unwrap();

    for (path, why) in [
        (secret.clone(), "is not under any --image-file-root"),
        (root.path().join("link.img"), "leads out of"),
    ] {
        let url = format!("file://{}", path.display());
        let err = fetch(&cache, &reference(&url, &body)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        assert!(err.message().contains(why), "{err}");
    }
    // Outside the roots, even a missing file is not looked up.
    let url = format!("file://{}/missing", outside.path().display());
    let err = fetch(&cache, &reference(&url, &body)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(names(dir.path()).is_empty());

    let url = format!("file://{}/ok.img", root.path().display());
    fetch(&cache, &reference(&url, &body)).await.unwrap();
}

/// Image URLs may not reach loopback (nor link-local or this host's own
/// addresses) unless allowed, at the first hop or any redirect; redirects
/// are limited; no message carries what the server sent.
#[tokio::test]
async fn downloads_reach_only_allowed_addresses_at_every_hop() {
    use crate::images::Egress;
    let http = TestHttp::start().await;
    let body = content(4096, 61);
    http.route("/img", Reply::Body(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let with = |egress| {
        LocalCache::open(
            dir.path(),
            CacheOptions {
                egress,
                ..CacheOptions::default()
            },
        )
        .unwrap()
    };
    let denied = stratus_core::error::ErrorKind::PermissionDenied;

    // Loopback by IP literal and by name: refused before any request.
    let strict = with(Egress::public_only());
    let port = http.url("").rsplit(':').next().unwrap().to_owned();
    for url in [
        http.url("/img"),
        format!("http://localhost:{port}/img"),
        format!("http://[::ffff:127.0.0.1]:{port}/img"),
        "http://169.254.169.254/latest/meta-data".to_string(),
    ] {
        let err = fetch(&strict, &reference(&url, &body)).await.unwrap_err();
        assert_eq!(err.kind(), denied, "{url}: {err}");
    }
    assert_eq!(http.requests(), 0, "a refused URL reached the server");

    // 127.0.0.1 plays a public server; it redirects to refused targets.
    let public = with(Egress::public_only_except("127.0.0.1".parse().unwrap()));
    fetch(&public, &reference(&http.url("/img"), &body))
        .await
        .unwrap();
    http.route(
        "/to-loopback",
        Reply::Redirect(format!("http://127.0.0.2:{port}/img")),
    );
    http.route(
        "/to-metadata",
        Reply::Redirect("http://169.254.169.254/latest".into()),
    );
    http.route("/to-file", Reply::Redirect("file:///etc/shadow".into()));
    for hop in 0..8 {
        http.route(
            &format!("/loop{hop}"),
            Reply::Redirect(http.url(&format!("/loop{}", hop + 1))),
        );
    }
    for path in ["/to-loopback", "/to-metadata", "/to-file", "/loop0"] {
        let url = http.url(path);
        let other = content(4096, 62);
        let err = fetch(&public, &reference(&url, &other)).await.unwrap_err();
        assert_eq!(err.kind(), denied, "{path}: {err}");
        assert!(!err.message().contains("SECRET-BODY"), "{err}");
    }
    // The redirect chain stopped at the hop limit.
    let limit = 1 + 3 + crate::images::egress::MAX_REDIRECTS + 2;
    assert!(http.requests() <= limit, "{} requests", http.requests());
}
