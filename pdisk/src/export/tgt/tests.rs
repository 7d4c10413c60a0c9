use super::accounts::{AccountAdd, AccountAdder, MgmtSocket};
use super::show::{parse_target_show, TgtLun, TgtTarget};
use super::tgtadm::{backing_path_arg, tgtadm_failure};
use super::*;
use crate::error::ErrorKind;
use crate::export::ExportHealth;
use crate::runner::{Cmd, FakeRunner, Output};
use crate::types::Chap;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex as StdMutex;

/// Real output of tgt 1.0.85 (`tgtadm --mode target --op show`): a target
/// with two IQN ACL entries, an address ACL, an incoming and an outgoing
/// CHAP account and two LUNs (the second thin); a foreign target; and a
/// second pdisk target on tid 3 with rdwr.
const SHOW_CHAP_AND_ACLS: &str = "\
Target 1: iqn.2026-11.io.stratus.pdisk:vol-a
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00010001
            SCSI SN: beaf11
            Size: 67 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: Yes
            Backing store type: aio
            Backing store path: /tmp/tgtx/v1.img
            Backing store flags: 
    Account information:
        alice
        bob (outgoing)
    ACL information:
        10.0.0.0/24
        iqn.2026-11.io.stratus:host1
        iqn.2026-11.io.stratus:host2
Target 2: iqn.2003-01.org.other:foreign
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00020000
            SCSI SN: beaf20
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
    Account information:
    ACL information:
Target 3: iqn.2026-11.io.stratus.pdisk:vol-b
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00030000
            SCSI SN: beaf30
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00030001
            SCSI SN: beaf31
            Size: 34 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /tmp/tgtx/v2.img
            Backing store flags: 
    Account information:
    ACL information:
";

/// Real output with a logged-in initiator (an I_T nexus).
const SHOW_NEXUS: &str = "\
Target 2: iqn.2026-11.io.stratus.pdisk:vol-b
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 2
            Initiator: iqn.2026-11.io.stratus:tester alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00020000
            SCSI SN: beaf20
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00020001
            SCSI SN: beaf21
            Size: 34 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: aio
            Backing store path: /tmp/tgtx/v2.img
            Backing store flags: 
    Account information:
    ACL information:
        iqn.2026-11.io.stratus:tester
Target 4: iqn.2003-01.org.other:foreign
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00040000
            SCSI SN: beaf40
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
    Account information:
    ACL information:
        ALL
";

const PREFIX: &str = "iqn.2026-11.io.stratus.pdisk";
const SECRET: &str = "Sup3rSecretPw0";

fn iqn(s: &str) -> Iqn {
    s.parse().unwrap()
}

fn lun(n: u64, bstype: &str, path: Option<&str>) -> TgtLun {
    TgtLun {
        lun: n,
        bstype: bstype.into(),
        path: path.map(PathBuf::from),
        thin: false,
    }
}

/// Renders targets the way tgt 1.0.85 does (checked against the real
/// captures above by `renderer_matches_real_output`).
fn render_show(targets: &[TgtTarget]) -> String {
    let mut s = String::new();
    for t in targets {
        s += &format!(
                "Target {}: {}\n    System information:\n        Driver: iscsi\n        State: ready\n    I_T nexus information:\n",
                t.tid, t.iqn
            );
        for n in 0..t.nexuses {
            s += &format!(
                    "        I_T nexus: {}\n            Initiator: iqn.2026-11.io.stratus:tester alias: none\n            Connection: 0\n                IP Address: 127.0.0.1\n",
                    n + 2
                );
        }
        s += "    LUN information:\n";
        for l in &t.luns {
            let (ty, size) = if l.lun == 0 {
                ("controller", "0 MB, Block size: 1")
            } else {
                ("disk", "64 MB, Block size: 512")
            };
            s += &format!(
                    "        LUN: {}\n            Type: {ty}\n            SCSI ID: IET     {:04x}{:04x}\n            SCSI SN: beaf{}{}\n            Size: {size}\n            Online: Yes\n            Removable media: No\n            Prevent removal: No\n            Readonly: No\n            SWP: No\n            Thin-provisioning: {}\n            Backing store type: {}\n            Backing store path: {}\n            Backing store flags: \n",
                    l.lun, t.tid, l.lun, t.tid, l.lun,
                    if l.thin { "Yes" } else { "No" },
                    l.bstype,
                    l.path.as_ref().map(|p| p.display().to_string()).unwrap_or("None".into()),
                );
        }
        s += "    Account information:\n";
        for a in &t.incoming_accounts {
            s += &format!("        {a}\n");
        }
        if let Some(o) = &t.outgoing_account {
            s += &format!("        {o} (outgoing)\n");
        }
        s += "    ACL information:\n";
        for a in &t.acl {
            s += &format!("        {a}\n");
        }
    }
    s
}

