//! The tgt exporter against a real tgtd and QEMU's iSCSI initiator.
//!
//! Each test starts its own tgtd on its own control port and portal (the
//! `PORT` constants, 211xx) and stops it in a drop guard, so tests run in
//! parallel and clean up when they fail. Needs root, tgt, qemu-io with the
//! iscsi driver (qemu-block-extra) and libiscsi-bin:
//! `cargo test -p pdisk --test tgt_exporter -- --include-ignored`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pdisk::export::tgt::{TgtConfig, TgtExporter};
use pdisk::export::{ExportSpec, Exporter, IscsiParams};
use stratus_core::error::ErrorKind;
use stratus_core::runner::RecordingRunner;
use stratus_core::types::{Chap, Iqn};
use tokio::io::AsyncWriteExt;

const PREFIX: &str = "iqn.2026-11.io.stratus.pdisk";
const HOST_A: &str = "iqn.2026-11.io.stratus:host-a";
const HOST_B: &str = "iqn.2026-11.io.stratus:host-b";
const MIB: u64 = 1 << 20;
const SOCKET_DIR: &str = "/var/run/tgtd";

/// A tgtd of our own; killed, and its socket files removed, on drop.
struct Tgtd {
    port: u16,
    log: PathBuf,
    child: Option<std::process::Child>,
}

