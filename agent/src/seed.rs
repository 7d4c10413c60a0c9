//! The cloud-init NoCloud seed: a small FAT12 image labelled `CIDATA` that
//! holds `meta-data`, `user-data` and, when given, `network-config`. The
//! agent builds it in process with `fatfs` (no mkfs or mtools at run time)
//! in the guest's directory at every start and attaches it read-only as the
//! guest's last virtio disk.
//!
//! What must hold:
//! - Every value that lands in a YAML document we write (instance-id,
//!   hostname, SSH keys) is checked here first and written as a
//!   double-quoted scalar; control characters are refused, so no input can
//!   add keys, list items or documents to `meta-data`.
//! - `user-data` and `network-config` are the caller's own documents: they
//!   are copied as they are, within size limits that keep the worst case
//!   well inside the image.
//! - The label is in the boot sector (what blkid and the test guest read)
//!   and in a root-directory volume-label entry (what Windows, mtools and
//!   fsck read), so every reader agrees it is `CIDATA`.

use std::io::{Cursor, Write};
use std::path::Path;
use std::time::SystemTime;

use stratus_core::error::{Error, Result};

/// The image: 2 MiB of FAT12 with 1 KiB clusters (about 2000 of them), and
/// a sparse file on disk.
pub const SEED_BYTES: usize = 2 << 20;
/// The worst case (all limits reached, keys written twice) is about 1.3 MiB.
pub const MAX_USER_DATA: usize = 1 << 20;
pub const MAX_NETWORK_CONFIG: usize = 64 << 10;
pub const MAX_SSH_KEYS: usize = 32;
/// An RSA-16384 key is about 2.8 KB; certificates are longer.
pub const MAX_SSH_KEY: usize = 8 << 10;
const MAX_INSTANCE_ID: usize = 255;
const MAX_HOSTNAME: usize = 253;
const MAX_LABEL: usize = 63;

/// The volume label cloud-init and the test guest look for, padded to 11.
const LABEL: [u8; 11] = *b"CIDATA     ";

/// The user-data a guest gets when the spec gives none and no SSH keys.
pub const DEFAULT_USER_DATA: &str = "#cloud-config\n{}\n";

/// What one guest's seed says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// NoCloud's instance-id: the VM UUID, so cloud-init treats a new VM
    /// as a new instance and a restart as the same one.
    pub instance_id: String,
    /// `local-hostname`: RFC 1123, see [`check_hostname`].
    pub hostname: String,
    /// The whole user-data document; `None` (or empty): a `#cloud-config`
    /// that only installs `ssh_keys`, or does nothing.
    pub user_data: Option<String>,
    /// A cloud-init network-config document (v1 or v2), copied as given.
    pub network_config: Option<String>,
    /// OpenSSH public keys, one line each: meta-data `public-keys` (the
    /// default user gets them), and in the default user-data.
    pub ssh_keys: Vec<String>,
}

/// Checks a hostname: dot-separated labels of ASCII letters, digits and
/// '-', each 1 to 63 long and neither starting nor ending with '-'; at most
/// 253 in all (RFC 1123).
pub fn check_hostname(h: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(format!(
            "hostname {h:?} {why}: a hostname is labels of letters, digits and '-' \
             joined by '.', each label 1 to {MAX_LABEL} long and not starting or \
             ending with '-', {MAX_HOSTNAME} characters at most"
        )))
    };
    if h.is_empty() {
        return bad("is empty");
    }
    if h.len() > MAX_HOSTNAME {
        return bad("is too long");
    }
    for label in h.split('.') {
        if label.is_empty() {
            return bad("has an empty label");
        }
        if label.len() > MAX_LABEL {
            return bad("has a label that is too long");
        }
        if !label
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return bad("has a character that is not a letter, digit, '-' or '.'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("has a label that starts or ends with '-'");
        }
    }
    Ok(())
}

/// Characters that YAML or a terminal could take as structure: control
/// characters (C0, DEL, C1 including NEL) and the Unicode line and
/// paragraph separators, which YAML 1.1 parsers treat as line breaks.
fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// Shows at most the start of a long value in a message.
fn shown(s: &str) -> String {
    let short: String = s.chars().take(40).collect();
    if short.len() < s.len() {
        format!("{short:?}...")
    } else {
        format!("{short:?}")
    }
}