fn target(tid: u32, name: &str, path: &str, acl: &[&str], accounts: &[&str]) -> TgtTarget {
    TgtTarget {
        tid,
        iqn: name.into(),
        nexuses: 0,
        luns: vec![lun(0, "null", None), lun(1, "aio", Some(path))],
        incoming_accounts: accounts.iter().map(|s| s.to_string()).collect(),
        outgoing_account: None,
        acl: acl.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn parses_real_output_with_chap_acls_and_several_targets() {
    let ts = parse_target_show(SHOW_CHAP_AND_ACLS).unwrap();
    assert_eq!(ts.len(), 3);
    let a = &ts[0];
    assert_eq!(a.tid, 1);
    assert_eq!(a.iqn, "iqn.2026-11.io.stratus.pdisk:vol-a");
    assert_eq!(a.nexuses, 0);
    assert_eq!(
        a.luns,
        vec![
            lun(0, "null", None),
            TgtLun {
                thin: true,
                ..lun(1, "aio", Some("/tmp/tgtx/v1.img"))
            }
        ]
    );
    assert_eq!(a.incoming_accounts, vec!["alice"]);
    assert_eq!(a.outgoing_account.as_deref(), Some("bob"));
    assert_eq!(
        a.acl,
        vec![
            "10.0.0.0/24",
            "iqn.2026-11.io.stratus:host1",
            "iqn.2026-11.io.stratus:host2"
        ]
    );
    assert_eq!(ts[1].iqn, "iqn.2003-01.org.other:foreign");
    assert_eq!(ts[1].luns, vec![lun(0, "null", None)]);
    assert!(ts[1].acl.is_empty() && ts[1].incoming_accounts.is_empty());
    assert_eq!(ts[2].tid, 3);
    assert_eq!(ts[2].luns[1], lun(1, "rdwr", Some("/tmp/tgtx/v2.img")));

    let nexus = parse_target_show(SHOW_NEXUS).unwrap();
    assert_eq!(nexus[0].nexuses, 1);
    assert_eq!(nexus[0].acl, vec!["iqn.2026-11.io.stratus:tester"]);
    assert_eq!(nexus[1].acl, vec!["ALL"]);
    assert!(parse_target_show("").unwrap().is_empty());
    assert!(parse_target_show("garbage\n").is_err());
}

#[test]
fn renderer_matches_real_output() {
    // Same text as tgt prints, except the sizes (not parsed, so not rendered).
    let without_sizes = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| !l.trim_start().starts_with("Size:"))
            .map(str::to_owned)
            .collect()
    };
    for real in [SHOW_CHAP_AND_ACLS, SHOW_NEXUS] {
        let rendered = render_show(&parse_target_show(real).unwrap());
        assert_eq!(without_sizes(&rendered), without_sizes(real));
    }
}

#[tokio::test]
async fn list_keeps_prefixed_targets_with_lun1_acl_and_chap_user() {
    let fake = FakeRunner::with(|_| Ok(Output::ok(SHOW_CHAP_AND_ACLS)));
    let (exp, _) = exporter(fake);
    let live = exp.list().await.unwrap();
    assert_eq!(
        live,
        vec![
            LiveExport {
                target_iqn: "iqn.2026-11.io.stratus.pdisk:vol-a".into(),
                backing_path: Some("/tmp/tgtx/v1.img".into()),
                initiators: vec![
                    "10.0.0.0/24".into(),
                    "iqn.2026-11.io.stratus:host1".into(),
                    "iqn.2026-11.io.stratus:host2".into()
                ],
                // One incoming and one outgoing account: mutual CHAP.
                chap_user: Some("alice".into()),
                chap_target_user: Some("bob".into()),
                health: ExportHealth::Whole,
            },
            LiveExport {
                target_iqn: "iqn.2026-11.io.stratus.pdisk:vol-b".into(),
                backing_path: Some("/tmp/tgtx/v2.img".into()),
                initiators: vec![],
                chap_user: None,
                chap_target_user: None,
                health: ExportHealth::Whole,
            },
        ]
    );
}

