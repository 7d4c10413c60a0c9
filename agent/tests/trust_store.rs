//! agentd on a host without a CA trust store (no ca-certificates, or
//! SSL_CERT_FILE/SSL_CERT_DIR pointing at nothing): it must still start and
//! pull http:// images, and refuse https:// ones with an error that names the
//! cause and leaves nothing cached.
//! Run by scripts/test (needs root: agentd runs in a network namespace beside
//! its own tgtd and pdiskd).

use sha2::Digest;
use stratus_proto::agent::v1 as pb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::*;
use tonic::Code;

#[test]
#[ignore = "needs root, tgt and a network namespace: run by scripts/test"]
fn without_a_trust_store_agentd_starts_and_only_https_pulls_fail() {
    let ns = NetNs::new();
    ns.add_bridge("sttrust0");
    let pool = XfsPool::new(1024);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let dir = tempfile::tempdir().unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let image: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(www.join("disk.raw"), &image).unwrap();
    let sha256 = hex(&sha2::Sha256::digest(&image));
    let httpd = Httpd::start_in(&ns, &www);

    let no_certs = dir.path().join("no-certs");
    std::fs::create_dir(&no_certs).unwrap();
    let missing = dir.path().join("no-bundle.pem");
    let agentd = Agentd::start_in_with_env(
        dir.path(),
        &ns,
        &pdiskd.url(),
        "sttrust0",
        &[],
        &[
            ("SSL_CERT_FILE", missing.to_str().unwrap()),
            ("SSL_CERT_DIR", no_certs.to_str().unwrap()),
        ],
    );
    let url = agentd.url();
    let http_url = httpd.url("disk.raw");
    let want = sha256.clone();
    let size = image.len() as u64;
    ns.block_on(move || async move {
        let mut c = VmServiceClient::new(testkit::channel(&url).await);
        let pull = |url: String| pb::PullImageRequest {
            server: String::new(),
            request_id: String::new(),
            image: Some(pb::ImageRef {
                url,
                sha256: want.clone(),
                format: pb::ImageFormat::Raw as i32,
                endorser: String::new(),
                endorsement: String::new(),
            }),
            to_pdisk: false,
        };

        // https:// cannot be verified: a clear FailedPrecondition, nothing cached.
        let err = c
            .pull_image(pull("https://127.0.0.1:8443/disk.raw".into()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("no HTTPS client") && err.message().contains("ca-certificates"),
            "{}",
            err.message()
        );
        let listed = c
            .list_images(pb::ListImagesRequest {})
            .await
            .unwrap()
            .into_inner()
            .images;
        assert!(listed.is_empty(), "{listed:?}");

        // http:// needs no trust store: pulled and verified.
        let got = c.pull_image(pull(http_url)).await.unwrap().into_inner();
        assert_eq!(got.sha256, want);
        assert_eq!(got.size_bytes, size);
        assert_eq!(got.users, 0, "no guest uses it yet: {got:?}");
    });
    assert_eq!(httpd.requests("disk.raw"), 1);

    let log = std::fs::read_to_string(&agentd.log).unwrap();
    assert!(log.contains("no trust store"), "{log}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
