//! stratus-probe against real daemons: every exit status of the plugin
//! contract from what a real pdiskd (tgtd, XFS reflink pool on a loop
//! device; probed over mTLS with an admin certificate and over its local
//! socket) and a real agentd (in a test namespace, probed over its local
//! socket) report. Needs root; run by scripts/test.

use std::path::Path;
use std::process::Command;

use stratus_proto::agent::v1 as apb;
use stratus_proto::agent::v1::vm_service_client::VmServiceClient;
use testkit::*;

/// Runs the probe: (exit status, stdout).
fn probe(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stratus-probe"))
        .args(args)
        .env_remove("STRATUS_CERT")
        .env_remove("STRATUS_KEY")
        .env_remove("STRATUS_CA")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty(),
        "the plugin contract has no stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code().expect("an exit status");
    // In the tier's log: what a monitoring system would have seen.
    eprintln!("stratus-probe {}: exit {code}: {stdout}", args.join(" "));
    (code, stdout)
}

/// The probe's JSON: (exit status, object); the status line and the JSON
/// must agree on the exit status.
fn probe_json(args: &[&str]) -> (i32, serde_json::Value) {
    let mut with = args.to_vec();
    with.push("--json");
    let (code, out) = probe(&with);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(j["exit_code"], code, "{j}");
    (code, j)
}

fn perf(j: &serde_json::Value, label: &str) -> f64 {
    j["perfdata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == label)
        .unwrap_or_else(|| panic!("no {label} in {j}"))["value"]
        .as_f64()
        .unwrap()
}

/// One line, `STRATUS <WHAT> <STATUS> - ...`, perfdata after `|`.
fn assert_line(out: &str, prefix: &str) {
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with(prefix), "want {prefix:?}, got {out}");
}

fn fallocate(path: &Path, bytes: u64) {
    run_ok(
        "fallocate",
        &["-l", &bytes.to_string(), path.to_str().unwrap()],
    );
}

#[test]
#[ignore = "needs root, tgtd and XFS: run by scripts/test"]
fn pdisk_ok_warning_critical_by_fill_and_drift_critical_when_down() {
    require_root();
    let pool = XfsPool::new(512);
    let tgtd = Tgtd::start(pool.dir.path());
    let mut pdiskd = Pdiskd::start(&pool, &tgtd);
    let admin = cli_tls_args(&TestPki::shared().admin());
    let url = pdiskd.url();
    let mut mtls: Vec<&str> = vec!["pdisk", "--server", &url];
    mtls.extend(admin.iter().map(String::as_str));
    let local = format!("unix:{}", pdiskd.local_socket.display());
    let over_socket = ["pdisk", "--server", local.as_str()];

    // Healthy: OK over both transports, with the pool's perfdata.
    let (code, out) = probe(&mtls);
    assert_eq!(code, 0, "{out}");
    assert_line(&out, "STRATUS PDISK OK - pool ");
    assert!(out.contains("no drift"), "{out}");
    assert!(out.contains(" | fill="), "{out}");
    assert!(
        out.contains(";80;90;0;100 "),
        "thresholds in perfdata: {out}"
    );
    let (code, out) = probe(&over_socket);
    assert_eq!(code, 0, "{out}");
    let (_, j) = probe_json(&mtls);
    assert_eq!(j["status"], "OK");
    let fill = perf(&j, "fill");
    let capacity = j["perfdata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "used")
        .unwrap()["max"]
        .as_f64()
        .unwrap();
    assert!(fill < 80.0, "{j}");

    // The pool's filesystem nearly full (a file beside the pool, so not
    // pdisk's drift): WARNING at 85%, then CRITICAL at 92%.
    let filler = pool.mnt.join("filler");
    let to = |percent: f64| ((percent - fill) / 100.0 * capacity) as u64;
    fallocate(&filler, to(85.0));
    let (code, out) = probe(&mtls);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "STRATUS PDISK WARNING - pool 8");
    // A second file: XFS reserves a whole fallocate range up front, so
    // growing the first one to 92% would not fit.
    let more = pool.mnt.join("filler2");
    fallocate(&more, to(92.0) - to(85.0));
    let (code, out) = probe(&mtls);
    assert_eq!(code, 2, "{out}");
    assert_line(&out, "STRATUS PDISK CRITICAL - pool 9");
    // Thresholds are the caller's: the same pool is OK below them.
    let (code, out) = probe(&[&mtls[..], &["-w", "98", "-c", "99"]].concat());
    assert_eq!(code, 0, "{out}");
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&more).unwrap();

    // A file pdisk does not know in its pool: drift at the next
    // reconciliation, reported and left in place: WARNING.
    let stray = pdiskd
        .pool_dir
        .join("volumes/00000000-0000-4000-8000-000000000001.raw");
    std::fs::write(&stray, b"not ours").unwrap();
    pdiskd.restart();
    let (code, out) = probe(&mtls);
    assert_eq!(code, 1, "{out}");
    assert_line(
        &out,
        "STRATUS PDISK WARNING - 1 drift at the last reconciliation",
    );
    let (_, j) = probe_json(&mtls);
    assert_eq!(perf(&j, "drift"), 1.0, "{j}");
    std::fs::remove_file(&stray).unwrap();

    // Not an admin: the probe cannot judge the pool, which is CRITICAL
    // for the monitoring (a misconfigured probe must not look healthy).
    let project =
        TestPki::shared().issue(stratus_pki::identity::Role::Project, "probe-p", None, &[]);
    let project_args = cli_tls_args(&project);
    let mut as_project: Vec<&str> = vec!["pdisk", "--server", &url];
    as_project.extend(project_args.iter().map(String::as_str));
    let (code, out) = probe(&as_project);
    assert_eq!(code, 2, "{out}");
    assert_line(
        &out,
        "STRATUS PDISK CRITICAL - GetPool failed: PermissionDenied",
    );

    // pdiskd down: CRITICAL over both transports, quickly.
    pdiskd.kill9();
    let (code, out) = probe(&mtls);
    assert_eq!(code, 2, "{out}");
    assert_line(
        &out,
        "STRATUS PDISK CRITICAL - cannot reach the pdisk server",
    );
    let (code, j) = probe_json(&over_socket);
    assert_eq!(code, 2, "{j}");
    assert_eq!(j["status"], "CRITICAL");
}