#[test]
fn ownership_needs_the_prefix_then_a_separator() {
    let (exp, _) = exporter(FakeRunner::new());
    assert!(exp.owns("iqn.2026-11.io.stratus.pdisk:vol-1"));
    assert!(exp.owns("iqn.2026-11.io.stratus.pdisk.x:vol-1"));
    assert!(!exp.owns("iqn.2026-11.io.stratus.pdiskother:vol-1"));
    assert!(!exp.owns("iqn.2003-01.org.other:foreign"));
}

/// Scripted answers of the management socket, recording the secrets.
#[derive(Default)]
struct FakeAccounts {
    answers: StdMutex<VecDeque<AccountAdd>>,
    seen: StdMutex<Vec<(String, String)>>,
}

impl AccountAdder for FakeAccounts {
    fn add<'a>(&'a self, chap: &'a Chap) -> BoxFuture<'a, Result<AccountAdd>> {
        self.seen
            .lock()
            .unwrap()
            .push((chap.user.clone(), chap.secret().to_owned()));
        let a = self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(AccountAdd::Created);
        Box::pin(async move { Ok(a) })
    }
}

fn exporter(fake: FakeRunner) -> (TgtExporter, Arc<FakeAccounts>) {
    let accounts = Arc::new(FakeAccounts::default());
    // The argv below are written for the aio store (no thin
    // provisioning update); the rdwr default is covered separately.
    let cfg = TgtConfig {
        control_port: 7,
        portal: "127.0.0.1:3260".into(),
        iqn_prefix: PREFIX.into(),
        bstype: "aio".into(),
        ..TgtConfig::default()
    };
    (
        TgtExporter::with_accounts(Arc::new(fake), cfg, accounts.clone()),
        accounts,
    )
}

/// A runner answering `target show` with `show` and everything else with success.
fn showing(show: String) -> FakeRunner {
    FakeRunner::with(move |argv| {
        if argv.iter().any(|a| a == "show") {
            Ok(Output::ok(show.clone()))
        } else {
            Ok(Output::ok(""))
        }
    })
}

const T: &str = "tgtadm -C 7 --lld iscsi";

fn spec(name: &str, initiators: &[&str], chap: Option<Chap>) -> ExportSpec {
    ExportSpec {
        target_iqn: iqn(&format!("{PREFIX}:{name}")),
        backing_path: PathBuf::from(format!("/pool/{name}")),
        initiators: initiators.iter().map(|i| iqn(i)).collect(),
        chap,
    }
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|l| l.replace("$T", T)).collect()
}

#[tokio::test]
async fn fresh_export_with_two_initiators() {
    // tid 1 is taken by a foreign target: the new one gets tid 2.
    let foreign = TgtTarget {
        luns: vec![lun(0, "null", None)],
        ..target(1, "iqn.2003-01.org.other:foreign", "/x", &[], &[])
    };
    let fake = showing(render_show(&[foreign]));
    let (exp, _) = exporter(fake.clone());
    let s = spec(
        "vol-1",
        &["iqn.2026-11.io.stratus:h1", "iqn.2026-11.io.stratus:h2"],
        None,
    );
    exp.export(&s).await.unwrap();
    assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op new --tid 2 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
                "$T --mode logicalunit --op new --tid 2 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 2 --initiator-name iqn.2026-11.io.stratus:h1",
                "$T --mode target --op bind --tid 2 --initiator-name iqn.2026-11.io.stratus:h2",
            ])
        );
}

