use super::*;
use crate::error::ErrorKind;

fn vol(name: &str) -> VolumeRecord {
    VolumeRecord {
        allow_multi_attach: false,
        uuid: Uuid::new_v4(),
        name: name.parse().unwrap(),
        size: ByteSize(1 << 20),
        labels: Labels::new(),
        state: VolumeState::Ready,
        state_reason: String::new(),
        source: Source::Empty,
        created_at: "2026-11-21T00:00:00Z".into(),
        project: String::new(),
        created_by: None,
        quarantine: None,
        flatten_pending: false,
    }
}

#[test]
fn records_older_than_projects_load_as_project_none_made_by_nobody_known() {
    let mut old = serde_json::to_value(vol("legacy")).unwrap();
    let obj = old.as_object_mut().unwrap();
    obj.remove("project");
    obj.remove("created_by");
    let back: VolumeRecord = decode("volume", old.to_string().as_bytes()).unwrap();
    assert_eq!(back.project, "");
    assert_eq!(back.created_by, None);
    let mut owned = vol("owned");
    owned.project = "astro".into();
    owned.created_by = Some(Creator {
        role: stratus_pki::Role::Project,
        name: "astro".into(),
    });
    let back: VolumeRecord = decode("volume", &encode(&owned)).unwrap();
    assert_eq!(back, owned);
}

#[test]
fn names_are_unique_and_refs_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let a = vol("a");
    s.insert_volume(&a).unwrap();
    let err = s.insert_volume(&vol("a")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(s.find_volume("a").unwrap().uuid, a.uuid);
    assert_eq!(s.find_volume(&a.uuid.to_string()).unwrap().name, a.name);
    assert_eq!(s.find_volume("b").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.volumes().unwrap().len(), 1);
}

fn vol_in(project: &str, name: &str) -> VolumeRecord {
    VolumeRecord {
        project: project.into(),
        ..vol(name)
    }
}

fn snap_of(v: &VolumeRecord, name: &str) -> SnapshotRecord {
    SnapshotRecord {
        uuid: Uuid::new_v4(),
        name: name.parse().unwrap(),
        volume: v.uuid,
        size: v.size,
        complete: true,
        created_at: String::new(),
    }
}

#[test]
fn names_are_unique_per_project_and_resolve_in_the_callers_project() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let astro = vol_in("astro", "db");
    let bio = vol_in("bio", "db");
    s.insert_volume(&astro).unwrap();
    // Another project's name is no obstacle (and so reveals nothing).
    s.insert_volume(&bio).unwrap();
    let err = s.insert_volume(&vol_in("bio", "db")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(s
        .volume_name_taken("astro", &"db".parse().unwrap())
        .unwrap());
    assert!(!s.volume_name_taken("chem", &"db".parse().unwrap()).unwrap());
    let in_astro = s.find_volume_in(NameScope::Project("astro"), "db").unwrap();
    assert_eq!(in_astro.uuid, astro.uuid);
    let in_bio = s.find_volume_in(NameScope::Project("bio"), "db").unwrap();
    assert_eq!(in_bio.uuid, bio.uuid);
    let err = s
        .find_volume_in(NameScope::Project("chem"), "db")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // Across projects (an admin naming none) a name two projects use is
    // ambiguous, and the message says which projects.
    let err = s.find_volume("db").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.message().contains("astro, bio"), "{err}");
    // A UUID always resolves; a name only one project uses too.
    assert_eq!(s.find_volume(&bio.uuid.to_string()).unwrap().uuid, bio.uuid);
    s.insert_volume(&vol_in("astro", "web")).unwrap();
    assert_eq!(s.find_volume("web").unwrap().project, "astro");
    // The object of no project wins across projects: a tenant cannot
    // shadow an image base's name.
    let base = vol_in("", "db");
    s.insert_volume(&base).unwrap();
    assert_eq!(s.find_volume("db").unwrap().uuid, base.uuid);

    // Snapshots: per project (their volume's) the same way.
    s.insert_snapshot(&snap_of(&astro, "nightly")).unwrap();
    s.insert_snapshot(&snap_of(&bio, "nightly")).unwrap();
    let err = s.insert_snapshot(&snap_of(&bio, "nightly")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let got = s
        .find_snapshot_in(NameScope::Project("bio"), "nightly")
        .unwrap();
    assert_eq!(got.volume, bio.uuid);
    let got = s
        .find_snapshot_in(NameScope::Project("astro"), "nightly")
        .unwrap();
    s.remove_snapshot(got.uuid, &[]).unwrap();
    assert!(s
        .find_snapshot_in(NameScope::Project("astro"), "nightly")
        .is_err());
    assert!(s
        .find_snapshot_in(NameScope::Project("bio"), "nightly")
        .is_ok());
    // Removing frees the name in its project only.
    s.remove_volume(astro.uuid, &[]).unwrap();
    assert!(!s
        .volume_name_taken("astro", &"db".parse().unwrap())
        .unwrap());
    assert!(s.volume_name_taken("bio", &"db".parse().unwrap()).unwrap());
}

#[test]
fn a_store_with_the_old_global_name_index_is_reindexed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = vol_in("astro", "db");
    {
        let s = Store::open(dir.path()).unwrap();
        s.insert_volume(&a).unwrap();
        s.insert_snapshot(&snap_of(&a, "nightly")).unwrap();
        // Make the index what stores before per-project names held.
        let tx = s.db.begin_write().unwrap();
        tx.delete_table(NAMES).unwrap();
        {
            let mut t = tx.open_table(NAMES).unwrap();
            t.insert("v:db", a.uuid.to_string().as_str()).unwrap();
        }
        tx.commit().unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let got = s.find_volume_in(NameScope::Project("astro"), "db").unwrap();
    assert_eq!(got.uuid, a.uuid);
    assert!(s
        .find_snapshot_in(NameScope::Project("astro"), "nightly")
        .is_ok());
    let err = s.insert_volume(&vol_in("astro", "db")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    s.insert_volume(&vol_in("bio", "db")).unwrap();
}

#[test]
fn dependents_block_removal_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = vol("a");
    let snap = SnapshotRecord {
        uuid: Uuid::new_v4(),
        name: "a-1".parse().unwrap(),
        volume: a.uuid,
        size: a.size,
        complete: true,
        created_at: String::new(),
    };
    {
        let s = Store::open(dir.path()).unwrap();
        s.insert_volume(&a).unwrap();
        s.insert_snapshot(&snap).unwrap();
    }
    let s = Store::open(dir.path()).unwrap();
    let err = s.remove_volume(a.uuid, &[]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.message().contains("a-1"));
    s.remove_snapshot(snap.uuid, &[]).unwrap();
    s.put_export(
        &ExportRecord {
            volume: a.uuid,
            target_iqn: "iqn.2026-11.io.stratus:t".parse().unwrap(),
            initiators: vec![],
            chap: None,
            chap_set_by: None,
            unexporting: false,
            local: false,
            migration: None,
        },
        &[],
    )
    .unwrap();
    assert_eq!(
        s.remove_volume(a.uuid, &[]).unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    s.remove_export(a.uuid, &[]).unwrap();
    s.remove_volume(a.uuid, &[]).unwrap();
    // The name is free again.
    s.insert_volume(&vol("a")).unwrap();
}
