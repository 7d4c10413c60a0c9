use super::*;

#[test]
fn flags_override_file_override_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(
        &f,
        "data_dir = \"/srv/pdisk\"\nportal = \"10.0.0.1:3260\"\nexport = \"tgt\"\n",
    )
    .unwrap();
    let flags = Flags::parse_from([
        "pdiskd",
        "--config",
        f.to_str().unwrap(),
        "--portal",
        "127.0.0.1:3261",
    ]);
    let c = flags.resolve().unwrap();
    assert_eq!(c.portal, "127.0.0.1:3261");
    assert_eq!(c.data_dir, PathBuf::from("/srv/pdisk"));
    assert_eq!(c.pool_dir, PathBuf::from("/srv/pdisk/pool"));
    assert_eq!(c.serve.mtls, None, "no TLS files, no TCP listener");
    assert_eq!(
        c.serve.local_socket,
        Some(PathBuf::from("/run/stratus/pdiskd.sock"))
    );
    let e = Flags::parse_from(["pdiskd", "--listen", "0.0.0.0:7400"])
        .resolve()
        .unwrap_err();
    assert!(e.message().contains("--tls-cert"), "{e}");
    let e = Flags::parse_from(["pdiskd", "--tls-cert", "/c.pem"])
        .resolve()
        .unwrap_err();
    assert!(e.message().contains("tls-key and tls-client-ca"), "{e}");
    let e = Flags::parse_from(["pdiskd", "--insecure-listen", "192.0.2.1:7400"])
        .resolve()
        .unwrap_err();
    assert!(e.message().contains("loopback"), "{e}");
}

#[test]
fn usage_settings_default_parse_and_refuse_nonsense() {
    let c = Flags::parse_from(["pdiskd"]).resolve().unwrap();
    assert_eq!(c.usage_interval, std::time::Duration::from_secs(3600));
    let u = Flags::parse_from([
        "pdiskd",
        "--usage-interval",
        "15m",
        "--usage-site",
        "SITE-1",
        "--usage-service",
        "store1.example.org",
    ])
    .resolve()
    .unwrap();
    assert_eq!(u.usage_interval, std::time::Duration::from_secs(900));
    assert_eq!(
        (u.usage_site.as_str(), u.usage_service.as_str()),
        ("SITE-1", "store1.example.org")
    );
    for bad in ["10ms", "soon"] {
        let e = Flags::parse_from(["pdiskd", "--usage-interval", bad])
            .resolve()
            .unwrap_err();
        assert!(e.message().contains("usage-interval"), "{e}");
    }
}

/// The serving keys are stratus-pki's `ServeFlags`, flattened: the same
/// top-level TOML keys as flags, flags over file, typos still refused.
#[test]
fn serving_keys_come_from_the_file_under_their_flag_names() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(
        &f,
        "tls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\ntls_client_ca = \"/ca.pem\"\n\
         local_socket = \"/tmp/file.sock\"\nlocal_group = \"ops\"\n\
         insecure_listen = \"127.0.0.1:7999\"\n",
    )
    .unwrap();
    let path = f.to_str().unwrap();
    let c = Flags::parse_from([
        "pdiskd",
        "--config",
        path,
        "--local-socket",
        "/tmp/flag.sock",
    ])
    .resolve()
    .unwrap();
    let (listen, files) = c.serve.mtls.expect("TLS files give an mTLS listener");
    assert_eq!(listen, "127.0.0.1:7400".parse().unwrap());
    assert_eq!(files.cert, PathBuf::from("/c.pem"));
    assert_eq!(c.serve.local_socket, Some(PathBuf::from("/tmp/flag.sock")));
    assert_eq!(c.serve.local_group, "ops");
    assert_eq!(
        c.serve.insecure_listen,
        Some("127.0.0.1:7999".parse().unwrap())
    );

    std::fs::write(&f, "tls_crt = \"/c.pem\"\n").unwrap();
    let e = Flags::parse_from(["pdiskd", "--config", path])
        .resolve()
        .unwrap_err();
    assert!(e.message().contains("tls_crt"), "{e}");
}

#[test]
fn typos_and_bad_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(&f, "pool_dri = \"/x\"\n").unwrap();
    let e = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap_err();
    assert!(e.message().contains("pool_dri"), "{e}");
    let e = Flags::parse_from(["pdiskd", "--portal", "nohost"])
        .resolve()
        .unwrap_err();
    assert!(e.message().contains("portal"));
}