#[tokio::test]
async fn a_new_target_offers_the_configured_iscsi_params_before_its_acl_opens() {
    let fake = showing(String::new());
    let accounts = Arc::new(FakeAccounts::default());
    let cfg = TgtConfig {
        control_port: 7,
        iqn_prefix: PREFIX.into(),
        bstype: "aio".into(),
        params: "InitialR2T=No,QueueDepth=64,MaxRecvDataSegmentLength=262144"
            .parse()
            .unwrap(),
        ..TgtConfig::default()
    };
    let exp = TgtExporter::with_accounts(Arc::new(fake.clone()), cfg, accounts);
    exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
        .await
        .unwrap();
    assert_eq!(
        fake.command_lines()[1..],
        lines(&[
            "$T --mode target --op new --tid 1 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
            "$T --mode target --op update --tid 1 --name MaxRecvDataSegmentLength --value 262144",
            "$T --mode target --op update --tid 1 --name InitialR2T --value No",
            "$T --mode target --op update --tid 1 --name MaxQueueCmd --value 64",
            "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
            "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
        ])
    );

    // tgtd refuses a parameter: the target goes again, nothing is bound,
    // and the export fails.
    let fake = FakeRunner::with(|argv| {
        if argv.iter().any(|a| a == "InitialR2T") {
            Ok(Output::failed(22, "tgtadm: invalid request"))
        } else {
            Ok(Output::ok(""))
        }
    });
    let cfg = TgtConfig {
        control_port: 7,
        iqn_prefix: PREFIX.into(),
        bstype: "aio".into(),
        params: "InitialR2T=No".parse().unwrap(),
        ..TgtConfig::default()
    };
    let exp = TgtExporter::with_accounts(
        Arc::new(fake.clone()),
        cfg,
        Arc::new(FakeAccounts::default()),
    );
    assert!(exp
        .export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
        .await
        .is_err());
    assert_eq!(
        fake.command_lines()[1..],
        lines(&[
            "$T --mode target --op new --tid 1 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
            "$T --mode target --op update --tid 1 --name InitialR2T --value No",
            "$T --mode target --op delete --tid 1",
        ])
    );
}

#[tokio::test]
async fn rdwr_exports_get_thin_provisioning() {
    let fake = showing(String::new());
    let accounts = Arc::new(FakeAccounts::default());
    let cfg = TgtConfig {
        control_port: 7,
        iqn_prefix: PREFIX.into(),
        bstype: "rdwr".into(),
        ..TgtConfig::default()
    };
    let exp = TgtExporter::with_accounts(Arc::new(fake.clone()), cfg, accounts);
    exp.export(&spec("vol-1", &[], None)).await.unwrap();
    assert_eq!(
            fake.command_lines()[2..],
            lines(&[
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype rdwr",
                "$T --mode logicalunit --op update --tid 1 --lun 1 --params thin_provisioning=1",
            ])
        );
}

#[tokio::test]
async fn re_export_adds_and_removes_initiators_only() {
    let live = target(
        3,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/pool/vol-1",
        &["iqn.2026-11.io.stratus:h1", "iqn.2026-11.io.stratus:h2"],
        &[],
    );
    let fake = showing(render_show(&[live]));
    let (exp, _) = exporter(fake.clone());
    let s = spec(
        "vol-1",
        &["iqn.2026-11.io.stratus:h2", "iqn.2026-11.io.stratus:h3"],
        None,
    );
    exp.export(&s).await.unwrap();
    assert_eq!(
        fake.command_lines(),
        lines(&[
            "$T --mode target --op show",
            "$T --mode target --op unbind --tid 3 --initiator-name iqn.2026-11.io.stratus:h1",
            "$T --mode target --op bind --tid 3 --initiator-name iqn.2026-11.io.stratus:h3",
        ])
    );
}

#[tokio::test]
async fn re_export_fixes_backing_path_and_address_acls() {
    let mut live = target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/old/path",
        &["ALL"],
        &[],
    );
    live.luns.push(lun(2, "aio", Some("/stray")));
    let fake = showing(render_show(&[live]));
    let (exp, _) = exporter(fake.clone());
    exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
        .await
        .unwrap();
    assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op unbind --tid 1 --initiator-address ALL",
                "$T --mode logicalunit --op delete --tid 1 --lun 2",
                "$T --mode logicalunit --op delete --tid 1 --lun 1",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            ])
        );
}

