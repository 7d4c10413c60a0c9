//! Unit tests of the kernel initiator: a fake runner plays iscsiadm, a temp
//! directory plays /sys, /dev and /etc/iscsi, and a thread plays the kernel's
//! SCSI scan and udev (it turns a "- - LUN" written to a host's `scan` into a
//! disk and its by-path link, and a "1" written to `delete` into its removal).

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stratus_core::runner::{FakeRunner, Output};

use super::*;
use crate::attach::AttachMode;
use uuid::Uuid;

const TARGET: &str = "iqn.2026-11.io.stratus.pdisk:vol-1";
const INITIATOR: &str = "iqn.2026-11.io.stratus.agent:host1";
const USER: &str = "st0123456789ab";
const SECRET: &str = "Zq7secretXw9K2m4";

fn lun(n: u32) -> IscsiLun {
    IscsiLun::new("127.0.0.1:3260".parse().unwrap(), TARGET, n).unwrap()
}

fn chap() -> Chap {
    Chap::new(USER, SECRET).unwrap()
}

fn holder(n: u8) -> Holder {
    Holder::disk(Uuid::from_bytes([n; 16]), "vda")
}

#[derive(Debug)]
struct FakeSession {
    sid: u32,
    host: u32,
    target: String,
    portal: SocketAddr,
    iface: String,
}

#[derive(Debug, Default)]
struct State {
    next_sid: u32,
    sessions: Vec<FakeSession>,
    /// (host, lun, sdX)
    disks: Vec<(u32, u32, String)>,
    next_disk: u8,
    /// Whether "udev" makes by-path links.
    no_udev: bool,
    /// Exit status of the next logins (0: they succeed).
    login_status: i32,
    /// How many record updates fail next as if another iscsiadm deleted a
    /// record under them (status 6).
    idbm_busy: usize,
    logins: usize,
}

/// /sys, /dev and /etc/iscsi in a temp dir, iscsiadm in a fake runner.
struct FakeHost {
    root: tempfile::TempDir,
    state: Arc<Mutex<State>>,
    runner: FakeRunner,
    stop: Arc<AtomicBool>,
    kernel: Option<std::thread::JoinHandle<()>>,
}