#[test]
fn lvm_backend_needs_valid_vg_and_thin_pool() {
    let c = Flags::parse_from([
        "pdiskd",
        "--backend",
        "lvm",
        "--vg",
        "stratus",
        "--thin-pool",
        "pool",
        "--data-dir",
        "/srv/pdisk",
        "--lvm-wipe",
        "zero",
    ])
    .resolve()
    .unwrap();
    let l = c.lvm.unwrap();
    assert_eq!((l.vg.as_str(), l.thin_pool.as_str()), ("stratus", "pool"));
    assert_eq!((l.threshold_percent, l.wipe), (90.0, Wipe::Zero));
    assert!(!l.create_pool);
    assert_eq!(l.staging_dir, PathBuf::from("/srv/pdisk/staging"));

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(
        &f,
        "backend = \"lvm\"\nvg = \"vg0\"\nthin_pool = \"tp\"\nlvm_create_pool = true\nthin_threshold = 85.5\nlvm_wipe = \"none\"\n",
    )
    .unwrap();
    let l = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap()
        .lvm
        .unwrap();
    assert!(l.create_pool);
    assert_eq!((l.threshold_percent, l.wipe), (85.5, Wipe::None));

    for (args, why) in [
        (vec!["--backend", "lvm", "--vg", "stratus"], "--thin-pool"),
        (
            vec!["--backend", "lvm", "--vg=-rf", "--thin-pool", "p"],
            "vg",
        ),
        (
            vec!["--backend", "lvm", "--vg", "v g", "--thin-pool", "p"],
            "vg",
        ),
        (
            vec!["--backend", "lvm", "--vg", "v", "--thin-pool", "p/../x"],
            "thin-pool",
        ),
        (
            vec!["--backend", "lvm", "--vg", "v", "--thin-pool", "p_tmeta"],
            "thin-pool",
        ),
        (
            vec![
                "--backend",
                "lvm",
                "--vg",
                "v",
                "--thin-pool",
                "p",
                "--thin-threshold",
                "120",
            ],
            "thin-threshold",
        ),
        (vec!["--vg", "stratus"], "lvm backend"),
        (vec!["--lvm-create-pool"], "lvm backend"),
    ] {
        let e = Flags::parse_from(std::iter::once("pdiskd").chain(args.iter().copied()))
            .resolve()
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(e.message().contains(why), "{args:?}: {e}");
    }
}

#[test]
fn nvmet_exporter_port_and_portal() {
    let c = Flags::parse_from(["pdiskd", "--export", "nvmet"])
        .resolve()
        .unwrap();
    assert_eq!(c.exporter, ExporterKind::Nvmet);
    assert_eq!(c.portal, "127.0.0.1:4420");
    assert_eq!(c.nvmet_port_id, 1);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(
        &f,
        "export = \"nvmet\"\nportal = \"10.0.0.1:4420\"\nnvmet_port_id = 7\n",
    )
    .unwrap();
    let c = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap();
    assert_eq!(c.exporter, ExporterKind::Nvmet);
    assert_eq!(c.portal, "10.0.0.1:4420");
    assert_eq!(c.nvmet_port_id, 7);
    let e = Flags::parse_from(["pdiskd", "--backend", "rbd", "--export", "nvmet"])
        .resolve()
        .unwrap_err();
    assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
}

#[test]
fn lio_exporter_and_its_configfs_root() {
    let c = Flags::parse_from(["pdiskd", "--export", "lio"])
        .resolve()
        .unwrap();
    assert_eq!(c.exporter, ExporterKind::Lio);
    assert_eq!(c.lio_configfs, PathBuf::from("/sys/kernel/config"));
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(&f, "export = \"lio\"\nlio_configfs = \"/mnt/cfg\"\n").unwrap();
    let c = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap();
    assert_eq!(c.exporter, ExporterKind::Lio);
    assert_eq!(c.lio_configfs, PathBuf::from("/mnt/cfg"));
    assert_eq!(c.iscsi_params, IscsiParams::measured_default());
    std::fs::write(&f, "iscsi_params = \"InitialR2T=No\"\n").unwrap();
    let with = |extra: &[&str]| {
        let mut argv = vec!["pdiskd", "--config", f.to_str().unwrap()];
        argv.extend(extra);
        Flags::parse_from(argv).resolve()
    };
    assert_eq!(with(&[]).unwrap().iscsi_params.to_string(), "InitialR2T=No");
    let flag = with(&["--iscsi-params", "none"]).unwrap();
    assert!(flag.iscsi_params.is_empty(), "the flag beats the file");
    let bad = with(&["--iscsi-params", "MaxBurstLength=1"]).unwrap_err();
    assert!(bad.to_string().contains("MaxBurstLength"), "{bad}");
}