/// Checks one SSH public key as authorized_keys holds it: one line, no
/// control characters, and a key type among its fields (`ssh-ed25519
/// AAAA... comment`, options allowed before it), so that a private key or a
/// stray file is refused here rather than ignored by the guest.
pub fn check_ssh_key(key: &str) -> Result<()> {
    let k = key.trim();
    if k.is_empty() {
        return Err(Error::invalid("ssh key is empty"));
    }
    if k.contains(['\n', '\r']) {
        return Err(Error::invalid(format!(
            "ssh key {} spans several lines: give each key as one line",
            shown(k)
        )));
    }
    if k.len() > MAX_SSH_KEY {
        return Err(Error::invalid(format!(
            "ssh key {} is longer than {MAX_SSH_KEY} bytes",
            shown(k)
        )));
    }
    if k.chars().any(is_unsafe) {
        return Err(Error::invalid(format!(
            "ssh key {} contains a control character",
            shown(k)
        )));
    }
    const TYPES: [&str; 3] = ["ssh-", "ecdsa-sha2-", "sk-"];
    let typed = k
        .split_whitespace()
        .any(|f| TYPES.iter().any(|t| f.starts_with(t)));
    if !typed || k.split_whitespace().count() < 2 {
        return Err(Error::invalid(format!(
            "ssh key {} is not an OpenSSH public key line (TYPE BASE64 [COMMENT], \
             e.g. ssh-ed25519 AAAA... user@host)",
            shown(k)
        )));
    }
    Ok(())
}

