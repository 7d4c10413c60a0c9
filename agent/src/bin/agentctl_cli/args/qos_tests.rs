//! The QoS options of `vm disk qos`, `vm disk attach` and `vm create`.

use clap::error::ErrorKind;

use super::tests::{fails, parse, spec};
use super::vm::DiskCommand;
use super::*;

#[test]
fn disk_qos_takes_counts_sizes_and_a_group() {
    let cli = parse(&[
        "vm",
        "disk",
        "qos",
        "web1",
        "vdb",
        "--iops-total",
        "200",
        "--iops-total-max",
        "400",
        "--iops-total-max-length",
        "10",
        "--bps-write",
        "10M",
        "--iops-size",
        "4K",
        "--group",
        "db",
    ])
    .unwrap();
    let Command::Vm(VmCommand::Disk(DiskCommand::Qos { device, limits, .. })) = cli.command else {
        panic!("wrong command")
    };
    assert_eq!(device, "vdb");
    let q = limits.qos().unwrap().to_pb();
    assert_eq!(
        (q.iops_total, q.iops_total_max, q.iops_total_max_length),
        (200, 400, 10)
    );
    assert_eq!((q.bps_write, q.iops_size), (10 << 20, 4096));
    assert_eq!(q.group, "db");
    assert_eq!(q.bps_read, 0);
    // Nothing given: unlimited.
    let cli = parse(&["vm", "disk", "qos", "web1", "vda"]).unwrap();
    let Command::Vm(VmCommand::Disk(DiskCommand::Qos { limits, .. })) = cli.command else {
        panic!("wrong command")
    };
    assert_eq!(limits.qos().unwrap().to_pb(), Default::default());
    assert_eq!(
        fails(&["vm", "disk", "qos", "web1", "vda", "--iops-total", "x"]).kind(),
        ErrorKind::ValueValidation
    );
}

/// QEMU's rules, as the agent checks them, refuse a value before any call.
#[test]
fn qemus_rules_refuse_a_bad_combination_with_the_field_named() {
    for (flags, words) in [
        (
            &["--iops-total", "100", "--iops-read", "50"][..],
            "iops_total cannot be combined with iops_read/iops_write",
        ),
        (&["--bps-read-max", "1M"][..], "bps_read_max needs bps_read"),
        (
            &["--iops-write", "100", "--iops-write-max", "50"][..],
            "iops_write_max (50) must be at least iops_write (100)",
        ),
        (
            &[
                "--iops-total",
                "1",
                "--iops-total-max",
                "2",
                "--iops-total-max-length",
                "90000",
            ][..],
            "at most 86400",
        ),
        (&["--iops-size", "4K"][..], "iops_size needs an IOPS limit"),
        (&["--group", "Db"][..], "disk QoS group \"Db\""),
    ] {
        let mut args = vec!["vm", "disk", "qos", "web1", "vda"];
        args.extend_from_slice(flags);
        let Command::Vm(VmCommand::Disk(DiskCommand::Qos { limits, .. })) =
            parse(&args).unwrap().command
        else {
            panic!("wrong command")
        };
        let e = limits.qos().unwrap_err();
        assert!(e.contains(words), "{flags:?}: {e}");
        assert!(e.starts_with("disk QoS"), "{flags:?}: {e}");
    }
}

fn attach(extra: &[&str]) -> Result<stratus_proto::agent::v1::DiskSpec, String> {
    let mut args = vec!["vm", "disk", "attach", "web1", "pdisk:data"];
    args.extend_from_slice(extra);
    let Command::Vm(VmCommand::Disk(DiskCommand::Attach { disk, qos, .. })) =
        parse(&args).unwrap().command
    else {
        panic!("wrong command")
    };
    attach_disk_spec(&disk, &qos)
}

#[test]
fn attach_takes_the_same_limits() {
    let d = attach(&["--iops-read", "300", "--bps-write", "4M", "--group", "db"]).unwrap();
    let q = d.qos.unwrap();
    assert_eq!((q.iops_read, q.bps_write), (300, 4 << 20));
    assert_eq!(q.group, "db");
    // None given: the disk has no limits in its spec.
    assert_eq!(attach(&[]).unwrap().qos, None);
    let e = attach(&["--bps-total", "1M", "--bps-write", "1M"]).unwrap_err();
    assert!(e.contains("bps_total cannot be combined"), "{e}");
    assert_eq!(
        fails(&["vm", "disk", "attach", "w", "pdisk:d", "--bps-read", "lots"]).kind(),
        ErrorKind::ValueValidation
    );
}

#[test]
fn create_limits_every_disk_or_those_named() {
    let disks = ["--disk", "pdisk:root", "--disk", "pdisk:data"];
    let with = |extra: &[&str]| {
        let mut a = disks.to_vec();
        a.extend_from_slice(extra);
        spec(&a)
    };
    // Every disk, each its own limits.
    let s = with(&["--iops-total", "200"]).unwrap();
    for d in &s.disks {
        assert_eq!(d.qos.as_ref().unwrap().iops_total, 200);
        assert_eq!(d.qos.as_ref().unwrap().group, "");
    }
    // Only vdb, in a group.
    let s = with(&["--bps-write", "10M", "--group", "db", "--qos-disk", "vdb"]).unwrap();
    assert_eq!(s.disks[0].qos, None);
    let q = s.disks[1].qos.clone().unwrap();
    assert_eq!((q.bps_write, q.group.as_str()), (10 << 20, "db"));
    // No options: no limits.
    assert!(with(&[]).unwrap().disks.iter().all(|d| d.qos.is_none()));
    // Refused before anything is created.
    let e = with(&["--iops-total", "1", "--iops-write", "1"]).unwrap_err();
    assert!(e.contains("iops_total cannot be combined"), "{e}");
    let e = with(&["--iops-total", "1", "--qos-disk", "vdc"]).unwrap_err();
    assert!(
        e.contains("--qos-disk vdc: the VM's disks are vda, vdb"),
        "{e}"
    );
    let e = with(&["--qos-disk", "vda"]).unwrap_err();
    assert!(e.contains("--qos-disk needs a limit"), "{e}");
}