#[test]
fn rbd_backend_needs_a_pool_and_takes_only_safe_names_and_paths() {
    let c = Flags::parse_from([
        "pdiskd",
        "--backend",
        "rbd",
        "--rbd-pool",
        "pdisk",
        "--ceph-id",
        "pdisk",
        "--ceph-keyring",
        "/etc/ceph/ceph.client.pdisk.keyring",
        "--data-dir",
        "/srv/pdisk",
    ])
    .resolve()
    .unwrap();
    let r = c.rbd.unwrap();
    assert_eq!((r.pool.as_str(), r.ceph_id.as_str()), ("pdisk", "pdisk"));
    assert_eq!(r.ceph_conf, PathBuf::from("/etc/ceph/ceph.conf"));
    assert_eq!(r.max_clone_depth, 5);
    assert_eq!(r.data_pool, None);
    assert_eq!(r.staging_dir, PathBuf::from("/srv/pdisk/staging"));
    assert!(c.lvm.is_none());
    // Exports name pdiskd's own user unless clients have one of theirs;
    // there is no target: the rbd exporter is the default.
    assert_eq!(r.client_id.as_str(), "pdisk");
    assert_eq!(c.exporter, ExporterKind::Rbd);
    let c = Flags::parse_from([
        "pdiskd",
        "--backend",
        "rbd",
        "--rbd-pool",
        "pdisk",
        "--rbd-client-id",
        "compute",
    ])
    .resolve()
    .unwrap();
    assert_eq!(c.rbd.unwrap().client_id.as_str(), "compute");

    for (args, why) in [
        (vec!["--backend", "rbd"], "--rbd-pool"),
        (vec!["--backend", "rbd", "--rbd-pool=-rf"], "rbd-pool"),
        (vec!["--backend", "rbd", "--rbd-pool", "a/b"], "rbd-pool"),
        (
            vec![
                "--backend",
                "rbd",
                "--rbd-pool",
                "p",
                "--ceph-id",
                "client admin",
            ],
            "ceph-id",
        ),
        (
            vec![
                "--backend",
                "rbd",
                "--rbd-pool",
                "p",
                "--ceph-conf",
                "/x:mon_host=evil",
            ],
            "ceph-conf",
        ),
        (
            vec![
                "--backend",
                "rbd",
                "--rbd-pool",
                "p",
                "--ceph-keyring",
                "rel/keyring",
            ],
            "ceph-keyring",
        ),
        (vec!["--rbd-pool", "p"], "rbd backend"),
        (vec!["--rbd-client-id", "c"], "rbd backend"),
        (
            vec![
                "--backend",
                "rbd",
                "--rbd-pool",
                "p",
                "--rbd-client-id",
                "a b",
            ],
            "rbd-client-id",
        ),
        // No iSCSI target serves an RBD image, and only RBD images
        // are opened by Ceph's client.
        (
            vec!["--backend", "rbd", "--rbd-pool", "p", "--export", "tgt"],
            "not supported",
        ),
        (vec!["--export", "rbd"], "needs --backend rbd"),
        (
            vec![
                "--backend",
                "lvm",
                "--vg",
                "v",
                "--thin-pool",
                "p",
                "--ceph-id",
                "x",
            ],
            "rbd backend",
        ),
    ] {
        let e = Flags::parse_from(std::iter::once("pdiskd").chain(args.iter().copied()))
            .resolve()
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(e.message().contains(why), "{args:?}: {e}");
    }
}

#[test]
fn the_quarantine_period_defaults_to_a_day_and_zero_turns_it_off() {
    let day = std::time::Duration::from_secs(24 * 3600);
    let c = Flags::parse_from(["pdiskd"]).resolve().unwrap();
    assert_eq!(c.quarantine_period, day);
    for (arg, want) in [
        ("0", std::time::Duration::ZERO),
        ("3s", std::time::Duration::from_secs(3)),
        ("7d", 7 * day),
    ] {
        let c = Flags::parse_from(["pdiskd", "--quarantine-period", arg])
            .resolve()
            .unwrap();
        assert_eq!(c.quarantine_period, want, "{arg}");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(&f, "quarantine_period = \"2h\"\n").unwrap();
    let c = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap();
    assert_eq!(c.quarantine_period, std::time::Duration::from_secs(7200));
    for bad in ["soon", "24", "3 lightyears"] {
        let e = Flags::parse_from(["pdiskd", "--quarantine-period", bad])
            .resolve()
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::InvalidArgument, "{bad}");
        assert!(e.message().contains("quarantine-period"), "{e}");
    }
}

#[test]
fn the_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pdiskd.toml");
    std::fs::write(&f, include_str!("../../examples/pdiskd.toml")).unwrap();
    let c = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap();
    assert_eq!(c.pool_dir, PathBuf::from("/srv/pdisk/pool"));
    assert_eq!(c.log_format, LogFormat::Json);

    // Its commented lvm settings are valid too, once uncommented.
    let lvm: String = include_str!("../../examples/pdiskd.toml")
        .lines()
        .filter(|l| *l != "backend = \"file\"")
        .map(|l| match l.strip_prefix("# ") {
            Some(kv) if kv.contains(" = ") => kv,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&f, lvm).unwrap();
    let c = Flags::parse_from(["pdiskd", "--config", f.to_str().unwrap()])
        .resolve()
        .unwrap();
    assert_eq!(c.backend, BackendKind::Lvm);
    let l = c.lvm.unwrap();
    assert_eq!((l.vg.as_str(), l.thin_pool.as_str()), ("stratus", "pool"));
    assert!(l.create_pool);
}
