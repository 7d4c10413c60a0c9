//! Storage accounting on a real file pool in a temp dir: samples follow
//! what projects hold (provisioned and allocated bytes) over time, the
//! StAR document reads back as the StAR spec and APEL's parser have it, the
//! log is an outbox that compacts, and a project sees only its records.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use stratus_pki::{Caller, Identity, Role, Transport};
use stratus_proto::pdisk::v1 as pb;
use stratus_proto::pdisk::v1::volume_service_server::VolumeService;
use tonic::Code;

use super::*;
use crate::backend::file::FileBackend;
use crate::export::MemoryExporter;
use crate::runner::FakeRunner;
use crate::service::{NewVolume, NewVolumeSource, Owner, ServiceSettings};

const MIB: u64 = 1 << 20;

fn service() -> (tempfile::TempDir, Arc<PoolService>) {
    let dir = tempfile::tempdir().unwrap();
    let runner = Arc::new(FakeRunner::new());
    let backend = Arc::new(FileBackend::open(&dir.path().join("pool"), runner.clone()).unwrap());
    let store = Store::open(&dir.path().join("data")).unwrap();
    let svc = Arc::new(PoolService::new(
        store,
        backend,
        Arc::new(MemoryExporter::default()),
        runner,
        ServiceSettings::default(),
    ));
    (dir, svc)
}

async fn create(svc: &PoolService, project: &str, name: &str, size: u64) -> std::path::PathBuf {
    svc.create_volume(NewVolume {
        allow_multi_attach: false,
        name: name.parse().unwrap(),
        size,
        labels: Default::default(),
        source: NewVolumeSource::Empty,
        request_id: String::new(),
        owner: Owner {
            project: project.into(),
            creator: None,
        },
    })
    .await
    .unwrap()
    .device_path
}

/// The samples just logged, by project.
fn by_project(samples: Vec<StorageSample>) -> BTreeMap<String, StorageSample> {
    samples
        .into_iter()
        .map(|s| (s.project.clone(), s))
        .collect()
}

#[tokio::test]
async fn samples_follow_what_each_project_holds_over_time() {
    let (_dir, svc) = service();
    let a = create(&svc, "astro", "astro-a", 8 * MIB).await;
    create(&svc, "astro", "astro-b", 4 * MIB).await;
    create(&svc, "bio", "bio-a", 16 * MIB).await;
    svc.create_snapshot("astro-a", "astro-a-s".parse().unwrap(), "")
        .await
        .unwrap();

    let first = by_project(svc.sample_usage(None).await.unwrap());
    assert_eq!(first.len(), 2, "{first:?}");
    let astro = &first["astro"];
    assert_eq!(
        (
            astro.holding.volumes,
            astro.holding.snapshots,
            astro.holding.provisioned_bytes
        ),
        (2, 1, 20 * MIB)
    );
    assert_eq!(
        astro.since_us, astro.time_us,
        "a first sample covers no time"
    );
    let bio = &first["bio"];
    assert_eq!(
        (bio.holding.volumes, bio.holding.provisioned_bytes),
        (1, 16 * MIB)
    );
    assert!(astro.holding.allocated_bytes < MIB, "{astro:?}");

    // 3 MiB written into astro-a: allocated grows by that, provisioned not.
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(&vec![0x5a; 3 * MIB as usize], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let second = by_project(svc.sample_usage(None).await.unwrap());
    let astro2 = &second["astro"];
    assert_eq!(astro2.since_us, astro.time_us);
    assert_eq!(astro2.holding.provisioned_bytes, 20 * MIB);
    let grown = astro2.holding.allocated_bytes - astro.holding.allocated_bytes;
    assert!((3 * MIB..=3 * MIB + 64 * 1024).contains(&grown), "{grown}");

    // Only bio sampled: bio grown to 32 MiB, astro not logged.
    svc.resize_volume("bio-a", 32 * MIB).await.unwrap();
    let only = BTreeSet::from(["bio".to_string()]);
    let third = svc.sample_usage(Some(&only)).await.unwrap();
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].holding.provisioned_bytes, 32 * MIB);
    assert_eq!(third[0].since_us, second["bio"].time_us);

    // bio's last volume gone: one sample of nothing, then bio is not
    // sampled any more.
    svc.delete_volume("bio-a").await.unwrap();
    let fourth = by_project(svc.sample_usage(None).await.unwrap());
    assert_eq!(fourth["bio"].holding, Holding::default());
    let fifth = by_project(svc.sample_usage(None).await.unwrap());
    assert_eq!(fifth.keys().collect::<Vec<_>>(), vec!["astro"], "{fifth:?}");

    // The history: every sample in seq order, as records.
    let all = svc
        .storage_usage(0, Some(u64::MAX / US), |_| true)
        .await
        .unwrap();
    let bio_prov: Vec<u64> = all
        .iter()
        .filter(|r| r.group == "bio")
        .map(|r| r.provisioned_bytes)
        .collect();
    assert_eq!(bio_prov, vec![16 * MIB, 16 * MIB, 32 * MIB, 0]);
    assert_eq!(all.len(), 2 + 2 + 1 + 2 + 1);
    let ids: BTreeSet<&str> = all.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "record ids are unique");
    for w in all.windows(2) {
        assert!(w[0].end_time <= w[1].end_time);
    }
    // A window of time: only the samples taken in it.
    let last_astro = fifth["astro"].time_us / US;
    let late = svc
        .storage_usage(last_astro, Some(last_astro), |p| p == "astro")
        .await
        .unwrap();
    assert!(!late.is_empty() && late.iter().all(|r| r.end_time == last_astro));
}

