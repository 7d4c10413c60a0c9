use std::path::Path;

use clap::error::ErrorKind;
use clap::CommandFactory;
use stratus_core::types::ByteSize;
use stratus_proto::agent::v1::{disk_spec, DiskPersistence, ImageFormat, NicSpec, VmSpec};

use super::disk::{DiskArg, DiskSource};
use super::nic::Mac;
use super::vm::CreateArgs;
use super::*;

pub(super) fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("agentctl").chain(args.iter().copied()))
}

pub(super) fn fails(args: &[&str]) -> clap::Error {
    parse(args).expect_err(&format!("{args:?} should be refused"))
}

/// `vm create web1` with `extra`, and --vcpus 2 --memory 512M unless given.
fn create(extra: &[&str]) -> Result<CreateArgs, clap::Error> {
    let mut args = vec!["vm", "create", "web1"];
    args.extend_from_slice(extra);
    for (flag, value) in [("--vcpus", "2"), ("--memory", "512M")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    match parse(&args)?.command {
        Command::Vm(VmCommand::Create(a)) => Ok(*a),
        other => panic!("wrong command {other:?}"),
    }
}

pub(super) fn spec(extra: &[&str]) -> Result<VmSpec, String> {
    create(extra).unwrap().spec(Path::new("/home/op"))
}

#[test]
fn command_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn global_flags_go_before_or_after_the_subcommand() {
    let before = parse(&["--json", "--agent", "h:1", "host", "show"]).unwrap();
    let after = parse(&["host", "show", "--json", "--agent", "h:1"]).unwrap();
    for cli in [before, after] {
        assert!(cli.json);
        assert_eq!(cli.agent, "h:1");
        assert!(matches!(cli.command, Command::Host(HostCommand::Show)));
    }
}

#[test]
fn create_with_disks_nics_and_labels() {
    let s = spec(&[
        "--disk",
        "pdisk:web1-root",
        "--disk",
        "file:images/seed.iso,ro",
        "--nic",
        "bridge=br0,mac=52:54:00:AB:cd:01,vlan=20,ip=10.0.0.5,ip=2001:db8::5",
        "--nic",
        "default",
        "--label",
        "app=web",
    ])
    .unwrap();
    assert_eq!(s.name, "web1");
    assert_eq!(s.vcpus, 2);
    assert_eq!(s.memory_bytes, 512 << 20);
    assert_eq!(
        s.disks[0].source,
        Some(disk_spec::Source::PdiskVolume("web1-root".into()))
    );
    assert_eq!(s.disks[0].boot_index, 1, "the first disk boots by default");
    assert_eq!(
        s.disks[1].source,
        Some(disk_spec::Source::File("/home/op/images/seed.iso".into()))
    );
    assert!(s.disks[1].read_only);
    assert_eq!(s.disks[1].boot_index, 0);
    assert_eq!(s.nics[0].bridge, "br0");
    assert_eq!(s.nics[0].mac, "52:54:00:ab:cd:01");
    assert_eq!(s.nics[0].vlan, 20);
    assert_eq!(s.nics[0].ips, ["10.0.0.5", "2001:db8::5"]);
    assert_eq!(s.nics[1], NicSpec::default());
    assert_eq!(s.labels["app"], "web");
    assert!(s.kernel.is_none());
}

#[test]
fn explicit_boot_indices_replace_the_default() {
    let s = spec(&["--disk", "file:/a.img", "--disk", "pdisk:b,boot=1,ro"]).unwrap();
    assert_eq!(s.disks[0].boot_index, 0);
    assert_eq!(s.disks[1].boot_index, 1);
    assert!(s.disks[1].read_only);
    let err = spec(&["--disk", "pdisk:a,boot=2", "--disk", "pdisk:b,boot=2"]).unwrap_err();
    assert_eq!(err, "boot=2 is given to more than one disk");
}

#[test]
fn kernel_boot_needs_no_disk() {
    let s = spec(&[
        "--kernel",
        "vmlinuz",
        "--initrd",
        "/boot/initrd.img",
        "--cmdline",
        "console=ttyS0 quiet",
        "--disk",
        "pdisk:data",
    ])
    .unwrap();
    let k = s.kernel.unwrap();
    assert_eq!(k.kernel, "/home/op/vmlinuz");
    assert_eq!(k.initrd, "/boot/initrd.img");
    assert_eq!(k.cmdline, "console=ttyS0 quiet");
    assert_eq!(s.disks[0].boot_index, 1);
    assert_eq!(
        spec(&[]).unwrap_err(),
        "nothing to boot: give a --disk or a --kernel"
    );
    assert_eq!(
        fails(&["vm", "create", "a", "--vcpus", "1", "--memory", "1G", "--initrd", "/i"]).kind(),
        ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn memory_is_rounded_up_and_at_least_16m() {
    assert_eq!(
        create(&["--memory", "1.5G"]).unwrap().memory,
        ByteSize(1536 << 20)
    );
    assert_eq!(
        create(&["--memory", "16777217"]).unwrap().memory,
        ByteSize(17 << 20)
    );
    let err = fails(&["vm", "create", "a", "--vcpus", "1", "--memory", "8M"]);
    assert_eq!(err.kind(), ErrorKind::ValueValidation);
    assert!(
        err.to_string()
            .contains("memory 8M is too small: at least 16M"),
        "{err}"
    );
}

#[test]
fn bad_create_arguments_are_usage_errors() {
    for (args, words) in [
        (&["--vcpus", "0"][..], "0 is not in 1..=255"),
        (&["--vcpus", "256"], "256 is not in 1..=255"),
        (&["--memory", "lots"], "invalid size"),
        (&["--disk", "db1"], "has no source"),
        (&["--disk", "iscsi:x"], "unknown disk source \"iscsi\""),
        (
            &["--disk", "pdisk:DB1"],
            "is neither a UUID nor a valid name",
        ),
        (&["--disk", "pdisk:"], "is neither a UUID nor a valid name"),
        (&["--disk", "file:"], "the path is empty"),
        (&["--disk", "file:../x.img"], "may not contain '..'"),
        (&["--disk", "pdisk:a,rw"], "unknown disk option \"rw\""),
        (&["--disk", "pdisk:a,ro,ro"], "\"ro\" is given twice"),
        (&["--disk", "pdisk:a,boot=0"], "boot=0: the boot index"),
        (&["--disk", "pdisk:a,boot=x"], "boot=x: the boot index"),
        (
            &["--disk", "pdisk:a,boot"],
            "disk option \"boot\" needs a value: boot=N",
        ),
        (&["--disk", "pdisk:a,ro=1"], "\"ro\" takes no value"),
        (&["--nic", "br0"], "is not KEY=VALUE"),
        (
            &["--nic", "bridge=br0,bridge=br1"],
            "\"bridge\" is given twice",
        ),
        (&["--nic", "bridge=a/b"], "not a valid interface name"),
        (
            &["--nic", "bridge=a-very-long-bridge"],
            "not a valid interface name",
        ),
        (&["--nic", "mac=52:54:00:12:34"], "MAC"),
        (&["--nic", "mac=52:54:00:12:34:5g"], "MAC"),
        (&["--nic", "mac=01:00:5e:00:00:01"], "multicast"),
        (&["--nic", "mac=00:00:00:00:00:00"], "not a NIC address"),
        (
            &["--nic", "vlan=0"],
            "vlan=0: the VLAN tag is a number from 1 to 4094",
        ),
        (&["--nic", "vlan=4095"], "vlan=4095"),
        (&["--nic", "speed=10"], "unknown NIC option \"speed\""),
        (
            &["--nic", "ip=10.0.0"],
            "ip=10.0.0: not an IPv4 or IPv6 address",
        ),
        (&["--nic", "ip=224.0.0.1"], "not a unicast host address"),
        (&["--nic", ""], "empty NIC"),
        (&["--label", "novalue"], "expected key=value"),
        (&["--kernel", "/a,b"], "may not contain ','"),
    ] {
        let err = create(args).expect_err(&format!("{args:?} should be refused"));
        assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}: {err}");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(words), "{args:?}: {err}");
    }
    let err = fails(&["vm", "create", "Web1", "--vcpus", "1", "--memory", "1G"]);
    assert_eq!(err.kind(), ErrorKind::ValueValidation);
    assert_eq!(
        fails(&["vm", "create", "web1", "--memory", "1G"]).kind(),
        ErrorKind::MissingRequiredArgument
    );
}

#[test]
fn checks_across_arguments() {
    let err = spec(&["--disk", "pdisk:a", "--label", "k=1", "--label", "k=2"]).unwrap_err();
    assert!(err.contains("more than once"), "{err}");
    let err = spec(&[
        "--disk",
        "pdisk:a",
        "--nic",
        "mac=52:54:00:00:00:01",
        "--nic",
        "bridge=br1,mac=52:54:00:00:00:01",
    ])
    .unwrap_err();
    assert_eq!(err, "MAC 52:54:00:00:00:01 is given to more than one NIC");
    let many: Vec<String> = (0..17).map(|i| format!("--disk=pdisk:d{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert!(spec(&many).unwrap_err().contains("at most 16"));
}

#[test]
fn contextualization_reads_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2 op@example";
    std::fs::write(
        dir.path().join("keys"),
        format!("# mine\n{key}\r\n\n  {key}2  \n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("more.pub"), format!("{key}3\n")).unwrap();
    std::fs::write(
        dir.path().join("ud.yaml"),
        "#cloud-config\nruncmd: [true]\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("net.yaml"), "version: 2\n").unwrap();
    let s = create(&[
        "--kernel",
        "/k",
        "--hostname",
        "app1.example.org",
        "--ssh-key-file",
        "keys",
        "--ssh-key-file",
        "more.pub",
        "--user-data-file",
        "ud.yaml",
        "--network-config-file",
        &dir.path().join("net.yaml").display().to_string(),
    ])
    .unwrap()
    .spec(dir.path())
    .unwrap();
    let c = s.context.unwrap();
    assert_eq!(c.hostname, "app1.example.org");
    assert_eq!(
        c.ssh_keys,
        [key.to_string(), format!("{key}2"), format!("{key}3")]
    );
    assert_eq!(c.user_data, "#cloud-config\nruncmd: [true]\n");
    assert_eq!(c.network_config, "version: 2\n");

    // Without any of these options, no seed; with any, a seed.
    assert!(spec(&["--kernel", "/k"]).unwrap().context.is_none());
    let c = create(&["--kernel", "/k", "--user-data-file", "ud.yaml"])
        .unwrap()
        .spec(dir.path())
        .unwrap()
        .context
        .unwrap();
    assert_eq!(c.hostname, "", "the agent names the guest after the VM");
    assert!(c.ssh_keys.is_empty());
}

#[test]
fn bad_contextualization_is_refused_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("priv"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("empty"), "# nothing\n").unwrap();
    std::fs::write(dir.path().join("bin"), b"\xff\xfe").unwrap();
    std::fs::write(dir.path().join("nul"), "a\0b").unwrap();
    std::fs::write(dir.path().join("blank"), "").unwrap();
    let with = |extra: &[&str]| {
        let mut args = vec!["--kernel", "/k"];
        args.extend_from_slice(extra);
        create(&args).unwrap().spec(dir.path()).unwrap_err()
    };
    for (args, words) in [
        (&["--ssh-key-file", "priv"][..], "priv:1: ssh key"),
        (&["--ssh-key-file", "empty"], "holds no key"),
        (
            &["--ssh-key-file", "missing"],
            "cannot read --ssh-key-file missing",
        ),
        (&["--user-data-file", "bin"], "is not UTF-8 text"),
        (&["--user-data-file", "nul"], "NUL"),
        (
            &["--network-config-file", "blank"],
            "--network-config-file blank is empty",
        ),
    ] {
        let err = with(args);
        assert!(err.contains(words), "{args:?}: {err}");
    }
    for bad in ["-x", "a..b", "web_1", "a b"] {
        let flag = format!("--hostname={bad}");
        let err = create(&["--kernel", "/k", &flag]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
        assert!(err.to_string().contains("hostname"), "{err}");
    }
    // The VM name stands in for the hostname only when it is one.
    std::fs::write(dir.path().join("ud"), "#cloud-config\n").unwrap();
    let a = parse(&[
        "vm",
        "create",
        "web_1",
        "--vcpus",
        "1",
        "--memory",
        "1G",
        "--kernel",
        "/k",
        "--user-data-file",
        "ud",
    ])
    .unwrap();
    let Command::Vm(VmCommand::Create(a)) = a.command else {
        panic!("wrong command")
    };
    let err = a.spec(dir.path()).unwrap_err();
    assert!(
        err.contains("not a valid hostname for the guest: give --hostname"),
        "{err}"
    );
    let many: Vec<String> = (0..16).map(|i| format!("--disk=pdisk:d{i}")).collect();
    let mut args: Vec<&str> = many.iter().map(String::as_str).collect();
    args.extend(["--hostname", "h"]);
    assert!(spec(&args).unwrap_err().contains("at most 15"));
}

#[test]
fn macs_print_lowercase() {
    let mac: Mac = "52:54:00:AB:CD:EF".parse().unwrap();
    assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
    assert!("52:54:00:ab:cd:ef:00".parse::<Mac>().is_err());
    assert!("5254.00ab.cdef".parse::<Mac>().is_err());
    assert!("+2:54:00:ab:cd:ef".parse::<Mac>().is_err());
}

#[test]
fn lifecycle_commands_take_a_name_or_uuid() {
    let cli = parse(&["vm", "stop", "web1", "--timeout", "30"]).unwrap();
    let Command::Vm(VmCommand::Stop { vm, timeout, force }) = cli.command else {
        panic!("wrong command")
    };
    assert_eq!((vm.as_str(), timeout, force), ("web1", 30, false));
    let cli = parse(&["vm", "stop", "web1", "--force"]).unwrap();
    assert!(matches!(
        cli.command,
        Command::Vm(VmCommand::Stop {
            timeout: 60,
            force: true,
            ..
        })
    ));
    assert_eq!(
        fails(&["vm", "stop", "web1", "--force", "--timeout", "5"]).kind(),
        ErrorKind::ArgumentConflict
    );
    assert_eq!(
        fails(&["vm", "stop", "web1", "--timeout", "0"]).kind(),
        ErrorKind::ValueValidation
    );
    let cli = parse(&["vm", "destroy", "6F9619FF-8B86-D011-B42D-00C04FC964FF"]).unwrap();
    let Command::Vm(VmCommand::Destroy { vm, timeout }) = cli.command else {
        panic!("wrong command")
    };
    assert_eq!(vm.as_str(), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
    assert_eq!(timeout, 60);
    for command in ["start", "reboot", "pause", "resume", "show", "console"] {
        assert!(parse(&["vm", command, "web1"]).is_ok(), "{command}");
        assert_eq!(
            fails(&["vm", command, "../x"]).kind(),
            ErrorKind::ValueValidation
        );
        assert_eq!(
            fails(&["vm", command]).kind(),
            ErrorKind::MissingRequiredArgument
        );
    }
    assert!(matches!(
        parse(&["vm", "console", "web1", "-f"]).unwrap().command,
        Command::Vm(VmCommand::Console { follow: true, .. })
    ));
}

const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn image_disk(spec: &str) -> Result<DiskArg, String> {
    spec.parse()
}

#[test]
fn image_disks_parse_with_their_options() {
    let upper = SHA.to_ascii_uppercase();
    let s = spec(&[
        "--disk",
        &format!("image:https://images.example/debian-12.qcow2?v=2&x=1,sha256={upper}"),
        "--disk",
        &format!(
            "image:file:///srv/images/my%2Cdisk.img,sha256={SHA},size=1.5G,local,ro,boot=2,\
                 format=qcow2,endorser=ops@example.org"
        ),
        "--disk",
        "pdisk:data",
    ])
    .unwrap();
    let d = &s.disks[0];
    let Some(disk_spec::Source::Image(i)) = &d.source else {
        panic!("not an image: {d:?}")
    };
    assert_eq!(i.url, "https://images.example/debian-12.qcow2?v=2&x=1");
    assert_eq!(i.sha256, SHA, "kept lowercase");
    assert_eq!(i.format(), ImageFormat::Auto);
    assert_eq!(i.endorser, "");
    assert_eq!(d.size_bytes, 0, "the image's own size");
    assert_eq!(d.persistence(), DiskPersistence::Clone, "clone by default");
    assert!(!d.read_only);
    assert_eq!(d.boot_index, 0, "boot=2 on another disk: no default");

    let d = &s.disks[1];
    let Some(disk_spec::Source::Image(i)) = &d.source else {
        panic!("not an image: {d:?}")
    };
    assert_eq!(i.url, "file:///srv/images/my%2Cdisk.img", "sent as given");
    assert_eq!(i.format(), ImageFormat::Qcow2);
    assert_eq!(i.endorser, "ops@example.org");
    assert_eq!(d.size_bytes, 1536 << 20);
    assert_eq!(d.persistence(), DiskPersistence::Local);
    assert!(d.read_only);
    assert_eq!(d.boot_index, 2);

    // Alone, an image disk boots; sizes round up to a whole MiB.
    let s = spec(&[
        "--disk",
        &format!("image:http://127.0.0.1:8080/a.raw,size=1000001,sha256={SHA},format=raw"),
    ])
    .unwrap();
    assert_eq!(s.disks[0].boot_index, 1);
    assert_eq!(s.disks[0].size_bytes, 1 << 20);
    let Some(disk_spec::Source::Image(i)) = &s.disks[0].source else {
        panic!("not an image")
    };
    assert_eq!(i.format(), ImageFormat::Raw);

    let arg = image_disk(&format!("image:https://h/a.img,sha256={SHA},local")).unwrap();
    let DiskSource::Image(image) = arg.source else {
        panic!("not an image")
    };
    assert!(image.local);
    assert_eq!(image.size, None);
    assert_eq!(image.image.sha256().as_str(), SHA);
}

#[test]
fn bad_image_disks_are_usage_errors() {
    let sha = format!("sha256={SHA}");
    for (disk, words) in [
        ("image:".to_owned(), "the image disk has no URL"),
        ("image:https://h/a.img".to_owned(), "sha256=HEX is required"),
        (
            format!("image:https://h/a.img,sha256={}", &SHA[1..]),
            "expected 64 hex digits",
        ),
        (
            format!("image:https://h/a.img,sha256={}g", &SHA[1..]),
            "expected 64 hex digits",
        ),
        (
            "image:https://h/a.img,sha256".to_owned(),
            "\"sha256\" needs a value: sha256=HEX",
        ),
        (format!("image:ftp://h/a.img,{sha}"), "scheme \"ftp\""),
        (format!("image:/srv/a.img,{sha}"), "not a URL"),
        (format!("image:file://srv/a.img,{sha}"), "absolute path"),
        (format!("image:file:///srv/../a.img,{sha}"), "`..`"),
        (
            format!("image:http://u:p@h/a.img,{sha}"),
            "credentials in image URLs",
        ),
        (
            format!("image:https://h/a,b.img,{sha}"),
            "\"b.img\" looks like the rest of the image URL: \
                 an image URL in --disk cannot contain ',': write it as %2C",
        ),
        (
            format!("image:https://h/a?x=1,y=2,{sha}"),
            "unknown disk option \"y=2\": expected sha256=HEX, size=SIZE, local",
        ),
        (
            format!("image:https://h/a,{sha},size=0"),
            "size=0: size must be greater than 0",
        ),
        (
            format!("image:https://h/a,{sha},size=lots"),
            "size=lots: invalid size",
        ),
        (
            format!("image:https://h/a,{sha},format=vhd"),
            "image format \"vhd\": expected raw, qcow2 or auto",
        ),
        (
            format!("image:https://h/a,{sha},format="),
            "\"format\" needs a value",
        ),
        (
            format!("image:https://h/a,{sha},local=yes"),
            "\"local\" takes no value",
        ),
        (
            format!("image:https://h/a,{sha},{sha}"),
            "\"sha256\" is given twice",
        ),
        (
            format!("image:https://h/a,{sha},local,local"),
            "\"local\" is given twice",
        ),
        (
            format!("image:https://h/a,{sha},boot=0"),
            "boot=0: the boot index",
        ),
        (
            "pdisk:a,size=1G".to_owned(),
            "disk option \"size\" is only for image disks",
        ),
        (
            format!("file:/a.img,{sha}"),
            "disk option \"sha256\" is only for image disks",
        ),
        (
            "pdisk:a,local".to_owned(),
            "\"local\" is only for image disks",
        ),
        ("img:https://h/a".to_owned(), "unknown disk source \"img\""),
    ] {
        let err = create(&["--disk", &disk]).expect_err(&format!("{disk:?} should be refused"));
        assert_eq!(err.kind(), ErrorKind::ValueValidation, "{disk:?}: {err}");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(words), "{disk:?}: {err}");
    }
    // The endorser is checked by the agent's rules too.
    let err = image_disk(&format!("image:https://h/a,{sha},endorser=a\tb")).unwrap_err();
    assert!(err.contains("endorser"), "{err}");
}

#[test]
fn image_pull_builds_the_request() {
    let cli = parse(&[
        "image",
        "pull",
        "https://images.example/a.qcow2",
        "--sha256",
        &SHA.to_ascii_uppercase(),
        "--format",
        "qcow2",
        "--endorser",
        "ops",
        "--pdisk",
    ])
    .unwrap();
    let Command::Image(ImageCommand::Pull(a)) = cli.command else {
        panic!("wrong command")
    };
    let r = a.request().unwrap();
    assert!(r.to_pdisk);
    let i = r.image.unwrap();
    assert_eq!(i.url, "https://images.example/a.qcow2");
    assert_eq!(i.sha256, SHA);
    assert_eq!(i.format(), ImageFormat::Qcow2);
    assert_eq!(i.endorser, "ops");

    let cli = parse(&["image", "pull", "file:///srv/a.img", "--sha256", SHA]).unwrap();
    let Command::Image(ImageCommand::Pull(a)) = cli.command else {
        panic!("wrong command")
    };
    let r = a.request().unwrap();
    assert!(!r.to_pdisk);
    assert_eq!(r.image.unwrap().format(), ImageFormat::Auto);

    let cli = parse(&[
        "image",
        "pull",
        "http://h/a",
        "--sha256",
        SHA,
        "--endorser",
        "a\nb",
    ])
    .unwrap();
    let Command::Image(ImageCommand::Pull(a)) = cli.command else {
        panic!("wrong command")
    };
    assert!(a.request().unwrap_err().contains("endorser"));

    for (args, kind, words) in [
        (
            &["image", "pull", "ftp://h/a", "--sha256", SHA][..],
            ErrorKind::ValueValidation,
            "scheme \"ftp\"",
        ),
        (
            &["image", "pull", "file://rel/a", "--sha256", SHA],
            ErrorKind::ValueValidation,
            "absolute path",
        ),
        (
            &["image", "pull", "http://h/a", "--sha256", "abc"],
            ErrorKind::ValueValidation,
            "expected 64 hex digits",
        ),
        (
            &[
                "image",
                "pull",
                "http://h/a",
                "--sha256",
                SHA,
                "--format",
                "vmdk",
            ],
            ErrorKind::ValueValidation,
            "expected raw, qcow2 or auto",
        ),
        (
            &["image", "pull", "http://h/a"],
            ErrorKind::MissingRequiredArgument,
            "--sha256",
        ),
    ] {
        let err = fails(args);
        assert_eq!(err.kind(), kind, "{args:?}: {err}");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(words), "{args:?}: {err}");
    }
}

#[test]
fn image_list_and_rm() {
    assert!(matches!(
        parse(&["image", "list"]).unwrap().command,
        Command::Image(ImageCommand::List)
    ));
    let rm = |args: &[&str]| {
        let mut all = vec!["image", "rm"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Command::Image(ImageCommand::Rm(a)) => a,
            other => panic!("wrong command {other:?}"),
        }
    };
    let a = rm(&[&SHA.to_ascii_uppercase()]);
    assert_eq!(a.sha256, SHA);
    assert_eq!(a.caches(), (true, true), "neither flag: both caches");
    assert_eq!(rm(&[SHA, "--local"]).caches(), (true, false));
    assert_eq!(rm(&[SHA, "--pdisk"]).caches(), (false, true));
    assert_eq!(rm(&[SHA, "--local", "--pdisk"]).caches(), (true, true));
    assert_eq!(a.whole(), Some(SHA));
    let prefix = rm(&["9F86D081"]);
    assert_eq!(prefix.sha256, "9f86d081", "a prefix");
    assert_eq!(prefix.whole(), None);
    let other = format!("9f86d081{}", &SHA[..56]);
    let listed = [SHA, "0123456789abcdef", SHA, other.as_str()];
    assert_eq!(prefix.matching(listed), [SHA.to_owned(), other.clone()]);
    assert_eq!(rm(&["9f86d0818"]).matching(listed), [SHA]);
    assert!(rm(&["abcdef01"]).matching(listed).is_empty());
    for bad in ["9f86d08", "xyz12345", &format!("{SHA}0")] {
        let err = fails(&["image", "rm", bad]);
        assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}");
        assert!(err.to_string().contains("8 to 64 hex digits"), "{err}");
    }
    assert_eq!(
        fails(&["image", "rm"]).kind(),
        ErrorKind::MissingRequiredArgument
    );
    assert_eq!(fails(&["image"]).exit_code(), 2);
}

#[test]
fn events_replay_by_default() {
    let cli = parse(&["events"]).unwrap();
    let Command::Events(e) = cli.command else {
        panic!("wrong command")
    };
    assert_eq!((e.since, e.vm, e.follow), (0, None, false));
    let cli = parse(&["events", "--since", "42", "--vm", "web1", "--follow"]).unwrap();
    let Command::Events(e) = cli.command else {
        panic!("wrong command")
    };
    assert_eq!(e.since, 42);
    assert_eq!(e.vm.unwrap().as_str(), "web1");
    assert!(e.follow);
    assert_eq!(
        fails(&["events", "--since", "-1"]).kind(),
        ErrorKind::UnknownArgument
    );
}

#[test]
fn missing_subcommand_is_a_usage_error() {
    assert_eq!(fails(&["vm"]).exit_code(), 2);
    assert_eq!(fails(&["host"]).exit_code(), 2);
}

#[test]
fn save_takes_a_disk_and_an_image_name() {
    let cli = parse(&["vm", "save", "web1", "--image", "web1-golden", "--wait"]).unwrap();
    let Command::Vm(VmCommand::Save {
        vm,
        disk,
        image,
        wait,
    }) = cli.command
    else {
        panic!("wrong command")
    };
    assert_eq!(
        (vm.as_str(), disk.as_str(), image.as_str(), wait),
        ("web1", "vda", "web1-golden", true)
    );
    assert!(parse(&["vm", "save", "web1", "--image", "Bad Name"]).is_err());
    assert!(parse(&["vm", "save", "web1"]).is_err());
}

#[test]
fn usage_times_are_unix_seconds_or_rfc3339_and_apel_is_the_default() {
    let Command::Usage(a) = parse(&[
        "usage",
        "--since",
        "1764590000",
        "--until",
        "2026-12-02T00:00:00Z",
    ])
    .unwrap()
    .command
    else {
        panic!("not usage")
    };
    assert_eq!(a.since, Some(1_764_590_000));
    assert_eq!(a.until, Some(1_796_169_600));
    assert_eq!(a.format, UsageFormat::Apel);
    fails(&["usage", "--since", "yesterday"]);
    fails(&["usage", "--format", "xml"]);
    let Command::Usage(a) = parse(&["usage", "--format", "csv", "--vm", "web1"])
        .unwrap()
        .command
    else {
        panic!("not usage")
    };
    assert_eq!(
        (a.format, a.vm.unwrap().to_string()),
        (UsageFormat::Csv, "web1".to_string())
    );
}

#[test]
fn pdisk_disks_name_their_server() {
    let s = spec(&[
        "--disk",
        "pdisk:store-b/web1-root",
        "--disk",
        "pdisk:web1-data",
        "--disk",
        &format!("image:https://h/a.img,sha256={SHA},server=store-b"),
    ])
    .unwrap();
    let servers: Vec<&str> = s.disks.iter().map(|d| d.server.as_str()).collect();
    assert_eq!(servers, ["store-b", "", "store-b"]);
    assert_eq!(
        s.disks[0].source,
        Some(disk_spec::Source::PdiskVolume("web1-root".into()))
    );
    for (disk, words) in [
        ("pdisk:Store/x".to_owned(), "pdisk server name \"Store\""),
        ("pdisk:/x".to_owned(), "pdisk server name \"\""),
        ("pdisk:b/".to_owned(), "pdisk volume \"\""),
        (
            format!("image:https://h/a.img,sha256={SHA},local,server=b"),
            "server= is for clone disks",
        ),
        ("file:/a.img,server=b".to_owned(), "only for image disks"),
    ] {
        let e = image_disk(&disk).unwrap_err();
        assert!(e.contains(words), "{disk}: {e}");
    }
}