#[test]
#[ignore = "needs root (agentd in a namespace): run by scripts/test"]
fn agent_ok_warning_for_a_guest_in_error_unknown_launch_test_critical_when_down() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = NetNs::new();
    ns.add_bridge("prbr0");
    // A pdiskd in the namespace: ListImages (the launch test's first
    // call) lists its image bases too.
    let pool = XfsPool::new(320);
    let tgtd = Tgtd::start_in(pool.dir.path(), Some(&ns));
    let pdiskd = Pdiskd::start_in(&pool, &tgtd, Some(&ns));
    let mut agentd = Agentd::start_in(dir.path(), &ns, &pdiskd.url(), "prbr0");
    let socket = format!("unix:{}", dir.path().join("agentd.sock").display());
    let args = ["agent", "--server", socket.as_str()];

    let (code, out) = probe(&args);
    assert_eq!(code, 0, "{out}");
    assert_line(&out, "STRATUS AGENT OK - 0 guests, 0 running");
    assert!(
        out.contains(" | guests=0;;;0 running=0;;;0 broken=0;1;;0"),
        "{out}"
    );

    // A guest whose file disk vanished between create and start: its start
    // fails and leaves it in ERROR, which needs an operator: WARNING.
    let disk = dir.path().join("host-files/gone.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = socket.clone();
    let d = disk.display().to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let mut c = VmServiceClient::new(channel(&sock).await);
        c.create_vm(apb::CreateVmRequest {
            spec: Some(apb::VmSpec {
                name: "doomed".into(),
                vcpus: 1,
                memory_bytes: 64 << 20,
                disks: vec![apb::DiskSpec {
                    source: Some(apb::disk_spec::Source::File(d)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        std::fs::remove_file(&disk).unwrap();
        let refused = c
            .start_vm(apb::VmRequest {
                vm: "doomed".into(),
                ..Default::default()
            })
            .await;
        assert!(refused.is_err(), "{refused:?}");
    });
    let (code, out) = probe(&args);
    assert_eq!(code, 1, "{out}");
    assert_line(
        &out,
        "STRATUS AGENT WARNING - guests in error or crashed: 1 (first: doomed ERROR",
    );

    // A launch test from an image the agent has not cached: the probe's
    // setup is wrong, not the host: UNKNOWN, and no guest was made.
    let sha = "0".repeat(64);
    let launch = [
        &args[..],
        &[
            "--launch-test",
            "--image-url",
            "http://192.0.2.1/none.img",
            "--image-sha256",
            &sha,
        ],
    ]
    .concat();
    let (code, out) = probe(&launch);
    assert_eq!(code, 3, "{out}");
    assert_line(&out, "STRATUS AGENT UNKNOWN - launch test: image 0000");
    let (_, j) = probe_json(&args);
    assert_eq!(perf(&j, "guests"), 1.0, "no test guest left: {j}");

    // agentd down: CRITICAL.
    agentd.kill9();
    let (code, out) = probe(&args);
    assert_eq!(code, 2, "{out}");
    assert_line(&out, "STRATUS AGENT CRITICAL - cannot reach the agent");
}

/// The launch test's success path, as a federation's availability probe
/// runs it: the test guest's image cached, a guest from it up and showing
/// its marker on the console, still running after the settle time, then
/// destroyed: OK with the launch time as perfdata, and no guest left.
#[test]
#[ignore = "needs root, QEMU and the test guest (scripts/guest-image): run by scripts/test's e2e tier"]
fn agent_launch_test_is_ok_when_a_guest_from_the_cached_image_shows_its_marker() {
    require_root();
    let h = AgentHost::start(1024, &[]);
    let g = h.serve_guest();
    let (url, sha) = (g.url.clone(), g.sha256.clone());
    h.agent(move |mut c| async move {
        c.pull_image(apb::PullImageRequest {
            image: Some(apb::ImageRef {
                url,
                sha256: sha,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
    });
    let socket = format!("unix:{}", h.pool.dir.path().join("agentd.sock").display());
    let args = [
        "agent",
        "--server",
        &socket,
        "--timeout",
        "300",
        "--launch-test",
        "--image-url",
        &g.url,
        "--image-sha256",
        &g.sha256,
        "--ready-marker",
        "STRATUS-GUEST ready",
        "--settle",
        "2",
    ];
    let (code, j) = probe_json(&args);
    assert_eq!(code, 0, "{j}");
    assert_eq!(j["status"], "OK", "{j}");
    let launch = j["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["text"].as_str())
        .find(|t| t.starts_with("launch test:"))
        .unwrap_or_else(|| panic!("no launch finding in {j}"))
        .to_owned();
    assert!(
        launch.starts_with("launch test: guest ready in")
            && launch.ends_with("still running after 2 s, destroyed"),
        "{launch}"
    );
    assert!(perf(&j, "launch") > 0.0, "{j}");
    // Destroyed: no guest left, and what it used given back.
    let vms = h.agent(|mut c| async move {
        c.list_vms(apb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
    });
    assert!(vms.is_empty(), "{vms:?}");
    assert!(h.agentd.guest_pids().is_empty());
}

/// Bad arguments are UNKNOWN (3), never a clap exit 2 that Nagios would
/// read as CRITICAL; --json still gives JSON. No daemon needed.
#[test]
fn bad_arguments_are_unknown() {
    for args in [
        &["pdisk", "--warning", "95", "--critical", "90"][..],
        &["pdisk", "--warning", "many"],
        &["pdisk", "--bogus"],
        &["agent", "--image-url", "http://x/y.img"],
        &["pdisk", "--server", "ftp://x"],
        &[],
    ] {
        let (code, out) = probe(args);
        assert_eq!(code, 3, "{args:?}: {out}");
        assert!(
            out.starts_with("STRATUS ") && out.contains(" UNKNOWN - "),
            "{args:?}: {out}"
        );
        let (code, j) = probe_json(args);
        assert_eq!(code, 3, "{args:?}: {j}");
        assert_eq!(j["status"], "UNKNOWN", "{args:?}: {j}");
    }
    let (code, out) = probe(&["--version"]);
    assert_eq!(code, 0, "{out}");
}