#[tokio::test]
async fn unexport_deletes_target_and_unused_accounts() {
    let a = target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/pool/vol-1",
        &["iqn.2026-11.io.stratus:h1"],
        &["alice"],
    );
    let b = target(
        2,
        "iqn.2026-11.io.stratus.pdisk:vol-2",
        "/pool/vol-2",
        &[],
        &["carol"],
    );
    let mut a2 = a.clone();
    a2.incoming_accounts = vec!["carol".into()];
    for (live, deletes_account) in [(vec![a, b.clone()], true), (vec![a2, b], false)] {
        let fake = showing(render_show(&live));
        let (exp, _) = exporter(fake.clone());
        exp.unexport(&iqn(&format!("{PREFIX}:vol-1")))
            .await
            .unwrap();
        // Closed first, its own accounts deleted next, the target last: a
        // crash between leaves a closed target naming what is left to do.
        let mut want = lines(&[
            "$T --mode target --op show",
            "$T --mode target --op unbind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
        ]);
        if deletes_account {
            want.extend(lines(&["$T --mode account --op delete --user alice"]));
        }
        want.extend(lines(&["$T --mode target --op delete --force --tid 1"]));
        assert_eq!(fake.command_lines(), want);
    }
}

#[tokio::test]
async fn unexport_of_a_missing_target_is_ok() {
    let fake = showing(String::new());
    let (exp, _) = exporter(fake.clone());
    exp.unexport(&iqn(&format!("{PREFIX}:vol-9")))
        .await
        .unwrap();
    assert_eq!(fake.command_lines(), lines(&["$T --mode target --op show"]));
    let err = exp
        .unexport(&iqn("iqn.2003-01.org.other:foreign"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn chap_export_binds_account_before_acl_and_never_puts_the_secret_in_argv() {
    let fake = showing(String::new());
    let (exp, accounts) = exporter(fake.clone());
    let chap = Chap::new("alice", SECRET).unwrap();
    exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], Some(chap)))
        .await
        .unwrap();
    assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op new --tid 1 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
                "$T --mode account --op bind --tid 1 --user alice",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            ])
        );
    assert_eq!(
        *accounts.seen.lock().unwrap(),
        vec![("alice".to_string(), SECRET.to_string())]
    );
    assert!(!fake.command_lines().iter().any(|l| l.contains(SECRET)));
}

const TARGET_SECRET: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

#[tokio::test]
async fn mutual_chap_binds_the_outgoing_account_before_the_acl_without_secrets_in_argv() {
    let fake = showing(String::new());
    let (exp, accounts) = exporter(fake.clone());
    let chap = Chap::new("alice", SECRET)
        .unwrap()
        .with_mutual(Chap::new("tgt-vol-1", TARGET_SECRET).unwrap())
        .unwrap();
    exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], Some(chap)))
        .await
        .unwrap();
    assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode target --op new --tid 1 --targetname iqn.2026-11.io.stratus.pdisk:vol-1",
                "$T --mode account --op bind --tid 1 --user alice",
                "$T --mode account --op bind --tid 1 --user tgt-vol-1 --outgoing",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
                "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            ])
        );
    assert_eq!(
        *accounts.seen.lock().unwrap(),
        vec![
            ("alice".to_string(), SECRET.to_string()),
            ("tgt-vol-1".to_string(), TARGET_SECRET.to_string())
        ]
    );
    let argv = fake.command_lines().join("\n");
    assert!(!argv.contains(SECRET) && !argv.contains(TARGET_SECRET));
}