#[test]
fn a_sample_older_than_the_last_is_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let book = UsageBook::new(Arc::new(Store::open(dir.path()).unwrap()));
    let held = BTreeMap::from([(
        "astro".to_string(),
        Holding {
            volumes: 1,
            provisioned_bytes: 5,
            ..Default::default()
        },
    )]);
    assert_eq!(book.record(2_000_000, &held, None).unwrap().len(), 1);
    assert!(book.record(1_000_000, &held, None).unwrap().is_empty());
    assert!(book.record(2_000_000, &held, None).unwrap().is_empty());
    assert_eq!(book.last_seq().unwrap(), 1);
    // A reopened store keeps the sample and its seq.
    drop(book);
    let book = UsageBook::new(Arc::new(Store::open(dir.path()).unwrap()));
    assert_eq!(book.last_seq().unwrap(), 1);
    let s = book.record(3_000_000, &held, None).unwrap();
    assert_eq!((s[0].since_us, s[0].time_us), (2_000_000, 3_000_000));
}

/// An XML element as the StAR spec describes records: a namespaced name,
/// attributes, text, children.
#[derive(Debug, Default)]
struct El {
    name: String,
    attrs: BTreeMap<String, String>,
    text: String,
    children: Vec<El>,
}

impl El {
    fn child(&self, name: &str) -> Option<&El> {
        self.children.iter().find(|c| c.name == name)
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// A small XML reader, enough for StAR documents: a declaration, elements
/// with quoted attributes, self-closing elements, text; refuses a
/// mismatched end tag or a raw `<` or `&` in text.
fn parse_xml(doc: &str) -> El {
    let mut rest = doc.trim();
    if let Some(r) = rest.strip_prefix("<?xml") {
        rest = r[r.find("?>").unwrap() + 2..].trim_start();
    }
    let mut stack = vec![El::default()];
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("</") {
            let end = r.find('>').unwrap();
            let el = stack.pop().unwrap();
            assert_eq!(el.name, r[..end].trim(), "mismatched end tag");
            stack.last_mut().unwrap().children.push(el);
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('<') {
            let end = r.find('>').unwrap();
            let (tag, closed) = match r[..end].strip_suffix('/') {
                Some(t) => (t, true),
                None => (&r[..end], false),
            };
            let mut parts = tag.splitn(2, char::is_whitespace);
            let mut el = El {
                name: parts.next().unwrap().to_owned(),
                ..Default::default()
            };
            let mut attrs = parts.next().unwrap_or("").trim();
            while !attrs.is_empty() {
                let eq = attrs.find("=\"").unwrap();
                let close = attrs[eq + 2..].find('"').unwrap() + eq + 2;
                el.attrs.insert(
                    attrs[..eq].trim().to_owned(),
                    unescape(&attrs[eq + 2..close]),
                );
                attrs = attrs[close + 1..].trim_start();
            }
            rest = &r[end + 1..];
            if closed {
                stack.last_mut().unwrap().children.push(el);
            } else {
                stack.push(el);
            }
        } else {
            let end = rest.find('<').unwrap_or(rest.len());
            let raw = &rest[..end];
            assert!(
                !raw.contains('&') || raw.contains(';'),
                "raw & in text: {raw}"
            );
            stack
                .last_mut()
                .unwrap()
                .text
                .push_str(&unescape(raw.trim()));
            rest = &rest[end..];
        }
    }
    assert_eq!(stack.len(), 1, "unclosed elements");
    let mut doc = stack.pop().unwrap();
    assert_eq!(doc.children.len(), 1, "one root element");
    doc.children.pop().unwrap()
}

fn record(group: &str, site: &str) -> StorageUsageRecord {
    StorageUsageRecord {
        record_id: "store1/pdisk/usage/7".into(),
        create_time: 1_764_806_400, // 2025-12-04T00:00:00Z
        storage_system: "store1.example.org".into(),
        site: site.into(),
        storage_share: "/srv/pdisk/pool".into(),
        storage_media: "disk".into(),
        group: group.into(),
        start_time: 1_764_802_800,
        end_time: 1_764_806_400,
        volumes: 3,
        snapshots: 2,
        allocated_bytes: 693_064_064,
        provisioned_bytes: 3 << 30,
    }
}

#[test]
fn the_star_document_reads_back_as_the_star_spec_has_it() {
    let records = vec![record("astro", "ACME & <Co>"), record("", "ACME")];
    let doc = star_xml(&records);
    let root = parse_xml(&doc);
    assert_eq!(root.name, "sr:StorageUsageRecords");
    assert_eq!(root.attrs["xmlns:sr"], STAR_NAMESPACE);
    assert_eq!(root.children.len(), 2);
    for (el, want) in root.children.iter().zip(&records) {
        assert_eq!(el.name, "sr:StorageUsageRecord");
        let id = el.child("sr:RecordIdentity").expect("RecordIdentity");
        // APEL's mandatory fields: RecordId, CreateTime, StorageSystem,
        // StartTime, EndTime, ResourceCapacityUsed.
        assert_eq!(id.attrs["sr:recordId"], want.record_id);
        assert_eq!(id.attrs["sr:createTime"], "2025-12-04T00:00:00Z");
        let text = |n: &str| el.child(n).map(|c| c.text.clone());
        assert_eq!(
            text("sr:StorageSystem").as_deref(),
            Some("store1.example.org")
        );
        assert_eq!(text("sr:Site").unwrap(), want.site);
        assert_eq!(text("sr:StorageShare").as_deref(), Some("/srv/pdisk/pool"));
        assert_eq!(text("sr:StorageMedia").as_deref(), Some("disk"));
        assert_eq!(text("sr:FileCount").as_deref(), Some("5"));
        assert_eq!(
            text("sr:StartTime").as_deref(),
            Some("2025-12-03T23:00:00Z")
        );
        assert_eq!(text("sr:EndTime").as_deref(), Some("2025-12-04T00:00:00Z"));
        assert_eq!(
            text("sr:ResourceCapacityUsed").as_deref(),
            Some("693064064")
        );
        assert_eq!(
            text("sr:ResourceCapacityAllocated").as_deref(),
            Some("3221225472")
        );
        let group = el
            .child("sr:SubjectIdentity")
            .and_then(|s| s.child("sr:Group"))
            .map(|g| g.text.clone());
        // No project: no subject at all, rather than an empty group.
        assert_eq!(group, (!want.group.is_empty()).then(|| want.group.clone()));
        for c in &el.children {
            assert!(
                c.name.starts_with("sr:"),
                "{} outside the namespace",
                c.name
            );
        }
    }
}

#[test]
fn csv_has_a_header_and_one_quoted_line_per_record() {
    let out = csv(&[record("astro", "ACME, \"Inc\"")]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], CSV_COLUMNS.join(","));
    assert_eq!(
        lines[1],
        "store1/pdisk/usage/7,1764806400,store1.example.org,\"ACME, \"\"Inc\"\"\",\
         /srv/pdisk/pool,disk,astro,1764802800,1764806400,3,2,693064064,3221225472"
    );
    assert_eq!(lines.len(), 2);
}

#[tokio::test]
async fn the_log_is_an_outbox_that_compacts() {
    let (_dir, svc) = service();
    svc.usage().set_site(StorageSite {
        site: "SITE".into(),
        storage_system: "store1".into(),
        storage_share: "pool".into(),
        host: "h1".into(),
    });
    create(&svc, "astro", "astro-a", 4 * MIB).await;
    svc.sample_usage(None).await.unwrap();
    svc.delete_volume("astro-a").await.unwrap();
    svc.sample_usage(None).await.unwrap();
    let outbox = UsageOutbox::new(svc.clone());
    let msgs = outbox.messages_after(0, 10).unwrap();
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
    let m = &msgs[1].message;
    assert_eq!(m.subject, "stratus.usage.h1");
    assert_eq!(m.msg_id, "pdisk-usage.h1:2");
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(v["source"], "pdisk");
    assert_eq!(v["record_type"], "storage");
    assert_eq!(v["group"], "astro");
    assert_eq!(v["volumes"], 0);
    assert_eq!(v["record_id"], "h1/pdisk/usage/2");
    assert_eq!(v["seq"], 2);
    assert_eq!(outbox.messages_after(1, 10).unwrap().len(), 1);
    outbox.set_published_seq(2).unwrap();
    assert_eq!(outbox.published_seq().unwrap(), 2);

    // Nothing is old yet; then everything is.
    assert_eq!(
        svc.usage()
            .compact(Duration::from_secs(3600), SystemTime::now())
            .unwrap(),
        0
    );
    let later = SystemTime::now() + Duration::from_secs(7200);
    assert_eq!(
        svc.usage()
            .compact(Duration::from_secs(3600), later)
            .unwrap(),
        2
    );
    assert_eq!(outbox.oldest_seq().unwrap(), 3);
    assert_eq!(
        outbox.messages_after(0, 10).unwrap_err().kind(),
        crate::error::ErrorKind::OutOfRange
    );
    assert!(outbox.messages_after(2, 10).unwrap().is_empty());
    // The seq goes on from where it was, and astro (holding nothing, its
    // latest sample compacted) is not sampled again.
    create(&svc, "bio", "bio-a", 4 * MIB).await;
    let s = svc.sample_usage(None).await.unwrap();
    assert_eq!(s.len(), 1);
    assert_eq!(svc.usage().last_seq().unwrap(), 3);
}

#[tokio::test]
async fn the_sampler_follows_changes_between_ticks() {
    let (_dir, svc) = service();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    spawn_sampler(svc.clone(), Duration::from_secs(3600), stopped);
    create(&svc, "astro", "astro-a", 4 * MIB).await;
    svc.create_snapshot("astro-a", "astro-s".parse().unwrap(), "")
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..100 {
        got = svc
            .usage()
            .samples_within(0, u64::MAX, |_| true)
            .unwrap()
            .into_iter()
            .map(|(_, s)| (s.holding.volumes, s.holding.snapshots))
            .collect();
        if got.last() == Some(&(1, 1)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // No tick since the first (an hour away): the events made the samples.
    assert_eq!(got.last(), Some(&(1, 1)), "{got:?}");
}

fn request<T>(role: Role, name: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(Caller {
        transport: Transport::Mtls,
        identity: Ok(Identity::new(role, name)),
    });
    r
}

#[tokio::test]
async fn a_project_sees_only_its_own_records_and_may_not_ask_for_anothers() {
    let (_dir, svc) = service();
    create(&svc, "astro", "astro-a", 4 * MIB).await;
    create(&svc, "bio", "bio-a", 8 * MIB).await;
    let api = crate::Api::new(svc.clone());
    let list = |role, name: &str, project: &str| {
        request(
            role,
            name,
            pb::ListStorageUsageRequest {
                project: project.into(),
                ..Default::default()
            },
        )
    };
    let groups = |r: pb::ListStorageUsageResponse| {
        r.records
            .into_iter()
            .map(|r| (r.group, r.provisioned_bytes))
            .collect::<BTreeSet<_>>()
    };
    let own = api
        .list_storage_usage(list(Role::Project, "astro", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(groups(own), BTreeSet::from([("astro".into(), 4 * MIB)]));
    let all = api
        .list_storage_usage(list(Role::Admin, "ops", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        groups(all),
        BTreeSet::from([("astro".into(), 4 * MIB), ("bio".into(), 8 * MIB)])
    );

    // Refused: another project's records, before anything is sampled.
    let before = svc.usage().last_seq().unwrap();
    let refused = api
        .list_storage_usage(list(Role::Project, "astro", "bio"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let refused = api
        .list_storage_usage(list(Role::Frontend, "fe", ""))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let bad = api
        .list_storage_usage(request(
            Role::Admin,
            "ops",
            pb::ListStorageUsageRequest {
                since: 20,
                until: 10,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(svc.usage().last_seq().unwrap(), before, "nothing sampled");
    // The gate refuses agents and servers before any handler.
    for role in [Role::Agent, Role::Server] {
        let caller = Caller {
            transport: Transport::Mtls,
            identity: Ok(Identity::new(role, "compute-1")),
        };
        let path = format!("/{}/ListStorageUsage", crate::authz::SERVICE);
        assert_eq!(
            crate::authz::check(&path, Some(&caller))
                .unwrap_err()
                .code(),
            Code::PermissionDenied
        );
    }
}