impl Tgtd {
    fn start(port: u16, dir: &Path) -> Tgtd {
        let log = dir.join(format!("tgtd-{port}.log"));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new("/usr/sbin/tgtd")
            .args(["-f", "-C", &port.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start tgtd");
        let mut t = Tgtd {
            port,
            log,
            child: Some(child),
        };
        // tgtd needs a moment before its socket answers: poll it.
        let started = Instant::now();
        loop {
            let out = tgtadm(port, &["--mode", "system", "--op", "show"]);
            if out.contains("iscsi: ready") {
                break;
            }
            if let Some(status) = t.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tgtd exited with {status}: {}", t.log_text());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tgtd on port {port} not ready: {}",
                t.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for suffix in ["", ".lock"] {
            let _ = std::fs::remove_file(format!("{SOCKET_DIR}/socket.{}{suffix}", self.port));
        }
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Raw tgtadm stdout + stderr, for looking behind the exporter's back.
fn tgtadm(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("tgtadm")
        .args(["-C", &port.to_string(), "--lld", "iscsi"])
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn exporter(port: u16, bstype: &str) -> (TgtExporter, Arc<RecordingRunner>) {
    let rec = Arc::new(RecordingRunner::default());
    let cfg = TgtConfig {
        control_port: port.into(),
        portal: format!("127.0.0.1:{port}"),
        iqn_prefix: PREFIX.into(),
        bstype: bstype.into(),
        ..TgtConfig::default()
    };
    (TgtExporter::new(rec.clone(), cfg), rec)
}

fn iqn(s: &str) -> Iqn {
    s.parse().unwrap()
}

/// A sparse backing file of `size` bytes.
fn volume(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(format!("{name}.img"));
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn spec(name: &str, path: &Path, initiators: &[&str], chap: Option<&Chap>) -> ExportSpec {
    ExportSpec {
        target_iqn: iqn(&format!("{PREFIX}:{name}")),
        backing_path: path.to_owned(),
        initiators: initiators.iter().map(|i| iqn(i)).collect(),
        chap: chap.cloned(),
    }
}

/// How an initiator logs in.
struct Login<'a> {
    port: u16,
    target: &'a Iqn,
    initiator: &'a str,
    /// CHAP user and a file holding the secret (given to QEMU as a secret object).
    chap: Option<(&'a str, &'a Path)>,
}

impl Login<'_> {
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut opts = format!(
            "driver=iscsi,transport=tcp,portal=127.0.0.1:{},target={},lun=1,initiator-name={}",
            self.port, self.target, self.initiator
        );
        if let Some((user, file)) = self.chap {
            args.push("--object".into());
            args.push(format!("secret,id=sec0,file={}", file.display()));
            opts += &format!(",user={user},password-secret=sec0");
        }
        args.push("--image-opts".into());
        args.push(opts);
        args
    }

    /// Runs qemu-io commands; Ok(stdout) when all succeeded.
    async fn io(&self, cmds: &[&str]) -> Result<String, String> {
        let mut c = tokio::process::Command::new("qemu-io");
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.args(self.args()).stdin(Stdio::null()).kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), c.output())
            .await
            .expect("qemu-io timed out")
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && !text.contains("failed") && !text.contains("error") {
            Ok(text)
        } else {
            Err(text)
        }
    }

    async fn length(&self) -> String {
        self.io(&["length"]).await.unwrap().trim().to_owned()
    }

    /// A qemu-io that stays logged in, reading commands from a pipe.
    async fn session(&self) -> Session {
        let mut child = tokio::process::Command::new("qemu-io")
            .args(self.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"length\n").await.unwrap();
        // Wait until tgtd sees the initiator logged in.
        let started = Instant::now();
        while !tgtadm(self.port, &["--mode", "target", "--op", "show"]).contains("I_T nexus:") {
            assert!(started.elapsed() < Duration::from_secs(20), "no session");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Session { child, stdin }
    }
}

struct Session {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
}

impl Session {
    /// Sends the commands, ends the session, returns its output.
    async fn finish(self, cmds: &[&str]) -> String {
        self.finish_within(cmds, Duration::from_secs(60))
            .await
            .expect("qemu-io session timed out")
    }

    /// Like `finish`, but None when qemu-io is still running after `limit`
    /// (it is then killed).
    async fn finish_within(mut self, cmds: &[&str], limit: Duration) -> Option<String> {
        for c in cmds {
            self.stdin
                .write_all(format!("{c}\n").as_bytes())
                .await
                .unwrap();
        }
        drop(self.stdin);
        let out = tokio::time::timeout(limit, self.child.wait_with_output())
            .await
            .ok()?
            .unwrap();
        Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    p
}

fn first_bytes(path: &Path, n: usize) -> Vec<u8> {
    let mut v = std::fs::read(path).unwrap();
    v.truncate(n);
    v
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn export_serves_data_to_the_acl_only_and_converges() {
    const PORT: u16 = 21101;
    let dir = tempfile::tempdir().unwrap();
    let _tgtd = Tgtd::start(PORT, dir.path());
    let (exp, _) = exporter(PORT, "aio");
    exp.check().await.unwrap();

    let path = volume(dir.path(), "vol-1", 64 * MIB);
    let s = spec("vol-1", &path, &[HOST_A], None);
    exp.export(&s).await.unwrap();
    exp.export(&s).await.unwrap(); // idempotent
    let a = Login {
        port: PORT,
        target: &s.target_iqn,
        initiator: HOST_A,
        chap: None,
    };
    let b = Login {
        initiator: HOST_B,
        ..a
    };
    a.io(&["write -P 0xab 0 1M"]).await.unwrap();
    a.io(&["read -P 0xab 0 1M"]).await.unwrap();
    assert_eq!(first_bytes(&path, 4), [0xab; 4]);
    let refused = b.io(&["read 0 4k"]).await.unwrap_err();
    assert!(refused.contains("can't open"), "{refused}");

    // Add B, then drop A.
    exp.export(&spec("vol-1", &path, &[HOST_A, HOST_B], None))
        .await
        .unwrap();
    b.io(&["read -P 0xab 0 1M"]).await.unwrap();
    exp.export(&spec("vol-1", &path, &[HOST_B], None))
        .await
        .unwrap();
    a.io(&["read 0 4k"]).await.unwrap_err();
    b.io(&["read -P 0xab 0 1M"]).await.unwrap();

    let live = exp.list().await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].target_iqn, s.target_iqn.as_str());
    assert_eq!(live[0].backing_path.as_deref(), Some(path.as_path()));
    assert_eq!(live[0].initiators, vec![HOST_B.to_string()]);
    assert_eq!(live[0].chap_user, None);
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn chap_logins_need_the_current_secret_which_never_reaches_argv() {
    const PORT: u16 = 21102;
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(PORT, dir.path());
    let (exp, rec) = exporter(PORT, "aio");
    let (s1, s2, s3) = ("Fir5tSecretPw0", "Sec0ndSecretPw", "Th1rdSecretPw0");
    let (f1, f2, f3) = (
        secret_file(dir.path(), "s1", s1),
        secret_file(dir.path(), "s2", s2),
        secret_file(dir.path(), "s3", s3),
    );
    let bad = secret_file(dir.path(), "bad", "NotTheSecret00");

    let path = volume(dir.path(), "vol-c", 16 * MIB);
    let chap1 = Chap::new("alice", s1).unwrap();
    let s = spec("vol-c", &path, &[HOST_A], Some(&chap1));
    exp.export(&s).await.unwrap();
    let plain = Login {
        port: PORT,
        target: &s.target_iqn,
        initiator: HOST_A,
        chap: None,
    };
    plain.io(&["read 0 4k"]).await.unwrap_err();
    plain.with_chap(&bad).io(&["read 0 4k"]).await.unwrap_err();
    plain
        .with_chap(&f1)
        .io(&["write -P 0x5a 0 64k"])
        .await
        .unwrap();
    assert_eq!(
        exp.list().await.unwrap()[0].chap_user.as_deref(),
        Some("alice")
    );

    // Re-export with a new secret: the old one stops working.
    let chap2 = Chap::new("alice", s2).unwrap();
    exp.export(&spec("vol-c", &path, &[HOST_A], Some(&chap2)))
        .await
        .unwrap();
    plain.with_chap(&f1).io(&["read 0 4k"]).await.unwrap_err();
    plain
        .with_chap(&f2)
        .io(&["read -P 0x5a 0 64k"])
        .await
        .unwrap();

    // A second target sharing the user re-keys both.
    let path2 = volume(dir.path(), "vol-d", 16 * MIB);
    let chap3 = Chap::new("alice", s3).unwrap();
    let s_d = spec("vol-d", &path2, &[HOST_A], Some(&chap3));
    exp.export(&s_d).await.unwrap();
    plain.with_chap(&f2).io(&["read 0 4k"]).await.unwrap_err();
    plain
        .with_chap(&f3)
        .io(&["read -P 0x5a 0 64k"])
        .await
        .unwrap();
    Login {
        port: PORT,
        target: &s_d.target_iqn,
        initiator: HOST_A,
        chap: Some(("alice", &f3)),
    }
    .io(&["read 0 4k"])
    .await
    .unwrap();
    // Both targets kept their ACL through the re-key.
    for l in exp.list().await.unwrap() {
        assert_eq!(l.initiators, vec![HOST_A.to_string()], "{l:?}");
        assert_eq!(l.chap_user.as_deref(), Some("alice"));
    }

    // Dropping CHAP on both: plain logins work, the account is gone.
    exp.export(&spec("vol-c", &path, &[HOST_A], None))
        .await
        .unwrap();
    plain.io(&["read -P 0x5a 0 64k"]).await.unwrap();
    assert!(tgtadm(PORT, &["--mode", "account", "--op", "show"]).contains("alice"));
    exp.unexport(&s_d.target_iqn).await.unwrap();
    assert!(!tgtadm(PORT, &["--mode", "account", "--op", "show"]).contains("alice"));

    let lines = rec.lines();
    assert!(lines.iter().any(|l| l.contains("--mode account --op bind")));
    for secret in [s1, s2, s3] {
        assert!(!lines.iter().any(|l| l.contains(secret)), "secret in argv");
        assert!(!tgtd.log_text().contains(secret), "secret in tgtd's log");
    }
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn mutual_chap_binds_the_targets_outgoing_account_until_unexport() {
    const PORT: u16 = 21109;
    let dir = tempfile::tempdir().unwrap();
    let tgtd = Tgtd::start(PORT, dir.path());
    let (exp, rec) = exporter(PORT, "aio");
    let (s_in, s_out, s_out2) = ("Initiat0rSecret1", "Targ3tSecretOne1", "Targ3tSecretTwo2");
    let f_in = secret_file(dir.path(), "in", s_in);
    let path = volume(dir.path(), "vol-m", 16 * MIB);
    let mutual = |target_secret: &str| {
        Chap::new("alice", s_in)
            .unwrap()
            .with_mutual(Chap::new("tgt-vol-m", target_secret).unwrap())
            .unwrap()
    };
    let s = spec("vol-m", &path, &[HOST_A], Some(&mutual(s_out)));
    exp.export(&s).await.unwrap();

    // Read back through the exporter's own `--op show` parsing, and raw.
    let live = exp.list().await.unwrap();
    assert_eq!(live[0].chap_user.as_deref(), Some("alice"));
    assert_eq!(live[0].chap_target_user.as_deref(), Some("tgt-vol-m"));
    assert!(pdisk::export::matches_spec(&live[0], &s), "{live:?}");
    let show = tgtadm(PORT, &["--mode", "target", "--op", "show"]);
    assert!(show.contains("tgt-vol-m (outgoing)"), "{show}");

    // QEMU's libiscsi never asks the target to prove itself, so its
    // one-way login still works against a target that could.
    Login {
        port: PORT,
        target: &s.target_iqn,
        initiator: HOST_A,
        chap: Some(("alice", &f_in)),
    }
    .io(&["write -P 0x3c 0 4k"])
    .await
    .unwrap();

    // Re-keying the target's side keeps exactly one outgoing account.
    exp.export(&spec("vol-m", &path, &[HOST_A], Some(&mutual(s_out2))))
        .await
        .unwrap();
    let live = exp.list().await.unwrap();
    assert_eq!(live[0].chap_target_user.as_deref(), Some("tgt-vol-m"));

    // Unexport: the target and both accounts are gone.
    exp.unexport(&s.target_iqn).await.unwrap();
    assert!(exp.list().await.unwrap().is_empty());
    let accounts = tgtadm(PORT, &["--mode", "account", "--op", "show"]);
    assert!(
        !accounts.contains("tgt-vol-m") && !accounts.contains("alice"),
        "{accounts}"
    );

    let lines = rec.lines();
    assert!(lines
        .iter()
        .any(|l| l.contains("--mode account --op bind") && l.ends_with("--outgoing")));
    for secret in [s_in, s_out, s_out2] {
        assert!(!lines.iter().any(|l| l.contains(secret)), "secret in argv");
        assert!(!tgtd.log_text().contains(secret), "secret in tgtd's log");
    }
}

impl<'a> Login<'a> {
    /// The same login as CHAP user alice with the secret in `file`.
    fn with_chap(&self, file: &'a Path) -> Login<'a> {
        Login {
            chap: Some(("alice", file)),
            ..*self
        }
    }
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn unexport_cuts_off_initiators_even_logged_in_ones() {
    const PORT: u16 = 21103;
    let dir = tempfile::tempdir().unwrap();
    let _tgtd = Tgtd::start(PORT, dir.path());
    let (exp, _) = exporter(PORT, "aio");
    let path = volume(dir.path(), "vol-u", 16 * MIB);
    let chap = Chap::new("ursula", "UnexportSecret").unwrap();
    let sf = secret_file(dir.path(), "s", "UnexportSecret");
    let s = spec("vol-u", &path, &[HOST_A], Some(&chap));
    exp.export(&s).await.unwrap();
    let login = Login {
        port: PORT,
        target: &s.target_iqn,
        initiator: HOST_A,
        chap: Some(("ursula", &sf)),
    };
    login.io(&["write -P 0x11 0 64k"]).await.unwrap();

    let session = login.session().await;
    exp.unexport(&s.target_iqn).await.unwrap();
    // The target and the session are gone from tgtd; QEMU's initiator
    // keeps trying to reconnect, and reads nothing meanwhile.
    assert_eq!(tgtadm(PORT, &["--mode", "target", "--op", "show"]), "");
    let out = session
        .finish_within(&["read 0 4k", "quit"], Duration::from_secs(3))
        .await;
    assert!(
        out.as_ref().is_none_or(|o| !o.contains("read 4096/4096")),
        "{out:?}"
    );
    let refused = login.io(&["read 0 4k"]).await.unwrap_err();
    assert!(refused.contains("can't open"), "{refused}");

    exp.unexport(&s.target_iqn).await.unwrap(); // missing: Ok
    assert!(exp.list().await.unwrap().is_empty());
    assert!(!tgtadm(PORT, &["--mode", "account", "--op", "show"]).contains("ursula"));
    assert_eq!(first_bytes(&path, 2), [0x11; 2]); // data untouched
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn restore_recreates_exports_after_tgtd_restart() {
    const PORT: u16 = 21104;
    let dir = tempfile::tempdir().unwrap();
    let mut tgtd = Tgtd::start(PORT, dir.path());
    let (exp, _) = exporter(PORT, "aio");
    let chap = Chap::new("rita", "RestoreSecret0").unwrap();
    let sf = secret_file(dir.path(), "s", "RestoreSecret0");
    let (p1, p2) = (
        volume(dir.path(), "vol-r1", 16 * MIB),
        volume(dir.path(), "vol-r2", 16 * MIB),
    );
    let specs = vec![
        spec("vol-r1", &p1, &[HOST_A], Some(&chap)),
        spec("vol-r2", &p2, &[HOST_A, HOST_B], None),
    ];
    for s in &specs {
        exp.export(s).await.unwrap();
    }
    let l1 = Login {
        port: PORT,
        target: &specs[0].target_iqn,
        initiator: HOST_A,
        chap: Some(("rita", &sf)),
    };
    let l2 = Login {
        port: PORT,
        target: &specs[1].target_iqn,
        initiator: HOST_B,
        chap: None,
    };
    l1.io(&["write -P 0x21 0 1M"]).await.unwrap();
    l2.io(&["write -P 0x22 0 1M"]).await.unwrap();

    tgtd.stop();
    let err = exp.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("tgtd"), "{err}");
    let err = exp.export(&specs[0]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    let _tgtd = Tgtd::start(PORT, dir.path());
    assert!(exp.list().await.unwrap().is_empty());
    let report = exp.restore(&specs).await.unwrap();
    assert_eq!(report.restored.len(), 2, "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    l1.io(&["read -P 0x21 0 1M"]).await.unwrap();
    l2.io(&["read -P 0x22 0 1M"]).await.unwrap();
    let report = exp.restore(&specs).await.unwrap();
    assert_eq!(report.unchanged.len(), 2, "{report:?}");
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn refresh_size_shows_a_grown_volume() {
    const PORT: u16 = 21105;
    let dir = tempfile::tempdir().unwrap();
    let _tgtd = Tgtd::start(PORT, dir.path());
    let (exp, _) = exporter(PORT, "aio");
    let path = volume(dir.path(), "vol-g", 64 * MIB);
    let s = spec("vol-g", &path, &[HOST_A], None);
    exp.export(&s).await.unwrap();
    let login = Login {
        port: PORT,
        target: &s.target_iqn,
        initiator: HOST_A,
        chap: None,
    };
    assert_eq!(login.length().await, "64 MiB");
    login.io(&["write -P 0xab 0 1M"]).await.unwrap();

    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(128 * MIB)
        .unwrap();
    assert_eq!(login.length().await, "64 MiB"); // tgt doesn't notice by itself

    // A logged-in initiator survives the refresh.
    let session = login.session().await;
    exp.refresh_size(&s).await.unwrap();
    let out = session.finish(&["read -P 0xab 0 1M", "quit"]).await;
    assert!(out.contains("read 1048576/1048576"), "{out}");
    assert!(!out.contains("failed"), "{out}");

    assert_eq!(login.length().await, "128 MiB");
    login
        .io(&[
            "read -P 0xab 0 1M",
            "write -P 0xcd 100M 1M",
            "read -P 0xcd 100M 1M",
        ])
        .await
        .unwrap();
    let cap = tokio::process::Command::new("iscsi-readcapacity16")
        .args(["-s", "-i", HOST_A])
        .arg(format!("iscsi://127.0.0.1:{PORT}/{}/1", s.target_iqn))
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&cap.stdout).trim(),
        (128 * MIB).to_string()
    );
    assert_eq!(
        exp.list().await.unwrap()[0].initiators,
        vec![HOST_A.to_string()]
    );
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn thin_provisioning_only_with_rdwr() {
    const PORT: u16 = 21107;
    let dir = tempfile::tempdir().unwrap();
    let _tgtd = Tgtd::start(PORT, dir.path());
    let blocks = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks()
    };
    let readcap = |target: &Iqn| {
        let out = std::process::Command::new("iscsi-readcapacity16")
            .args(["-i", HOST_A])
            .arg(format!("iscsi://127.0.0.1:{PORT}/{target}/1"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // rdwr: UNMAP punches holes in the backing file.
    let (rdwr, _) = exporter(PORT, "rdwr");
    let path = volume(dir.path(), "vol-t", 16 * MIB);
    let s = spec("vol-t", &path, &[HOST_A], None);
    rdwr.export(&s).await.unwrap();
    assert!(readcap(&s.target_iqn).contains("LBPME:1"));
    let login = Login {
        port: PORT,
        target: &s.target_iqn,
        initiator: HOST_A,
        chap: None,
    };
    login.io(&["write -P 0xab 0 4M"]).await.unwrap();
    let full = blocks(&path);
    assert!(full >= 4 * MIB / 512, "{full}");
    login.io(&["discard 0 4M", "read -P 0 0 4M"]).await.unwrap();
    assert!(blocks(&path) < full / 4, "{} of {full}", blocks(&path));

    // aio: no thin provisioning advertised (tgt's aio store ignores UNMAP).
    let (aio, _) = exporter(PORT, "aio");
    let path = volume(dir.path(), "vol-k", 16 * MIB);
    let s = spec("vol-k", &path, &[HOST_A], None);
    aio.export(&s).await.unwrap();
    assert!(readcap(&s.target_iqn).contains("LBPME:0"));
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn concurrent_exports_get_distinct_tids() {
    const PORT: u16 = 21108;
    let dir = tempfile::tempdir().unwrap();
    let _tgtd = Tgtd::start(PORT, dir.path());
    let (exp, _) = exporter(PORT, "aio");
    let specs: Vec<ExportSpec> = (0..6)
        .map(|i| {
            let name = format!("vol-{i}");
            spec(&name, &volume(dir.path(), &name, 8 * MIB), &[HOST_A], None)
        })
        .collect();
    let results = futures::future::join_all(specs.iter().map(|s| exp.export(s))).await;
    for r in results {
        r.unwrap();
    }
    let show = tgtadm(PORT, &["--mode", "target", "--op", "show"]);
    let mut tids: Vec<&str> = show
        .lines()
        .filter_map(|l| l.strip_prefix("Target "))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    tids.sort_unstable();
    assert_eq!(tids, ["1", "2", "3", "4", "5", "6"]);
    assert_eq!(exp.list().await.unwrap().len(), 6);
    for s in &specs {
        Login {
            port: PORT,
            target: &s.target_iqn,
            initiator: HOST_A,
            chap: None,
        }
        .io(&["read 0 4k"])
        .await
        .unwrap();
    }
}

/// No root needed: nothing listens on this control port.
#[tokio::test]
async fn tgtd_down_is_unavailable() {
    const PORT: u16 = 21106;
    let (exp, _) = exporter(PORT, "aio");
    let err = exp.check().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains("tgtd (control port 21106)"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = volume(dir.path(), "vol-x", MIB);
    let chap = Chap::new("xavier", "DownSecret0000").unwrap();
    let err = exp
        .export(&spec("vol-x", &path, &[HOST_A], Some(&chap)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(!err.message().contains("DownSecret"), "{err}");
    assert_eq!(exp.list().await.unwrap_err().kind(), ErrorKind::Unavailable);
}

#[tokio::test]
#[ignore = "needs root and tgtd: run by scripts/test"]
async fn targets_offer_the_configured_params_and_libiscsi_negotiates_them() {
    const PORT: u16 = 21110;
    let dir = tempfile::tempdir().unwrap();
    let _tgtd = Tgtd::start(PORT, dir.path());
    let (plain, _) = exporter(PORT, "rdwr");
    let cfg = TgtConfig {
        params: IscsiParams::measured_default(),
        ..plain.config().clone()
    };
    let exp = TgtExporter::new(Arc::new(RecordingRunner::default()), cfg);
    let path = volume(dir.path(), "vol-1", 64 * MIB);
    let s = spec("vol-1", &path, &[HOST_A], None);
    exp.export(&s).await.unwrap();

    let show = tgtadm(PORT, &["--mode", "target", "--op", "show", "--tid", "1"]);
    for kv in [
        "MaxRecvDataSegmentLength=262144",
        "MaxXmitDataSegmentLength=262144",
        "FirstBurstLength=262144",
        "MaxBurstLength=262144",
        "InitialR2T=No",
        "ImmediateData=Yes",
    ] {
        assert!(show.lines().any(|l| l.trim() == kv), "{kv} not in {show}");
    }

    // What QEMU's initiator (libiscsi) agrees to at login, from its log;
    // then data written through the session reads back from the file.
    let out = tokio::process::Command::new("qemu-io")
        .env("LIBISCSI_DEBUG", "9")
        .args(["-c", "write -P 0x3c 0 1M", "-c", "read -P 0x3c 0 1M"])
        .args(
            Login {
                port: PORT,
                target: &s.target_iqn,
                initiator: HOST_A,
                chap: None,
            }
            .args(),
        )
        .output()
        .await
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !log.contains("Pattern verification failed"),
        "{log}"
    );
    for kv in [
        "InitialR2T=No",
        "ImmediateData=Yes",
        "FirstBurstLength=262144",
        "MaxBurstLength=262144",
    ] {
        assert!(
            log.contains(&format!("TargetLoginReply: {kv} ")),
            "{kv} not negotiated: {log}"
        );
    }
    assert_eq!(first_bytes(&path, 4), [0x3c; 4]);
}