impl FakeHost {
    fn new() -> FakeHost {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_owned();
        for d in [
            "sys/class/iscsi_session",
            "sys/class/iscsi_connection",
            "sys/class/scsi_host",
            "sys/block",
            "dev/disk/by-path",
            "etc/iscsi/nodes",
            "etc/iscsi/ifaces",
        ] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let state = Arc::new(Mutex::new(State {
            next_sid: 1,
            next_disk: b'b',
            ..State::default()
        }));
        let (st, rr) = (state.clone(), r.clone());
        let runner = FakeRunner::with(move |argv| Ok(iscsiadm(&rr, &st, argv)));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, rr, stp) = (state.clone(), r.clone(), stop.clone());
        let kernel = std::thread::spawn(move || {
            while !stp.load(Ordering::Relaxed) {
                kernel_step(&rr, &st);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        FakeHost {
            root,
            state,
            runner,
            stop,
            kernel: Some(kernel),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    fn options(&self) -> KernelOptions {
        KernelOptions {
            sys: self.path("sys"),
            dev: self.path("dev"),
            iscsi_db: self.path("etc/iscsi"),
            device_timeout: Duration::from_secs(10),
            ..KernelOptions::new(INITIATOR)
        }
    }

    fn attacher(&self) -> KernelAttacher {
        self.attacher_with(self.options())
    }

    fn attacher_with(&self, opts: KernelOptions) -> KernelAttacher {
        KernelAttacher::new(Arc::new(self.runner.clone()), opts)
    }

    fn record(&self) -> PathBuf {
        self.path(&format!("etc/iscsi/nodes/{TARGET}/127.0.0.1,3260"))
    }

    fn sessions(&self) -> usize {
        self.state.lock().unwrap().sessions.len()
    }

    fn logins(&self) -> usize {
        self.state.lock().unwrap().logins
    }

    fn disks(&self) -> Vec<(u32, u32, String)> {
        self.state.lock().unwrap().disks.clone()
    }

    /// Waits for the fake kernel to act on a delete.
    fn wait_disks(&self, want: &[(u32, u32, &str)]) {
        let want: Vec<(u32, u32, String)> = want
            .iter()
            .map(|(h, l, n)| (*h, *l, n.to_string()))
            .collect();
        let start = std::time::Instant::now();
        while self.disks() != want {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "disks {:?}, want {want:?}",
                self.disks()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The kernel drops the session on its own (target gone, admin logout).
    fn drop_sessions(&self) {
        let mut s = self.state.lock().unwrap();
        let sids: Vec<u32> = s.sessions.iter().map(|x| x.sid).collect();
        for sid in sids {
            remove_session(self.root.path(), &mut s, sid);
        }
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(k) = self.kernel.take() {
            let _ = k.join();
        }
    }
}

/// iscsiadm, as far as the attacher uses it.
fn iscsiadm(root: &Path, state: &Mutex<State>, argv: &[String]) -> Output {
    let a: Vec<&str> = argv.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["iscsiadm", "-m", "iface", "-I", iface, rest @ ..] => {
            let record = root.join("etc/iscsi/ifaces").join(iface);
            let s = state.lock().unwrap();
            match rest {
                // Like iface_conf_write: refused while a session uses it,
                // else written afresh with defaults.
                ["-o", "new"] => {
                    if s.sessions.iter().any(|x| x.iface == *iface) {
                        return Output::failed(
                            15,
                            format!("iscsiadm: Could not create new interface {iface}."),
                        );
                    }
                    std::fs::write(
                        &record,
                        format!(
                            "# BEGIN RECORD 2.1.8\niface.iscsi_ifacename = {iface}\n\
                             iface.transport_name = tcp\n# END RECORD\n"
                        ),
                    )
                    .unwrap();
                    Output::ok(format!("New interface {iface} added"))
                }
                ["-o", "update", "-n", name, "-v", value] => {
                    let Ok(text) = std::fs::read_to_string(&record) else {
                        return Output::failed(
                            7,
                            format!("iscsiadm: Could not update iface {iface}"),
                        );
                    };
                    let kept: Vec<&str> = text
                        .lines()
                        .filter(|l| !l.starts_with(&format!("{name} =")))
                        .filter(|l| *l != "# END RECORD")
                        .collect();
                    let text = format!("{}\n{name} = {value}\n# END RECORD\n", kept.join("\n"));
                    std::fs::write(&record, text).unwrap();
                    Output::ok(format!("{iface} updated."))
                }
                _ => Output::failed(7, format!("fake iscsiadm: unexpected {a:?}")),
            }
        }
        ["iscsiadm", "-m", "node", "-T", target, "-p", portal, "-I", iface, rest @ ..] => {
            let portal: SocketAddr = portal.parse().unwrap();
            let record = root.join(format!(
                "etc/iscsi/nodes/{target}/{},{}",
                portal.ip(),
                portal.port()
            ));
            let mut s = state.lock().unwrap();
            match rest {
                ["-o", "new"] => {
                    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
                    std::fs::write(
                        &record,
                        format!(
                            "# BEGIN RECORD 2.1.8\nnode.name = {target}\nnode.tpgt = -1\n\
                             node.startup = automatic\niface.iscsi_ifacename = {iface}\n\
                             node.session.scan = auto\nnode.session.auth.authmethod = None\n\
                             node.conn[0].address = {}\nnode.conn[0].port = {}\n# END RECORD\n",
                            portal.ip(),
                            portal.port()
                        ),
                    )
                    .unwrap();
                    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o644))
                        .unwrap();
                    Output::ok("New iSCSI node added")
                }
                ["-o", "update", ..] if s.idbm_busy > 0 => {
                    s.idbm_busy -= 1;
                    Output::failed(
                        6,
                        "iscsiadm: Could not execute operation on all records: \
                         encountered iSCSI database failure",
                    )
                }
                ["-o", "update", pairs @ ..] => {
                    let Ok(mut text) = std::fs::read_to_string(&record) else {
                        return Output::failed(21, "iscsiadm: No records found");
                    };
                    for nv in pairs.chunks(4) {
                        let [_, name, _, value] = nv else {
                            return Output::failed(7, "bad pairs");
                        };
                        let line = format!("{name} = {value}");
                        let kept: Vec<&str> = text
                            .lines()
                            .filter(|l| !l.starts_with(&format!("{name} =")))
                            .filter(|l| *l != "# END RECORD")
                            .collect();
                        text = format!("{}\n{line}\n# END RECORD\n", kept.join("\n"));
                    }
                    // Like idbm_rec_write: fopen("w") keeps the file's mode.
                    std::fs::write(&record, text).unwrap();
                    Output::ok("")
                }
                ["--login"] => {
                    if s.login_status != 0 {
                        return Output::failed(
                            s.login_status,
                            "iscsiadm: Could not login to [iface: stratus]: authorization failure",
                        );
                    }
                    if s.sessions
                        .iter()
                        .any(|x| x.target == *target && x.portal == portal)
                    {
                        return Output::failed(15, "iscsiadm: session exists");
                    }
                    let sid = s.next_sid;
                    s.next_sid += 1;
                    let host = 10 + sid;
                    let dev = root.join(format!(
                        "sys/devices/platform/host{host}/session{sid}/iscsi_session/session{sid}"
                    ));
                    std::fs::create_dir_all(&dev).unwrap();
                    std::fs::write(dev.join("targetname"), format!("{target}\n")).unwrap();
                    std::fs::write(dev.join("ifacename"), format!("{iface}\n")).unwrap();
                    std::os::unix::fs::symlink(
                        &dev,
                        root.join(format!("sys/class/iscsi_session/session{sid}")),
                    )
                    .unwrap();
                    let conn = root.join(format!("sys/class/iscsi_connection/connection{sid}:0"));
                    std::fs::create_dir_all(&conn).unwrap();
                    std::fs::write(
                        conn.join("persistent_address"),
                        format!("{}\n", portal.ip()),
                    )
                    .unwrap();
                    std::fs::write(conn.join("persistent_port"), format!("{}\n", portal.port()))
                        .unwrap();
                    let sh = root.join(format!("sys/class/scsi_host/host{host}"));
                    std::fs::create_dir_all(&sh).unwrap();
                    std::fs::write(sh.join("scan"), "").unwrap();
                    s.sessions.push(FakeSession {
                        sid,
                        host,
                        target: target.to_string(),
                        portal,
                        iface: iface.to_string(),
                    });
                    s.logins += 1;
                    Output::ok("Login to [...] successful.")
                }
                ["--logout"] => {
                    let found: Vec<u32> = s
                        .sessions
                        .iter()
                        .filter(|x| x.target == *target && x.portal == portal)
                        .map(|x| x.sid)
                        .collect();
                    if found.is_empty() {
                        return Output::failed(21, "iscsiadm: No matching sessions found");
                    }
                    for sid in found {
                        remove_session(root, &mut s, sid);
                    }
                    Output::ok("Logout of [...] successful.")
                }
                ["-o", "delete"] => {
                    if std::fs::remove_file(&record).is_err() {
                        return Output::failed(21, "iscsiadm: No records found");
                    }
                    Output::ok("")
                }
                _ => Output::failed(7, format!("fake iscsiadm: unexpected {a:?}")),
            }
        }
        ["blockdev", "--flushbufs", _] => Output::ok(""),
        _ => Output::failed(127, format!("fake runner: unexpected {a:?}")),
    }
}

fn remove_disk(root: &Path, s: &mut State, name: &str) {
    let _ = std::fs::remove_dir_all(root.join("sys/block").join(name));
    let _ = std::fs::remove_file(root.join("dev").join(name));
    if let Ok(links) = std::fs::read_dir(root.join("dev/disk/by-path")) {
        for l in links.flatten() {
            let to = std::fs::read_link(l.path()).unwrap();
            if to.file_name().unwrap() == name {
                std::fs::remove_file(l.path()).unwrap();
            }
        }
    }
    s.disks.retain(|d| d.2 != name);
}

fn remove_session(root: &Path, s: &mut State, sid: u32) {
    let host = 10 + sid;
    let names: Vec<String> = s
        .disks
        .iter()
        .filter(|d| d.0 == host)
        .map(|d| d.2.clone())
        .collect();
    for n in names {
        remove_disk(root, s, &n);
    }
    let _ = std::fs::remove_file(root.join(format!("sys/class/iscsi_session/session{sid}")));
    let _ =
        std::fs::remove_dir_all(root.join(format!("sys/class/iscsi_connection/connection{sid}:0")));
    let _ = std::fs::remove_dir_all(root.join(format!("sys/class/scsi_host/host{host}")));
    let _ = std::fs::remove_dir_all(root.join(format!("sys/devices/platform/host{host}")));
    s.sessions.retain(|x| x.sid != sid);
}

/// The kernel's scan and delete, and udev's by-path links.
fn kernel_step(root: &Path, state: &Mutex<State>) {
    let mut s = state.lock().unwrap();
    let sessions: Vec<(u32, String, SocketAddr)> = s
        .sessions
        .iter()
        .map(|x| (x.host, x.target.clone(), x.portal))
        .collect();
    for (host, target, portal) in sessions {
        let scan = root.join(format!("sys/class/scsi_host/host{host}/scan"));
        let Ok(text) = std::fs::read_to_string(&scan) else {
            continue;
        };
        if text.is_empty() {
            continue;
        }
        std::fs::write(&scan, "").unwrap();
        let lun: u32 = text
            .strip_prefix("- - ")
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("scan wrote {text:?}"));
        if s.disks.iter().any(|d| d.0 == host && d.1 == lun) {
            continue;
        }
        let name = format!("sd{}", s.next_disk as char);
        s.next_disk += 1;
        let sdev = root.join(format!("sys/devices/platform/host{host}/{host}:0:0:{lun}"));
        std::fs::create_dir_all(&sdev).unwrap();
        std::fs::write(sdev.join("delete"), "").unwrap();
        let blk = root.join("sys/block").join(&name);
        std::fs::create_dir_all(&blk).unwrap();
        std::os::unix::fs::symlink(&sdev, blk.join("device")).unwrap();
        std::fs::write(root.join("dev").join(&name), "").unwrap();
        if !s.no_udev {
            std::os::unix::fs::symlink(
                root.join("dev").join(&name),
                root.join(format!(
                    "dev/disk/by-path/ip-{}:{}-iscsi-{target}-lun-{lun}",
                    portal.ip(),
                    portal.port()
                )),
            )
            .unwrap();
        }
        s.disks.push((host, lun, name));
    }
    let names: Vec<String> = s.disks.iter().map(|d| d.2.clone()).collect();
    for name in names {
        let delete = root.join("sys/block").join(&name).join("device/delete");
        if std::fs::read_to_string(&delete).is_ok_and(|t| t == "1") {
            let target =
                std::fs::read_link(root.join("sys/block").join(&name).join("device")).unwrap();
            std::fs::write(&delete, "").unwrap();
            let _ = std::fs::remove_dir_all(target);
            remove_disk(root, &mut s, &name);
        }
    }
}

fn node(rest: &str) -> String {
    format!("iscsiadm -m node -T {TARGET} -p 127.0.0.1:3260 -I stratus {rest}")
}

fn login_sequence(auth: &str) -> Vec<String> {
    vec![
        "iscsiadm -m iface -I stratus -o new".to_string(),
        format!("iscsiadm -m iface -I stratus -o update -n iface.initiatorname -v {INITIATOR}"),
        node("-o new"),
        node(&format!(
            "-o update -n node.startup -v manual -n node.session.scan -v manual \
             -n node.session.auth.authmethod -v {auth}"
        )),
        node("--login"),
    ]
}

/// Log lines of everything the attacher logs (any level) while `f` runs.
async fn capture_logs<F: std::future::Future>(f: F) -> (F::Output, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let b2 = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || b2.clone())
        .finish();
    let _g = tracing::subscriber::set_default(sub);
    // Other tests' threads (no subscriber) may have cached a callsite's
    // interest as "never" while this one was being set up.
    tracing::callsite::rebuild_interest_cache();
    let out = f.await;
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[tokio::test]
async fn attach_logs_in_scans_one_lun_and_keeps_the_secret_out_of_argv_and_logs() {
    let host = FakeHost::new();
    let k = host.attacher();
    let (got, logs) = capture_logs(async {
        let a = k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
        k.detach(&holder(1), &lun(1)).await.unwrap();
        a
    })
    .await;
    let mut want = login_sequence("CHAP");
    want[3].push_str(&format!(" -n node.session.auth.username -v {USER}"));
    want.push(format!(
        "blockdev --flushbufs {}",
        host.path("dev/sdb").display()
    ));
    want.push(node("--logout"));
    want.push(node("-o delete"));
    assert_eq!(host.runner.command_lines(), want);
    assert_eq!(
        got.device,
        std::fs::canonicalize(host.path("dev")).unwrap().join("sdb")
    );
    assert_eq!(
        got.by_path,
        host.path(&format!(
            "dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{TARGET}-lun-1"
        ))
    );
    for argv in host.runner.calls() {
        assert!(!argv.iter().any(|a| a.contains(SECRET)), "{argv:?}");
    }
    assert!(logs.contains("kernel iSCSI attach"), "{logs}");
    assert!(!logs.contains(SECRET), "{logs}");
    // Logged out and the record (with the secret) deleted.
    assert_eq!(host.sessions(), 0);
    assert!(!host.record().exists());
    host.wait_disks(&[]);
}

#[tokio::test]
async fn the_password_is_written_into_the_record_0600_before_login() {
    let host = FakeHost::new();
    let k = host.attacher();
    k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    let rec = host.record();
    let text = std::fs::read_to_string(&rec).unwrap();
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&"# BEGIN RECORD 2.1.8"));
    assert_eq!(lines.last(), Some(&"# END RECORD"));
    assert_eq!(
        lines[lines.len() - 2],
        format!("node.session.auth.password = {SECRET}")
    );
    // iscsiadm's own changes are kept.
    assert!(lines.contains(&"node.session.scan = manual"), "{text}");
    assert!(lines.contains(&"node.startup = manual"), "{text}");
    assert!(
        lines.contains(&"node.session.auth.authmethod = CHAP"),
        "{text}"
    );
    assert!(
        lines.contains(&format!("node.session.auth.username = {USER}").as_str()),
        "{text}"
    );
    // No scratch file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(host.path("etc/iscsi"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(SCRATCH_PREFIX))
        .collect();
    assert!(leftovers.is_empty());
    // A password line already there is replaced, not repeated.
    write_secrets(
        &rec,
        &[(PASSWORD_KEY, "Another0secret99")],
        &host.path("etc/iscsi"),
    )
    .unwrap();
    let text = std::fs::read_to_string(&rec).unwrap();
    assert_eq!(text.matches(PASSWORD_KEY).count(), 1, "{text}");
    assert!(text.contains("node.session.auth.password = Another0secret99\n# END RECORD\n"));
}