#[tokio::test]
async fn mutual_chap_rekeys_an_existing_outgoing_account_and_refuses_one_bound_elsewhere() {
    // vol-1 already has alice in and tgt-vol-1 out: both accounts exist.
    let mut one = target(
        1,
        &format!("{PREFIX}:vol-1"),
        "/pool/vol-1",
        &[],
        &["alice"],
    );
    one.outgoing_account = Some("tgt-vol-1".into());
    let fake = showing(render_show(std::slice::from_ref(&one)));
    let (exp, accounts) = exporter(fake.clone());
    accounts.answers.lock().unwrap().extend([
        AccountAdd::Exists,
        AccountAdd::Created,
        AccountAdd::Exists,
    ]);
    let chap = || {
        Chap::new("alice", SECRET)
            .unwrap()
            .with_mutual(Chap::new("tgt-vol-1", TARGET_SECRET).unwrap())
            .unwrap()
    };
    exp.export(&spec("vol-1", &[], Some(chap()))).await.unwrap();
    let cmds = fake.command_lines();
    let pos = |l: &str| {
        cmds.iter()
            .position(|c| *c == l.replace("$T", T))
            .unwrap_or_else(|| panic!("{l} not in {cmds:#?}"))
    };
    let unbind_out = pos("$T --mode account --op unbind --tid 1 --user tgt-vol-1 --outgoing");
    let delete_out = pos("$T --mode account --op delete --user tgt-vol-1");
    let bind_out = pos("$T --mode account --op bind --tid 1 --user tgt-vol-1 --outgoing");
    assert!(
        unbind_out < delete_out && delete_out < bind_out,
        "{cmds:#?}"
    );
    let seen = accounts.seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|(u, _)| u == "tgt-vol-1").count(),
        2,
        "re-created after deletion: {seen:?}"
    );

    // vol-2 may not take vol-1's target account: no account is bound or deleted.
    let fake = showing(render_show(&[one]));
    let (exp, _) = exporter(fake.clone());
    let err = exp
        .export(&spec(
            "vol-2",
            &[],
            Some(
                Chap::new("bob", SECRET)
                    .unwrap()
                    .with_mutual(Chap::new("tgt-vol-1", TARGET_SECRET).unwrap())
                    .unwrap(),
            ),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert!(err.message().contains("tgt-vol-1"), "{err}");
    assert!(!fake
        .command_lines()
        .iter()
        .any(|l| l.contains("--op bind") || l.contains("--op delete")));
}

#[tokio::test]
async fn re_export_with_existing_account_rekeys_while_targets_are_closed() {
    // vol-1 and vol-2 share alice; vol-1 also has a stale second account.
    let one = target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/pool/vol-1",
        &["iqn.2026-11.io.stratus:h1"],
        &["alice", "old"],
    );
    let two = target(
        2,
        "iqn.2026-11.io.stratus.pdisk:vol-2",
        "/pool/vol-2",
        &["iqn.2026-11.io.stratus:h2"],
        &["alice"],
    );
    let fake = showing(render_show(&[one, two]));
    let (exp, accounts) = exporter(fake.clone());
    accounts
        .answers
        .lock()
        .unwrap()
        .extend([AccountAdd::Exists, AccountAdd::Created]);
    let chap = Chap::new("alice", SECRET).unwrap();
    exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], Some(chap)))
        .await
        .unwrap();
    assert_eq!(
        fake.command_lines(),
        lines(&[
            "$T --mode target --op show",
            // close both targets
            "$T --mode target --op unbind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
            "$T --mode target --op unbind --tid 2 --initiator-name iqn.2026-11.io.stratus:h2",
            "$T --mode account --op unbind --tid 2 --user alice",
            // reverse order: no hole in tgt's account table
            "$T --mode account --op unbind --tid 1 --user old",
            "$T --mode account --op unbind --tid 1 --user alice",
            "$T --mode account --op delete --user alice",
            // (re-created over the management socket)
            "$T --mode account --op bind --tid 1 --user alice",
            "$T --mode account --op bind --tid 2 --user alice",
            "$T --mode target --op bind --tid 2 --initiator-name iqn.2026-11.io.stratus:h2",
            // `old` is bound nowhere else (the fake show still lists it on
            // tid 1, so it is kept here; real tgtd would have it unbound)
            "$T --mode target --op show",
            "$T --mode target --op bind --tid 1 --initiator-name iqn.2026-11.io.stratus:h1",
        ])
    );
    assert_eq!(accounts.seen.lock().unwrap().len(), 2);
    assert!(!fake.command_lines().iter().any(|l| l.contains(SECRET)));
}

