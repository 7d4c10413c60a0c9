//! agentd's image cache quota against a real HTTP server (busybox httpd in
//! a test namespace): two images pulled at once, and images served without
//! Content-Length (CGI output, which ends when the connection closes). The
//! quota must hold at every step, the refused pull must say why, nothing of
//! it may stay on disk, and the cache must work normally afterwards.
//! Run by scripts/test (needs root: agentd runs in a network namespace beside
//! its own tgtd and pdiskd).

use std::path::Path;
use std::time::Duration;

use sha2::Digest;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::*;
use tonic::Code;

const MIB: u64 = 1 << 20;
const QUOTA: u64 = 5 * MIB;

#[test]
#[ignore = "needs root, tgt, busybox and a network namespace: run by scripts/test"]
fn concurrent_and_unsized_pulls_stay_within_the_cache_quota() {
    let ns = NetNs::new();
    ns.add_bridge("stquota0");
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    let cgi = www.join("cgi-bin");
    std::fs::create_dir_all(&cgi).unwrap();
    let gate = dir.path().join("gate");

    // A: 3 MiB with Content-Length, held after its first MiB until `gate`
    // exists. B: 3 MiB, with Content-Length. U: 3 MiB without.
    let a = Served::cgi(&www, "a", 3 * MIB, 1, Some(&gate));
    let b = Served::cgi(&www, "b", 3 * MIB, 2, None);
    let u = Served::cgi_unsized(&www, "u", 3 * MIB, 3);
    let httpd = Httpd::start_in(&ns, &www);

    let agentd = Agentd::start_in_with(
        dir.path(),
        &ns,
        &pdiskd.url(),
        "stquota0",
        &["--image-quota", "5M"],
    );
    let cache_dir = dir.path().join("agent/images");
    let url = agentd.url();
    let (a_url, b_url, u_url) = (
        httpd.url("cgi-bin/a"),
        httpd.url("cgi-bin/b"),
        httpd.url("cgi-bin/u"),
    );
    let (a, b, u) = (a.clone(), b.clone(), u.clone());
    ns.block_on(move || async move {
        let c = VmServiceClient::new(testkit::channel(&url).await);

        // A starts and holds its 3 MiB (reserved before its body).
        let a_pull = tokio::spawn(pull(c.clone(), a_url.clone(), a.sha256.clone()));
        wait_async("A's download to start", || partials(&cache_dir) == 1).await;

        // B, at the same time: refused before its body is read.
        let err = pull(c.clone(), b_url.clone(), b.sha256.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains(&format!(
                "image {b_url} needs {} bytes but the image cache quota ({QUOTA} bytes) is held \
                 by images in use or being downloaded ({} bytes)",
                3 * MIB,
                3 * MIB
            )),
            "{}",
            err.message()
        );

        // U announces nothing: it streams into the 2 MiB left and is cut
        // there, its partial file removed; A's is still there.
        let err = pull(c.clone(), u_url.clone(), u.sha256.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        let m = err.message();
        assert!(
            m.contains(&format!("image {u_url}: download cut after "))
                && m.contains(&format!("the image cache quota ({QUOTA} bytes) is held"))
                && m.contains("nothing was kept"),
            "{m}"
        );
        assert_eq!(partials(&cache_dir), 1);
        assert!(bytes_on_disk(&cache_dir) <= QUOTA);

        // A completes.
        std::fs::write(&gate, b"").unwrap();
        let got = a_pull.await.unwrap().unwrap();
        assert_eq!(got.size_bytes, 3 * MIB);

        // The cache still works: U again evicts A (unused) to fit, growing
        // its reservation as it streams.
        let got = pull(c.clone(), u_url, u.sha256.clone()).await.unwrap();
        assert_eq!(
            (got.sha256.as_str(), got.size_bytes),
            (u.sha256.as_str(), 3 * MIB)
        );
        let mut listed = VmServiceClient::clone(&c)
            .list_images(pb::ListImagesRequest {})
            .await
            .unwrap()
            .into_inner()
            .images;
        listed.retain(|i| i.location == "local");
        let listed: Vec<&str> = listed.iter().map(|i| i.sha256.as_str()).collect();
        assert_eq!(listed, [u.sha256.as_str()]);
        assert_eq!(partials(&cache_dir), 0);
        assert!(bytes_on_disk(&cache_dir) <= QUOTA);
        // And B, announced, now finds room by evicting U.
        let got = pull(c.clone(), b_url, b.sha256.clone()).await.unwrap();
        assert_eq!(got.size_bytes, 3 * MIB);
        assert_eq!(partials(&cache_dir), 0);
        assert!(bytes_on_disk(&cache_dir) <= QUOTA);
    });
    assert_eq!(httpd.requests("cgi-bin/a"), 1);
    assert_eq!(httpd.requests("cgi-bin/u"), 2);
}

/// An image served by a CGI script (so it can be held back, or sent without
/// Content-Length).
#[derive(Clone)]
struct Served {
    sha256: String,
}

impl Served {
    /// `/cgi-bin/NAME` sends `len` bytes with their Content-Length; with a
    /// gate, only the first MiB until the gate file exists.
    fn cgi(www: &Path, name: &str, len: u64, seed: u8, gate: Option<&Path>) -> Served {
        let data = write_image(www, name, len, seed);
        let image = www.join(format!("{name}.img"));
        let hold = gate.map_or(String::new(), |g| {
            format!(
                "head -c {MIB} {img}\nwhile [ ! -e {g} ]; do sleep 0.1; done\n\
                 tail -c +{} {img}\nexit 0\n",
                MIB + 1,
                img = image.display(),
                g = g.display()
            )
        });
        script(
            www,
            name,
            &format!(
                "printf 'Content-Type: application/octet-stream\\r\\nContent-Length: {len}\\r\\n\\r\\n'\n\
                 {hold}exec cat {}\n",
                image.display()
            ),
        );
        data
    }

    /// `/cgi-bin/NAME` sends `len` bytes and no Content-Length.
    fn cgi_unsized(www: &Path, name: &str, len: u64, seed: u8) -> Served {
        let data = write_image(www, name, len, seed);
        script(
            www,
            name,
            &format!(
                "printf 'Content-Type: application/octet-stream\\r\\n\\r\\n'\nexec cat {}\n",
                www.join(format!("{name}.img")).display()
            ),
        );
        data
    }
}

fn write_image(www: &Path, name: &str, len: u64, seed: u8) -> Served {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    std::fs::write(www.join(format!("{name}.img")), &bytes).unwrap();
    Served {
        sha256: sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

fn script(www: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = www.join("cgi-bin").join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

async fn pull(
    mut c: VmServiceClient<tonic::transport::Channel>,
    url: String,
    sha256: String,
) -> Result<pb::CachedImage, tonic::Status> {
    c.pull_image(pb::PullImageRequest {
        server: String::new(),
        request_id: String::new(),
        image: Some(pb::ImageRef {
            url,
            sha256,
            format: pb::ImageFormat::Raw as i32,
            endorser: String::new(),
            endorsement: String::new(),
        }),
        to_pdisk: false,
    })
    .await
    .map(|r| r.into_inner())
}

/// Downloads in progress in the cache directory.
fn partials(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// Bytes of every file in the cache directory, temporaries included.
fn bytes_on_disk(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

async fn wait_async(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}
