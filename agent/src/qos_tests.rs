use super::*;
use stratus_core::error::ErrorKind;

fn refused(l: &Limits) -> String {
    let e = l.validate().expect_err("should be refused");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    e.to_string()
}

fn bucket(avg: u64, max: u64, max_length: u64) -> Bucket {
    Bucket {
        avg,
        max,
        max_length,
    }
}

#[test]
fn a_total_cannot_be_combined_with_a_read_write_split() {
    let l = Limits {
        iops_total: bucket(100, 0, 0),
        iops_read: bucket(50, 0, 0),
        ..Default::default()
    };
    assert!(refused(&l).contains("iops_total cannot be combined with iops_read/iops_write"));
    let l = Limits {
        bps_total: bucket(1 << 20, 0, 0),
        bps_write: bucket(1 << 20, 0, 0),
        ..Default::default()
    };
    assert!(refused(&l).contains("bps_total cannot be combined"));
    // IOPS total with a bps split is fine, as are both splits.
    Limits {
        iops_total: bucket(100, 0, 0),
        bps_read: bucket(1 << 20, 0, 0),
        bps_write: bucket(2 << 20, 0, 0),
        ..Default::default()
    }
    .validate()
    .unwrap();
}

#[test]
fn a_burst_needs_its_base_and_is_at_least_it() {
    let l = Limits {
        iops_write: bucket(0, 100, 0),
        ..Default::default()
    };
    assert!(refused(&l).contains("iops_write_max needs iops_write"));
    let l = Limits {
        bps_total: bucket(200, 100, 0),
        ..Default::default()
    };
    assert!(refused(&l).contains("bps_total_max (100) must be at least bps_total (200)"));
    let l = Limits {
        iops_read: bucket(100, 0, 10),
        ..Default::default()
    };
    assert!(refused(&l).contains("iops_read_max_length needs iops_read_max"));
    let l = Limits {
        iops_total: bucket(100, 200, MAX_BURST_SECONDS + 1),
        ..Default::default()
    };
    assert!(refused(&l).contains("at most 86400"));
    Limits {
        iops_total: bucket(100, 200, 60),
        ..Default::default()
    }
    .validate()
    .unwrap();
}

#[test]
fn values_stay_within_qemus_bounds() {
    let l = Limits {
        bps_total: bucket(VALUE_MAX + 1, 0, 0),
        ..Default::default()
    };
    assert!(refused(&l).contains("at most 1000000000000000"));
    let l = Limits {
        bps_total: bucket(VALUE_MAX / 2, VALUE_MAX / 2, 3),
        ..Default::default()
    };
    assert!(refused(&l).contains("too long"));
    let l = Limits {
        iops_size: 4096,
        ..Default::default()
    };
    assert!(refused(&l).contains("iops_size needs an IOPS limit"));
    let l = Limits {
        iops_total: bucket(10, 0, 0),
        iops_size: 100,
        ..Default::default()
    };
    assert!(refused(&l).contains("iops_size must be 512"));
}

#[test]
fn group_names_are_checked_and_groups_agree() {
    for bad in ["", "A", "1a", "a_b", "a.b", &"a".repeat(33)] {
        let q = DiskQos {
            group: Some(bad.into()),
            ..Default::default()
        };
        let e = q.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("disk QoS group"), "{e}");
    }
    let a = DiskQos {
        group: Some("db".into()),
        limits: Limits {
            iops_total: bucket(100, 0, 0),
            ..Default::default()
        },
    };
    let mut b = a.clone();
    check_groups("web", [&a, &b].into_iter()).unwrap();
    b.limits.iops_total.avg = 200;
    let e = check_groups("web", [&a, &b].into_iter()).unwrap_err();
    assert!(e
        .to_string()
        .contains("QoS group db must have the same limits"));
    // Disks of no group never clash.
    let own = DiskQos::default();
    check_groups("web", [&own, &a, &own].into_iter()).unwrap();
    assert_eq!(a.group_id("vdb"), "qos-group-db");
    assert_eq!(own.group_id("vdb"), "qos-vdb");
}

#[test]
fn qemu_gets_every_field_and_reads_back_the_same() {
    let l = Limits {
        iops_total: bucket(200, 400, 5),
        bps_write: bucket(1 << 20, 0, 0),
        iops_size: 8192,
        ..Default::default()
    };
    let v = l.qemu();
    assert_eq!(v.as_object().unwrap().len(), 19);
    assert_eq!(v["iops-total"], 200);
    assert_eq!(v["iops-total-max"], 400);
    assert_eq!(v["iops-total-max-length"], 5);
    // Unset lengths are QEMU's default, so a live change resets them.
    assert_eq!(v["bps-read-max-length"], 1);
    assert_eq!(v["bps-read"], 0);
    assert_eq!(Limits::from_qemu(&v), l);
    assert_eq!(
        l.describe(),
        "iops_total=200 iops_total_max=400 iops_total_max_length=5 bps_write=1048576 iops_size=8192"
    );
    assert_eq!(Limits::default().describe(), "unlimited");
    let p = PlannedQos::of(&DiskQos::default(), "vda");
    assert_eq!(p.group_object()["id"], "qos-vda");
    let n = p.throttle_node("vda", json!({"node-name": "vda-fmt"}));
    assert_eq!(n["driver"], "throttle");
    assert_eq!(n["throttle-group"], "qos-vda");
    assert_eq!(n["file"]["node-name"], "vda-fmt");
}

#[test]
fn records_serialize_only_what_is_limited() {
    assert_eq!(serde_json::to_string(&DiskQos::default()).unwrap(), "{}");
    let q = DiskQos {
        group: None,
        limits: Limits {
            iops_read: bucket(5, 0, 0),
            ..Default::default()
        },
    };
    let s = serde_json::to_string(&q).unwrap();
    assert_eq!(s, r#"{"limits":{"iops_read":{"avg":5}}}"#);
    assert_eq!(serde_json::from_str::<DiskQos>(&s).unwrap(), q);
}