#[tokio::test]
async fn chap_user_shared_with_a_foreign_target_is_refused() {
    let one = target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/pool/vol-1",
        &[],
        &[],
    );
    let foreign = target(2, "iqn.2003-01.org.other:foreign", "/x", &[], &["alice"]);
    let fake = showing(render_show(&[one, foreign]));
    let (exp, accounts) = exporter(fake.clone());
    accounts
        .answers
        .lock()
        .unwrap()
        .push_back(AccountAdd::Exists);
    let chap = Chap::new("alice", SECRET).unwrap();
    let err = exp
        .export(&spec("vol-1", &[], Some(chap)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{err}");
    assert_eq!(fake.command_lines(), lines(&["$T --mode target --op show"]));
}

#[tokio::test]
async fn dropping_chap_unbinds_and_deletes_the_account() {
    let one = target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/pool/vol-1",
        &["iqn.2026-11.io.stratus:h1"],
        &["alice"],
    );
    let fake = showing(render_show(&[one]));
    let (exp, accounts) = exporter(fake.clone());
    exp.export(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
        .await
        .unwrap();
    assert_eq!(
        fake.command_lines(),
        lines(&[
            "$T --mode target --op show",
            "$T --mode account --op unbind --tid 1 --user alice",
            "$T --mode account --op delete --user alice",
        ])
    );
    assert!(accounts.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn refresh_size_recreates_lun_1() {
    let one = target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/pool/vol-1",
        &["iqn.2026-11.io.stratus:h1"],
        &[],
    );
    let fake = showing(render_show(&[one]));
    let (exp, _) = exporter(fake.clone());
    exp.refresh_size(&spec("vol-1", &["iqn.2026-11.io.stratus:h1"], None))
        .await
        .unwrap();
    assert_eq!(
            fake.command_lines(),
            lines(&[
                "$T --mode target --op show",
                "$T --mode logicalunit --op delete --tid 1 --lun 1",
                "$T --mode logicalunit --op new --tid 1 --lun 1 --backing-store /pool/vol-1 --bstype aio",
            ])
        );
    let err = exp
        .refresh_size(&spec("vol-9", &[], None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn lun_delete_retries_while_busy() {
    let busy = Arc::new(StdMutex::new(2));
    let one = render_show(&[target(
        1,
        "iqn.2026-11.io.stratus.pdisk:vol-1",
        "/old",
        &[],
        &[],
    )]);
    let b = busy.clone();
    let fake = FakeRunner::with(move |argv| {
        if argv.iter().any(|a| a == "show") {
            return Ok(Output::ok(one.clone()));
        }
        let mut n = b.lock().unwrap();
        if argv.iter().any(|a| a == "delete") && *n > 0 {
            *n -= 1;
            return Ok(Output::failed(
                22,
                "tgtadm: this logical unit is still active\n",
            ));
        }
        Ok(Output::ok(""))
    });
    let (exp, _) = exporter(fake.clone());
    exp.export(&spec("vol-1", &[], None)).await.unwrap();
    let deletes = fake
        .command_lines()
        .iter()
        .filter(|l| l.contains("--op delete"))
        .count();
    assert_eq!(deletes, 3);
}

#[tokio::test]
async fn tgtd_down_is_unavailable() {
    let fake = FakeRunner::with(|_| {
        Ok(Output::failed(
                107,
                "tgtadm: failed to send request hdr to tgt daemon, Transport endpoint is not connected\n",
            ))
    });
    let (exp, _) = exporter(fake);
    let err = exp.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("tgtd (control port 7)"), "{err}");
    assert!(err.message().contains("Transport endpoint"), "{err}");
    let err = exp.export(&spec("vol-1", &[], None)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert_eq!(exp.list().await.unwrap_err().kind(), ErrorKind::Unavailable);

    // tgtd dying mid-request: tgtadm exits 0 but says so.
    let fake = FakeRunner::with(|_| {
        Ok(Output {
            status: 0,
            stdout: String::new(),
            stderr: "tgtadm: tgtd closed the socket\n".into(),
        })
    });
    let (exp, _) = exporter(fake);
    assert_eq!(exp.list().await.unwrap_err().kind(), ErrorKind::Unavailable);

    // Timeouts and a missing tgtadm (runner errors) stay Unavailable.
    let fake = FakeRunner::with(|_| Err(Error::unavailable("tgtadm timed out after 10s")));
    let (exp, _) = exporter(fake);
    assert_eq!(
        exp.check().await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
}

#[tokio::test]
async fn check_wants_the_iscsi_driver_ready() {
    let ok =
        "System:\n    State: ready\n    debug: off\nLLDs:\n    iscsi: ready\n    iser: error\n";
    let (exp, _) = exporter(FakeRunner::with(move |_| Ok(Output::ok(ok))));
    exp.check().await.unwrap();
    let (exp, _) = exporter(FakeRunner::with(|_| {
        Ok(Output::ok("LLDs:\n    iscsi: error\n"))
    }));
    assert_eq!(
        exp.check().await.unwrap_err().kind(),
        ErrorKind::Unavailable
    );
}

#[test]
fn tgt_errors_map_to_kinds() {
    let cmd = Cmd::new("tgtadm").arg("-C");
    let kind = |stderr: &str| {
        tgtadm_failure(&cmd, &Output::failed(22, stderr))
            .unwrap()
            .kind()
    };
    assert_eq!(kind("tgtadm: can't find the target\n"), ErrorKind::NotFound);
    assert_eq!(
        kind("tgtadm: this target already exists\n"),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        kind("tgtadm: this target is still active\n"),
        ErrorKind::FailedPrecondition
    );
    assert_eq!(kind("tgtadm: invalid request\n"), ErrorKind::Internal);
    assert_eq!(
        kind("tgtadm: can't send the request to the tgt daemon, Connection refused\n"),
        ErrorKind::Unavailable
    );
    let e = tgtadm_failure(&cmd, &Output::failed(22, "tgtadm: invalid request\n")).unwrap();
    assert!(e.message().contains("invalid request"), "{e}");
    assert!(tgtadm_failure(&cmd, &Output::ok("")).is_none());
}

#[test]
fn backing_paths_with_commas_are_refused() {
    assert!(backing_path_arg(Path::new("/pool/a,b")).is_err());
    assert!(backing_path_arg(Path::new("relative")).is_err());
    assert_eq!(backing_path_arg(Path::new("/pool/a")).unwrap(), "/pool/a");
}

#[test]
fn request_layout_matches_struct_tgtadm_req() {
    let b = mgmt::encode(mgmt::MODE_ACCOUNT, mgmt::OP_NEW, -1, b"user=u,password=p\0");
    assert_eq!(mgmt::REQ_LEN, 120); // sizeof(struct tgtadm_req) on x86_64, checked with gcc
    assert_eq!(b.len(), 120 + 18);
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 7);
    assert_eq!(u32_at(4), 0);
    assert_eq!(&b[8..13], b"iscsi");
    assert!(b[13..72].iter().all(|&c| c == 0));
    assert_eq!(u32_at(72), 138); // len
    assert_eq!(u32_at(76), u32::MAX); // tid -1
    assert_eq!(u64::from_ne_bytes(b[88..96].try_into().unwrap()), u64::MAX); // lun
    assert_eq!(&b[120..], b"user=u,password=p\0");
}

/// A stand-in tgtd on a Unix socket: checks the request like
/// mgmt.c does and answers `code`.
async fn fake_tgtd(listener: tokio::net::UnixListener, code: u32) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, _) = listener.accept().await.unwrap();
    let mut hdr = [0u8; 120];
    s.read_exact(&mut hdr).await.unwrap();
    let len = u32::from_ne_bytes(hdr[72..76].try_into().unwrap()) as usize;
    let mut params = vec![0u8; len - 120];
    s.read_exact(&mut params).await.unwrap();
    let mut rsp = Vec::new();
    rsp.extend_from_slice(&code.to_ne_bytes());
    rsp.extend_from_slice(&8u32.to_ne_bytes());
    s.write_all(&rsp).await.unwrap();
    params
}

#[tokio::test]
async fn management_socket_creates_accounts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("socket.7");
    let adder = MgmtSocket {
        path: path.clone(),
        control_port: 7,
    };
    let chap = Chap::new("alice", SECRET).unwrap();

    let server = tokio::spawn(fake_tgtd(tokio::net::UnixListener::bind(&path).unwrap(), 0));
    assert_eq!(adder.add(&chap).await.unwrap(), AccountAdd::Created);
    let params = server.await.unwrap();
    assert_eq!(
        params,
        format!("user=alice,password={SECRET}\0").into_bytes()
    );
    std::fs::remove_file(&path).unwrap();

    let server = tokio::spawn(fake_tgtd(
        tokio::net::UnixListener::bind(&path).unwrap(),
        14,
    ));
    assert_eq!(adder.add(&chap).await.unwrap(), AccountAdd::Exists);
    server.await.unwrap();
    std::fs::remove_file(&path).unwrap();

    let server = tokio::spawn(fake_tgtd(
        tokio::net::UnixListener::bind(&path).unwrap(),
        16,
    ));
    let err = adder.add(&chap).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert!(err.message().contains("too many accounts"), "{err}");
    assert!(!err.message().contains(SECRET));
    server.await.unwrap();
    std::fs::remove_file(&path).unwrap();

    // No tgtd: Unavailable, naming the socket, without the secret.
    let err = adder.add(&chap).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("socket.7"), "{err}");
    assert!(!err.message().contains(SECRET));
}