/// Checks a document copied into the seed as it is: size and no NUL (the
/// files are text).
pub fn check_document(what: &str, text: &str, limit: usize) -> Result<()> {
    if text.len() > limit {
        return Err(Error::invalid(format!(
            "{what} is {} bytes; at most {limit}",
            text.len()
        )));
    }
    if text.contains('\0') {
        return Err(Error::invalid(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

/// Checks a list of SSH keys: how many, then each.
pub fn check_ssh_keys(keys: &[String]) -> Result<()> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(Error::invalid(format!(
            "{} ssh keys: at most {MAX_SSH_KEYS}",
            keys.len()
        )));
    }
    keys.iter().try_for_each(|k| check_ssh_key(k))
}

impl Seed {
    /// Refuses anything that could not be written safely (InvalidArgument).
    pub fn validate(&self) -> Result<()> {
        let id = &self.instance_id;
        if id.is_empty() || id.len() > MAX_INSTANCE_ID || id.chars().any(is_unsafe) {
            return Err(Error::invalid(format!(
                "instance-id {} must be 1 to {MAX_INSTANCE_ID} bytes without control characters",
                shown(id)
            )));
        }
        check_hostname(&self.hostname)?;
        check_ssh_keys(&self.ssh_keys)?;
        if let Some(u) = &self.user_data {
            check_document("user-data", u, MAX_USER_DATA)?;
        }
        if let Some(n) = &self.network_config {
            check_document("network-config", n, MAX_NETWORK_CONFIG)?;
        }
        Ok(())
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.ssh_keys.iter().map(|k| k.trim())
    }

    /// NoCloud meta-data: instance-id, local-hostname and, with keys, the
    /// `public-keys` list cloud-init gives the default user.
    pub fn meta_data(&self) -> String {
        let mut s = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            yaml_str(&self.instance_id),
            yaml_str(&self.hostname)
        );
        if !self.ssh_keys.is_empty() {
            s.push_str("public-keys:\n");
            for k in self.keys() {
                s.push_str(&format!("  - {}\n", yaml_str(k)));
            }
        }
        s
    }

    /// The user-data document: the caller's, else a `#cloud-config` that
    /// authorizes the SSH keys, else one that does nothing.
    pub fn user_data(&self) -> String {
        match &self.user_data {
            Some(u) if !u.is_empty() => u.clone(),
            _ if !self.ssh_keys.is_empty() => {
                let mut s = String::from("#cloud-config\nssh_authorized_keys:\n");
                for k in self.keys() {
                    s.push_str(&format!("  - {}\n", yaml_str(k)));
                }
                s
            }
            _ => DEFAULT_USER_DATA.to_string(),
        }
    }

    /// The files of the seed, in the order they are written.
    pub fn files(&self) -> Vec<(&'static str, String)> {
        let mut files = vec![
            ("meta-data", self.meta_data()),
            ("user-data", self.user_data()),
        ];
        if let Some(n) = self.network_config.as_ref().filter(|n| !n.is_empty()) {
            files.push(("network-config", n.clone()));
        }
        files
    }
}

/// A YAML double-quoted scalar. Only '\' and '"' need escaping: control
/// characters were refused by [`Seed::validate`].
fn yaml_str(s: &str) -> String {
    debug_assert!(!s.chars().any(is_unsafe));
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '\\' | '"') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The FAT volume serial: from the instance-id (FNV-1a), so one guest's
/// seed keeps its serial across rebuilds and two guests' differ.
fn volume_id(instance_id: &str) -> u32 {
    instance_id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Gives files the time they were written (UTC), which fatfs would
/// otherwise leave at 0 (an invalid DOS date).
#[derive(Debug)]
struct UtcClock;

static CLOCK: UtcClock = UtcClock;

impl fatfs::TimeProvider for UtcClock {
    fn get_current_date(&self) -> fatfs::Date {
        self.get_current_date_time().date
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        dos_time(SystemTime::now())
    }
}

/// A DOS date and time (1980 to 2107, two-second steps) from `t`; humantime
/// does the calendar.
fn dos_time(t: SystemTime) -> fatfs::DateTime {
    // "YYYY-MM-DDTHH:MM:SSZ"
    let s = humantime::format_rfc3339_seconds(t).to_string();
    let n = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u16>().ok());
    let parsed = (|| {
        Some((
            n(0..4)?,
            n(5..7)?,
            n(8..10)?,
            n(11..13)?,
            n(14..16)?,
            n(17..19)?,
        ))
    })();
    let (year, month, day, hour, min, sec) = match parsed {
        Some(p) if (1980..=2107).contains(&p.0) => p,
        Some(p) if p.0 > 2107 => (2107, 12, 31, 23, 59, 58),
        _ => (1980, 1, 1, 0, 0, 0),
    };
    fatfs::DateTime {
        date: fatfs::Date { year, month, day },
        time: fatfs::Time {
            hour,
            min,
            sec,
            millis: 0,
        },
    }
}

fn fat_error(step: &str, e: std::io::Error) -> Error {
    Error::internal(format!("building the NoCloud seed: {step}: {e}"))
}

/// The seed as an image in memory: validated, formatted FAT12 with the
/// label in the boot sector and the root directory, then the files.
pub fn seed_image(seed: &Seed) -> Result<Vec<u8>> {
    seed.validate()?;
    let mut image = vec![0u8; SEED_BYTES];
    // Geometry pinned rather than guessed: FAT12, 512-byte sectors, 1 KiB
    // clusters, 512 root entries.
    let options = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat12)
        .bytes_per_sector(512)
        .bytes_per_cluster(1024)
        .max_root_dir_entries(512)
        .volume_id(volume_id(&seed.instance_id))
        .volume_label(LABEL);
    fatfs::format_volume(Cursor::new(&mut image[..]), options)
        .map_err(|e| fat_error("formatting", e))?;
    {
        let fs = fatfs::FileSystem::new(
            Cursor::new(&mut image[..]),
            fatfs::FsOptions::new().time_provider(&CLOCK),
        )
        .map_err(|e| fat_error("opening the new filesystem", e))?;
        {
            let root = fs.root_dir();
            for (name, body) in seed.files() {
                let mut f = root
                    .create_file(name)
                    .map_err(|e| fat_error(&format!("creating {name}"), e))?;
                f.write_all(body.as_bytes())
                    .and_then(|()| f.flush())
                    .map_err(|e| fat_error(&format!("writing {name}"), e))?;
            }
        }
        fs.unmount().map_err(|e| fat_error("closing", e))?;
    }
    Ok(image)
}