const TARGET_USER: &str = "stt-0b9c6f52-5a1e-4d8e-9a57-2f0e3c1d4b6a";
const TARGET_SECRET: &str = "Tg7targetSecret55";

fn mutual_chap() -> Chap {
    chap()
        .with_mutual(Chap::new(TARGET_USER, TARGET_SECRET).unwrap())
        .unwrap()
}

#[tokio::test]
async fn mutual_chap_names_the_target_user_in_argv_and_both_secrets_only_in_the_record() {
    let host = FakeHost::new();
    let k = host.attacher();
    let (_, logs) = capture_logs(async {
        k.attach(&holder(1), &lun(1), Some(&mutual_chap()))
            .await
            .unwrap()
    })
    .await;
    let mut want = login_sequence("CHAP");
    want[3].push_str(&format!(
        " -n node.session.auth.username -v {USER} -n node.session.auth.username_in -v {TARGET_USER}"
    ));
    assert_eq!(host.runner.command_lines(), want);
    for argv in host.runner.calls() {
        assert!(
            !argv
                .iter()
                .any(|a| a.contains(SECRET) || a.contains(TARGET_SECRET)),
            "{argv:?}"
        );
    }
    assert!(
        !logs.contains(SECRET) && !logs.contains(TARGET_SECRET),
        "{logs}"
    );
    // Both secrets in the 0600 record, before its end, each under its key;
    // iscsiadm's username_in kept.
    let rec = host.record();
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&rec).unwrap();
    assert!(
        text.ends_with(&format!(
            "node.session.auth.password = {SECRET}\n\
             node.session.auth.password_in = {TARGET_SECRET}\n# END RECORD\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("node.session.auth.username_in = {TARGET_USER}\n")),
        "{text}"
    );
    // Logged out: the record with both secrets goes.
    k.detach(&holder(1), &lun(1)).await.unwrap();
    assert!(!rec.exists());
}

#[test]
fn secret_keys_are_replaced_whole_so_password_keeps_password_in() {
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("record");
    std::fs::write(
        &rec,
        "# BEGIN RECORD 2.1.8\nnode.session.auth.password = Old0secret12345\n\
         node.session.auth.password_in = In0secret1234567\n# END RECORD\n",
    )
    .unwrap();
    write_secrets(&rec, &[(PASSWORD_KEY, "New0secret12345")], dir.path()).unwrap();
    let text = std::fs::read_to_string(&rec).unwrap();
    assert_eq!(
        text,
        "# BEGIN RECORD 2.1.8\nnode.session.auth.password_in = In0secret1234567\n\
         node.session.auth.password = New0secret12345\n# END RECORD\n"
    );
    write_secrets(
        &rec,
        &[
            (PASSWORD_KEY, "New0secret12345"),
            (PASSWORD_IN_KEY, "In1secret7654321"),
        ],
        dir.path(),
    )
    .unwrap();
    let text = std::fs::read_to_string(&rec).unwrap();
    assert_eq!(text.matches("password_in").count(), 1, "{text}");
    assert!(
        text.contains("password_in = In1secret7654321\n# END RECORD\n"),
        "{text}"
    );
}

#[test]
fn only_the_kernel_initiator_takes_mutual_chap() {
    assert!(AttachMode::Kernel.check_mutual_chap().is_ok());
    let e = AttachMode::Qemu.check_mutual_chap().unwrap_err();
    assert_eq!(e.kind(), stratus_core::error::ErrorKind::InvalidArgument);
    assert!(e.message().contains("libiscsi"), "{e}");
}

#[tokio::test]
async fn without_chap_the_authmethod_is_none() {
    let host = FakeHost::new();
    let k = host.attacher();
    k.attach(&holder(1), &lun(1), None).await.unwrap();
    assert_eq!(host.runner.command_lines(), login_sequence("None"));
    assert!(!std::fs::read_to_string(host.record())
        .unwrap()
        .contains(PASSWORD_KEY));
}

#[tokio::test]
async fn the_scan_names_only_the_needed_lun() {
    let host = FakeHost::new();
    let k = host.attacher();
    k.attach(&holder(1), &lun(7), None).await.unwrap();
    assert_eq!(host.disks(), vec![(11, 7, "sdb".to_string())]);
}

#[tokio::test]
async fn sessions_are_shared_and_counted() {
    let host = FakeHost::new();
    let k = host.attacher();
    let a = k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    host.runner.clear();
    let b = k.attach(&holder(2), &lun(2), Some(&chap())).await.unwrap();
    // The second LUN reuses the session: no iscsiadm call at all.
    assert!(host.runner.command_lines().is_empty());
    assert_eq!(host.logins(), 1);
    assert_ne!(a.device, b.device);
    assert_eq!(k.holders(&lun(1)).await, 2);

    k.detach(&holder(1), &lun(1)).await.unwrap();
    assert_eq!(
        host.runner.command_lines(),
        vec![format!(
            "blockdev --flushbufs {}",
            host.path("dev/sdb").display()
        )]
    );
    assert_eq!(host.sessions(), 1, "one holder left: still logged in");
    host.wait_disks(&[(11, 2, "sdc")]);
    assert!(b.by_path.exists());
    assert!(!a.by_path.exists());

    host.runner.clear();
    k.detach(&holder(2), &lun(2)).await.unwrap();
    assert_eq!(
        host.runner.command_lines(),
        vec![
            format!("blockdev --flushbufs {}", host.path("dev/sdc").display()),
            node("--logout"),
            node("-o delete"),
        ]
    );
    assert_eq!(host.sessions(), 0);
    assert_eq!(k.holders(&lun(1)).await, 0);
}

#[tokio::test]
async fn two_guests_on_one_lun_keep_its_device_until_the_last_leaves() {
    let host = FakeHost::new();
    let k = host.attacher();
    let a = k.attach(&holder(1), &lun(1), None).await.unwrap();
    let b = k.attach(&holder(2), &lun(1), None).await.unwrap();
    assert_eq!(a.device, b.device);
    host.runner.clear();
    k.detach(&holder(1), &lun(1)).await.unwrap();
    assert!(host.runner.command_lines().is_empty());
    assert!(a.by_path.exists());
    k.detach(&holder(2), &lun(1)).await.unwrap();
    assert_eq!(host.sessions(), 0);
}

#[tokio::test]
async fn detach_succeeds_when_already_logged_out_and_when_repeated() {
    let host = FakeHost::new();
    let k = host.attacher();
    k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    host.drop_sessions();
    host.runner.clear();
    k.detach(&holder(1), &lun(1)).await.unwrap();
    // No session, so no device to flush; the logout answers 21.
    assert_eq!(
        host.runner.command_lines(),
        vec![node("--logout"), node("-o delete")]
    );
    assert!(!host.record().exists());
    // Again: nothing left at all (no record either).
    k.detach(&holder(1), &lun(1)).await.unwrap();
    // A holder agentd never counted (a start that failed before login).
    k.detach(&holder(9), &lun(3)).await.unwrap();
}

#[tokio::test]
async fn a_missing_by_path_link_is_a_clear_error_and_the_login_is_undone() {
    let host = FakeHost::new();
    host.state.lock().unwrap().no_udev = true;
    let k = host.attacher_with(KernelOptions {
        device_timeout: Duration::from_millis(300),
        ..host.options()
    });
    let err = k
        .attach(&holder(1), &lun(1), Some(&chap()))
        .await
        .unwrap_err();
    let link = host.path(&format!(
        "dev/disk/by-path/ip-127.0.0.1:3260-iscsi-{TARGET}-lun-1"
    ));
    assert_eq!(err.kind(), stratus_core::error::ErrorKind::Unavailable);
    assert!(err.message().contains(&link.display().to_string()), "{err}");
    assert!(err.message().contains("did not appear within"), "{err}");
    let lines = host.runner.command_lines();
    assert_eq!(
        lines[lines.len() - 3..],
        [
            format!("blockdev --flushbufs {}", host.path("dev/sdb").display()),
            node("--logout"),
            node("-o delete"),
        ]
    );
    assert_eq!(host.sessions(), 0);
    host.wait_disks(&[]);
    assert!(!host.record().exists());
    assert_eq!(k.holders(&lun(1)).await, 0);
}

#[tokio::test]
async fn a_failed_login_is_unavailable_and_leaves_no_record() {
    let host = FakeHost::new();
    host.state.lock().unwrap().login_status = 24;
    let k = host.attacher();
    let err = k
        .attach(&holder(1), &lun(1), Some(&chap()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), stratus_core::error::ErrorKind::Unavailable);
    assert!(err.message().contains("iSCSI login to"), "{err}");
    assert!(err.message().contains("authorization failure"), "{err}");
    assert!(!err.message().contains(SECRET));
    let lines = host.runner.command_lines();
    assert_eq!(
        lines[lines.len() - 2..],
        [node("--logout"), node("-o delete")]
    );
    assert!(!host.record().exists());
    // The next attempt starts from scratch (the iface is not made again).
    host.state.lock().unwrap().login_status = 0;
    host.runner.clear();
    k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    assert_eq!(host.runner.command_lines()[0], node("-o new"));
}

#[tokio::test]
async fn a_database_failure_is_retried_then_named() {
    let host = FakeHost::new();
    host.state.lock().unwrap().idbm_busy = 2;
    let k = host.attacher();
    k.attach(&holder(1), &lun(1), None).await.unwrap();
    let mut want = login_sequence("None");
    let update = want[3].clone();
    want.insert(3, update.clone());
    want.insert(3, update);
    assert_eq!(host.runner.command_lines(), want);
    k.detach(&holder(1), &lun(1)).await.unwrap();

    host.state.lock().unwrap().idbm_busy = 10;
    let err = k.attach(&holder(1), &lun(1), None).await.unwrap_err();
    // The whole argv, so the failing step is plain.
    assert!(
        err.message().contains(&format!(
            "`{}` exited with status 6: iscsiadm: Could not execute operation",
            node(
                "-o update -n node.startup -v manual -n node.session.scan -v manual \
                  -n node.session.auth.authmethod -v None"
            )
        )),
        "{err}"
    );
    assert_eq!(
        host.state.lock().unwrap().idbm_busy,
        10 - IDBM_ATTEMPTS as usize
    );
}

#[tokio::test]
async fn a_restart_rebuilds_the_counts_from_the_records() {
    let host = FakeHost::new();
    {
        let k = host.attacher();
        k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
        k.attach(&holder(2), &lun(2), Some(&chap())).await.unwrap();
    }
    // agentd restarts: a new attacher learns the holders from the store.
    let k = host.attacher();
    k.adopt(holder(1), &lun(1)).await;
    k.adopt(holder(2), &lun(2)).await;
    host.runner.clear();
    assert!(k.reap_orphans().await.is_empty());
    assert!(host.runner.command_lines().is_empty());
    assert_eq!(host.sessions(), 1);

    k.detach(&holder(1), &lun(1)).await.unwrap();
    assert_eq!(host.sessions(), 1, "guest 2 still uses the session");
    k.detach(&holder(2), &lun(2)).await.unwrap();
    assert_eq!(host.sessions(), 0);
    assert_eq!(host.logins(), 1);
}

#[tokio::test]
async fn a_restart_logs_out_sessions_no_record_holds() {
    let host = FakeHost::new();
    {
        let k = host.attacher();
        k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    }
    std::fs::write(host.path("etc/iscsi/.stratus-node-0123"), "x").unwrap();
    // An operator's own session on another iface is none of ours.
    let other = host.attacher_with(KernelOptions {
        iface: "operator".into(),
        ..host.options()
    });
    let theirs = IscsiLun::new("127.0.0.1:3261".parse().unwrap(), TARGET, 0).unwrap();
    other.attach(&holder(5), &theirs, None).await.unwrap();

    let k = host.attacher();
    host.runner.clear();
    let report = k.reap_orphans().await;
    assert_eq!(report.len(), 2, "{report:?}");
    assert!(
        report[1].contains("logged out of unused iSCSI session"),
        "{report:?}"
    );
    assert_eq!(
        host.runner.command_lines(),
        vec![node("--logout"), node("-o delete")]
    );
    assert_eq!(host.sessions(), 1, "the operator's session stays");
    assert!(!host.path("etc/iscsi/.stratus-node-0123").exists());
}

#[tokio::test]
async fn a_restart_keeps_the_iface_record_and_an_operators_settings_on_it() {
    let host = FakeHost::new();
    let iface = host.path("etc/iscsi/ifaces/stratus");
    {
        let k = host.attacher();
        k.attach(&holder(1), &lun(1), None).await.unwrap();
    }
    assert!(iface.is_file());
    // The operator binds agentd's iface to the storage network.
    let text = std::fs::read_to_string(&iface).unwrap();
    std::fs::write(
        &iface,
        text.replace("# END RECORD", "iface.net_ifacename = eth1\n# END RECORD"),
    )
    .unwrap();
    let other = IscsiLun::new("127.0.0.1:3261".parse().unwrap(), TARGET, 0).unwrap();
    let update =
        format!("iscsiadm -m iface -I stratus -o update -n iface.initiatorname -v {INITIATOR}");

    // agentd restarts with a guest adopted (its session uses the iface) and
    // logs in to another target: the iface is not made again.
    let k = host.attacher();
    k.adopt(holder(1), &lun(1)).await;
    host.runner.clear();
    k.attach(&holder(2), &other, None).await.unwrap();
    assert_eq!(host.runner.command_lines()[0], update);
    k.detach(&holder(1), &lun(1)).await.unwrap();
    k.detach(&holder(2), &other).await.unwrap();
    assert_eq!(host.sessions(), 0);

    // Restarted with no session at all: still not made again.
    let k = host.attacher();
    host.runner.clear();
    k.attach(&holder(1), &lun(1), None).await.unwrap();
    assert_eq!(host.runner.command_lines()[0], update);
    let text = std::fs::read_to_string(&iface).unwrap();
    assert!(text.contains("iface.net_ifacename = eth1"), "{text}");
    assert!(
        text.contains(&format!("iface.initiatorname = {INITIATOR}")),
        "{text}"
    );
}

#[test]
fn luns_name_their_by_path_link_and_refuse_odd_targets() {
    let l = lun(3);
    assert_eq!(
        l.by_path_name(),
        format!("ip-127.0.0.1:3260-iscsi-{TARGET}-lun-3")
    );
    let v6 = IscsiLun::new("[fd00::7]:3260".parse().unwrap(), TARGET, 0).unwrap();
    assert_eq!(
        v6.by_path_name(),
        format!("ip-fd00::7:3260-iscsi-{TARGET}-lun-0")
    );
    for bad in ["", "iqn.x/../../etc", "foo.bar:baz", "iqn.2026 11", "iqn."] {
        assert!(
            IscsiLun::new("127.0.0.1:3260".parse().unwrap(), bad, 0).is_err(),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn portals_resolve_to_addresses() {
    let l = IscsiLun::resolve("127.0.0.1:3260", TARGET, 1)
        .await
        .unwrap();
    assert_eq!(l.portal, "127.0.0.1:3260".parse::<SocketAddr>().unwrap());
    let l = IscsiLun::resolve("localhost:3260", TARGET, 1)
        .await
        .unwrap();
    assert!(l.portal.ip().is_loopback());
    assert!(IscsiLun::resolve("127.0.0.1", TARGET, 1).await.is_err());
}

#[test]
fn attach_modes_parse_and_default_to_qemu() {
    assert_eq!(AttachMode::default(), AttachMode::Qemu);
    #[derive(Deserialize)]
    struct T {
        m: AttachMode,
    }
    let t: T = toml::from_str("m = \"kernel\"").unwrap();
    assert_eq!(t.m, AttachMode::Kernel);
}

#[tokio::test]
async fn a_grown_lun_is_rescanned_through_its_own_sysfs_device() {
    let host = FakeHost::new();
    let k = host.attacher();
    let a = k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    let rescan = host.path("sys/block/sdb/device/rescan");
    // sysfs has the attribute; the fake kernel does not make it.
    std::fs::write(&rescan, "").unwrap();
    let disk = KernelDisk {
        lun: lun(1),
        device: Some(a.device.clone()),
        chap_target_user: None,
    };
    k.rescan(&disk).await.unwrap();
    assert_eq!(std::fs::read_to_string(&rescan).unwrap(), "1");
    // No device recorded (a crash before the LUN appeared): refused.
    let err = k
        .rescan(&KernelDisk {
            device: None,
            ..disk
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        stratus_core::error::ErrorKind::FailedPrecondition
    );
    k.detach(&holder(1), &lun(1)).await.unwrap();
}

/// A crash (agentd exiting) at each step of the login sequence, then a
/// restart: the records agentd stores before the login name the disk, so
/// the interrupted start's undo detaches it; a crash that left a session or
/// a node record nothing names is swept by `reap`. Either way no session,
/// node record (with its CHAP secret) or SCSI disk is left without a guest.
#[tokio::test]
async fn a_crash_at_any_login_step_leaves_no_session_record_or_disk_after_restart() {
    // A subscriber on this thread too: a callsite first reached by a
    // thread with none can be cached as uninteresting, and another test's
    // captured logs (`capture_logs`) would miss it.
    let _g = tracing::subscriber::set_default(tracing_subscriber::registry());
    let (_, points) = crate::failpoints::LAB_POINTS[0];
    for recorded in [true, false] {
        for at in points {
            let host = FakeHost::new();
            let k = Arc::new(host.attacher());
            k.arm_crash_point(Some(at));
            let k2 = k.clone();
            let died =
                tokio::spawn(async move { k2.attach(&holder(1), &lun(1), Some(&chap())).await })
                    .await
                    .expect_err("the attach should have crashed");
            assert!(died.is_panic(), "{at}");
            assert!(
                host.record().exists(),
                "{at}: the crash left the node record"
            );
            drop(k);

            // agentd restarts. With the disk recorded (agentd's order: the
            // attachment is stored before the login), the interrupted
            // start is undone through it; without, only the sweep acts.
            let k = host.attacher();
            if recorded {
                k.adopt(holder(1), &lun(1)).await;
                k.detach(&holder(1), &lun(1)).await.unwrap();
            }
            let report = k.reap_orphans().await;
            assert_eq!(host.sessions(), 0, "{at} recorded={recorded}: {report:?}");
            assert!(
                !host.record().exists(),
                "{at} recorded={recorded}: {report:?}"
            );
            host.wait_disks(&[]);
            if !recorded {
                let want = if *at == "kernel.node_created" {
                    "removed unused iSCSI node record of"
                } else {
                    "logged out of unused iSCSI session to"
                };
                assert!(report.iter().any(|l| l.contains(want)), "{at}: {report:?}");
            }
            // Nothing is left to sweep, and the next attach works.
            assert!(k.reap_orphans().await.is_empty(), "{at}");
            let a = k.attach(&holder(2), &lun(1), Some(&chap())).await.unwrap();
            assert!(a.device.exists(), "{at}");
            k.detach(&holder(2), &lun(1)).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_node_record_with_a_session_or_a_holder_is_kept_by_the_sweep() {
    let host = FakeHost::new();
    {
        let k = host.attacher();
        k.attach(&holder(1), &lun(1), Some(&chap())).await.unwrap();
    }
    let k = host.attacher();
    k.adopt(holder(1), &lun(1)).await;
    assert!(k.reap_orphans().await.is_empty());
    assert!(host.record().exists());
    assert_eq!(host.sessions(), 1);
}
