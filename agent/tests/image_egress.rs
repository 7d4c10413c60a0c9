//! Where image downloads may go (issue 11): a real agentd without
//! `--image-allow-private` refuses image URLs that reach loopback, link-local
//! (the cloud metadata address 169.254.169.254) or its host's own addresses,
//! with PermissionDenied, before any request leaves it and with nothing
//! cached; the same pull succeeds once the flag is given.
//! Run by scripts/test (needs root: agentd runs in a network namespace beside
//! its own tgtd and pdiskd).

use sha2::Digest;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::*;
use tonic::Code;

fn pull(url: &str, sha256: &str) -> pb::PullImageRequest {
    pb::PullImageRequest {
        server: String::new(),
        request_id: String::new(),
        image: Some(pb::ImageRef {
            url: url.to_string(),
            sha256: sha256.to_string(),
            format: pb::ImageFormat::Raw as i32,
            endorser: String::new(),
            endorsement: String::new(),
        }),
        to_pdisk: false,
    }
}

#[test]
#[ignore = "needs root, tgt and a network namespace: run by scripts/test"]
fn image_urls_to_private_addresses_are_refused_unless_allowed() {
    let ns = NetNs::new();
    ns.add_bridge("stegress0");
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let image: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
    std::fs::write(www.join("disk.raw"), &image).unwrap();
    let sha256: String = sha2::Sha256::digest(&image)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let httpd = Httpd::start_in(&ns, &www);

    // testkit gives agentd --image-allow-private; this test wants the default.
    let mut agentd = Agentd::start_in(dir.path(), &ns, &pdiskd.url(), "stegress0");
    agentd.restart_with_flag("--image-allow-private", false);
    let local = httpd.url("disk.raw");
    assert!(local.contains("127.0.0.1"), "{local}");
    let refused = [
        (local.clone(), "loopback"),
        ("http://[::1]:8080/disk.raw".to_string(), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data/disk.raw".to_string(),
            "link-local",
        ),
        ("http://0.0.0.0:8080/disk.raw".to_string(), ""),
        ("http://localhost:8080/disk.raw".to_string(), "loopback"),
    ];
    let url = agentd.url();
    let want = sha256.clone();
    ns.block_on(move || async move {
        let mut c = VmServiceClient::new(testkit::channel(&url).await);
        for (u, why) in &refused {
            let err = c.pull_image(pull(u, &want)).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{u}: {err:?}");
            assert!(
                err.message().contains("--image-allow-private") && err.message().contains(why),
                "{u}: {}",
                err.message()
            );
        }
        let listed = c
            .list_images(pb::ListImagesRequest {})
            .await
            .unwrap()
            .into_inner()
            .images;
        assert!(listed.is_empty(), "nothing is cached: {listed:?}");
    });
    assert_eq!(
        httpd.requests("disk.raw"),
        0,
        "a refused URL is never fetched"
    );

    // With the flag, the same loopback URL is pulled and verified.
    agentd.restart_with_flag("--image-allow-private", true);
    let url = agentd.url();
    let want = sha256.clone();
    let size = image.len() as u64;
    ns.block_on(move || async move {
        let mut c = VmServiceClient::new(testkit::channel(&url).await);
        let got = c
            .pull_image(pull(&local, &want))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.sha256, want);
        assert_eq!(got.size_bytes, size);
    });
    assert_eq!(httpd.requests("disk.raw"), 1);
}