/// Builds the seed and writes it to `path` (mode 0600: user-data may hold
/// secrets), replacing any older one. The image is written to `path.part`
/// with its zero blocks left as holes, synced, then renamed into place, so
/// `path` is always a complete seed.
pub fn build_seed(seed: &Seed, path: &Path) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let image = seed_image(seed)?;
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = std::path::PathBuf::from(part);
    let _ = std::fs::remove_file(&part);
    let io = |e| Error::io(part.display(), e);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .map_err(io)?;
    f.set_len(image.len() as u64).map_err(io)?;
    const BLOCK: usize = 4096;
    for (i, block) in image.chunks(BLOCK).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, (i * BLOCK) as u64).map_err(io)?;
        }
    }
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&part, path).map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use stratus_core::error::ErrorKind;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2 op@example";

    fn seed() -> Seed {
        Seed {
            instance_id: "6f9619ff-8b86-d011-b42d-00c04fc964ff".into(),
            hostname: "web1".into(),
            user_data: None,
            network_config: None,
            ssh_keys: vec![],
        }
    }

    /// The files of an image, by name, and its labels (boot sector, root dir).
    fn read_back(image: &[u8]) -> (Vec<(String, String)>, String, Option<String>) {
        let fs =
            fatfs::FileSystem::new(Cursor::new(image.to_vec()), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.fat_type(), fatfs::FatType::Fat12);
        let mut files = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.unwrap();
            if e.is_file() {
                let mut text = String::new();
                e.to_file().read_to_string(&mut text).unwrap();
                files.push((e.file_name(), text));
            }
        }
        let label = fs.volume_label();
        let root_label = fs.read_volume_label_from_root_dir().unwrap();
        (files, label, root_label)
    }

    fn invalid(r: Result<impl std::fmt::Debug>) -> String {
        let e = r.expect_err("should be refused");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        e.to_string()
    }

    #[test]
    fn a_seed_reads_back_with_its_files_and_label() {
        let mut s = seed();
        s.network_config = Some("version: 2\nethernets: {}\n".into());
        s.ssh_keys = vec![KEY.into(), format!("  {KEY}2  ")];
        let image = seed_image(&s).unwrap();
        assert_eq!(image.len(), SEED_BYTES);
        // What blkid and the test guest read: the label at 43, the type at 54.
        assert_eq!(&image[43..54], b"CIDATA     ");
        assert_eq!(&image[54..59], b"FAT12");
        assert_eq!(&image[510..512], &[0x55, 0xaa]);
        let (files, label, root_label) = read_back(&image);
        assert_eq!(label, "CIDATA");
        assert_eq!(root_label.as_deref(), Some("CIDATA"));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["meta-data", "user-data", "network-config"]);
        assert_eq!(
            files[0].1,
            format!(
                "instance-id: \"6f9619ff-8b86-d011-b42d-00c04fc964ff\"\n\
                 local-hostname: \"web1\"\n\
                 public-keys:\n  - \"{KEY}\"\n  - \"{KEY}2\"\n"
            )
        );
        assert_eq!(
            files[1].1,
            format!("#cloud-config\nssh_authorized_keys:\n  - \"{KEY}\"\n  - \"{KEY}2\"\n")
        );
        assert_eq!(files[2].1, "version: 2\nethernets: {}\n");
    }

    #[test]
    fn defaults_and_given_user_data() {
        let (files, ..) = read_back(&seed_image(&seed()).unwrap());
        assert_eq!(files.len(), 2, "no network-config unless given");
        assert_eq!(
            files[0].1,
            "instance-id: \"6f9619ff-8b86-d011-b42d-00c04fc964ff\"\nlocal-hostname: \"web1\"\n"
        );
        assert_eq!(files[1].1, DEFAULT_USER_DATA);

        // Given user-data is kept as is, keys or not: the keys still reach
        // the guest through meta-data.
        let mut s = seed();
        s.user_data = Some("#!/bin/sh\necho \"hi\" > /tmp/x\n".into());
        s.ssh_keys = vec![KEY.into()];
        let (files, ..) = read_back(&seed_image(&s).unwrap());
        assert_eq!(files[1].1, "#!/bin/sh\necho \"hi\" > /tmp/x\n");
        assert!(files[0]
            .1
            .contains(&format!("public-keys:\n  - \"{KEY}\"\n")));
    }

    #[test]
    fn yaml_values_are_quoted_and_escaped() {
        assert_eq!(yaml_str("a\"b\\c: d # e"), r#""a\"b\\c: d # e""#);
        let mut s = seed();
        s.ssh_keys = vec![format!("command=\"echo \\\"x\\\"\" {KEY}")];
        assert!(s
            .meta_data()
            .contains(r#"  - "command=\"echo \\\"x\\\"\" ssh-ed25519"#));
    }

    #[test]
    fn bad_hostnames_are_refused() {
        for ok in ["a", "web-1", "Web1.example.com", "0", &"a".repeat(63)] {
            check_hostname(ok).unwrap();
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        for (bad, words) in [
            ("", "is empty"),
            ("-web", "starts or ends with '-'"),
            ("web-", "starts or ends with '-'"),
            ("a..b", "empty label"),
            ("a.", "empty label"),
            (".a", "empty label"),
            ("web_1", "not a letter"),
            ("web 1", "not a letter"),
            ("wéb", "not a letter"),
            ("a\nlocal-hostname: x", "not a letter"),
            (&"a".repeat(64), "label that is too long"),
            (&long, "is too long"),
        ] {
            let msg = invalid(check_hostname(bad));
            assert!(msg.contains(words), "{bad:?}: {msg}");
            let mut s = seed();
            s.hostname = bad.to_string();
            invalid(seed_image(&s));
        }
    }

    #[test]
    fn bad_keys_and_documents_are_refused() {
        for (key, words) in [
            ("", "empty"),
            ("   ", "empty"),
            (&format!("{KEY}\n{KEY}"), "one line"),
            (&format!("{KEY}\r\n{KEY}"), "one line"),
            ("ssh-ed25519 AAAA\u{2028}x", "control character"),
            ("ssh-ed25519 AAAA\tx", "control character"),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----",
                "not an OpenSSH public key",
            ),
            ("AAAAC3NzaC1lZDI1NTE5", "not an OpenSSH public key"),
            ("ssh-ed25519", "not an OpenSSH public key"),
            (
                &format!("ssh-rsa {}", "A".repeat(MAX_SSH_KEY)),
                "longer than",
            ),
        ] {
            let mut s = seed();
            s.ssh_keys = vec![key.to_string()];
            let msg = invalid(seed_image(&s));
            assert!(msg.contains(words), "{key:?}: {msg}");
        }
        // Surrounding whitespace (a line of a CRLF file) is trimmed, not refused.
        check_ssh_key(&format!(" {KEY}\r\n")).unwrap();
        check_ssh_key(&format!("from=\"10.0.0.0/8\" {KEY}")).unwrap();
        let mut s = seed();
        s.ssh_keys = vec![KEY.to_string(); MAX_SSH_KEYS + 1];
        assert!(invalid(seed_image(&s)).contains("at most 32"));

        let mut s = seed();
        s.user_data = Some("x".repeat(MAX_USER_DATA + 1));
        assert!(invalid(seed_image(&s)).contains("user-data is"));
        s.user_data = Some("#cloud-config\0".into());
        assert!(invalid(seed_image(&s)).contains("NUL"));
        let mut s = seed();
        s.network_config = Some("x".repeat(MAX_NETWORK_CONFIG + 1));
        assert!(invalid(seed_image(&s)).contains("network-config is"));
        let mut s = seed();
        s.instance_id = "i-1\nlocal-hostname: evil".into();
        assert!(invalid(seed_image(&s)).contains("instance-id"));
        s.instance_id = String::new();
        invalid(seed_image(&s));
    }

    #[test]
    fn the_largest_seed_fits() {
        let s = Seed {
            instance_id: "x".repeat(MAX_INSTANCE_ID),
            hostname: vec!["a".repeat(63); 3].join(".") + ".b",
            user_data: Some("u".repeat(MAX_USER_DATA)),
            network_config: Some("n".repeat(MAX_NETWORK_CONFIG)),
            ssh_keys: vec![format!("ssh-rsa {}", "A".repeat(MAX_SSH_KEY - 8)); MAX_SSH_KEYS],
        };
        let (files, ..) = read_back(&seed_image(&s).unwrap());
        assert_eq!(files[1].1.len(), MAX_USER_DATA);
        assert_eq!(files[2].1.len(), MAX_NETWORK_CONFIG);
    }

    #[test]
    fn build_seed_writes_a_sparse_private_file_in_place() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        std::fs::write(&path, b"old").unwrap();
        build_seed(&seed(), &path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), SEED_BYTES as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(meta.blocks() * 512 < SEED_BYTES as u64 / 4, "not sparse");
        assert!(!dir.path().join("seed.img.part").exists());
        let (files, label, _) = read_back(&std::fs::read(&path).unwrap());
        assert_eq!(label, "CIDATA");
        assert!(files[0].1.contains("local-hostname: \"web1\""));
        // A bad seed leaves the old file alone.
        let mut bad = seed();
        bad.hostname = "-".into();
        invalid(build_seed(&bad, &path));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEED_BYTES as u64);
    }

    #[test]
    fn files_get_a_valid_dos_time() {
        let t = dos_time(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000));
        assert_eq!((t.date.year, t.date.month, t.date.day), (2026, 11, 18));
        assert!(t.time.hour < 24 && t.time.min < 60 && t.time.sec < 60);
        let t = dos_time(SystemTime::UNIX_EPOCH);
        assert_eq!((t.date.year, t.date.month, t.date.day), (1980, 1, 1));
        let fs = fatfs::FileSystem::new(
            Cursor::new(seed_image(&seed()).unwrap()),
            fatfs::FsOptions::new(),
        )
        .unwrap();
        let e = fs.root_dir().iter().find(|e| e.as_ref().unwrap().is_file());
        let modified = e.unwrap().unwrap().modified();
        assert!(modified.date.year >= 2024, "{modified:?}");
        assert!((1..=12).contains(&modified.date.month));
    }

    #[test]
    fn volume_serials_differ_per_instance() {
        assert_ne!(volume_id("a"), volume_id("b"));
        let image = seed_image(&seed()).unwrap();
        let serial = u32::from_le_bytes(image[39..43].try_into().unwrap());
        assert_eq!(serial, volume_id(&seed().instance_id));
    }

    /// dosfstools and mtools agree the image is a clean FAT with the label
    /// and files cloud-init reads.
    #[test]
    #[ignore = "needs fsck.vfat (dosfstools) and mdir/mtype (mtools)"]
    fn dosfstools_and_mtools_accept_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let mut s = seed();
        s.ssh_keys = vec![KEY.into()];
        s.network_config = Some("version: 2\n".into());
        build_seed(&s, &path).unwrap();
        let run = |prog: &str, args: &[&str]| {
            let out = std::process::Command::new(prog)
                .args(args)
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .unwrap_or_else(|e| panic!("{prog}: {e}"));
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{prog} {args:?}: {text}");
            text
        };
        let img = path.to_str().unwrap();
        let fsck = run("fsck.vfat", &["-n", "-v", img]);
        assert!(fsck.contains("12 bit entries"), "{fsck}");
        let listing = run("mdir", &["-i", img, "::/"]);
        assert!(listing.contains("Volume in drive : is CIDATA"), "{listing}");
        for name in ["meta-data", "user-data", "network-config"] {
            assert!(listing.contains(name), "{listing}");
        }
        let md = run("mtype", &["-i", img, "::/meta-data"]);
        assert!(md.contains("local-hostname: \"web1\""), "{md}");
        if let Ok(out) = std::process::Command::new("blkid")
            .args(["-o", "export", img])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("LABEL=CIDATA"), "{text}");
            assert!(text.contains("TYPE=vfat"), "{text}");
        }
    }
}
