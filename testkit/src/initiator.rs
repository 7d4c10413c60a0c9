//! QEMU's iSCSI initiator (`qemu-io`) against an export ([`Initiator`]).

use std::path::PathBuf;
use std::process::Command;

use crate::{open_iscsi, stack_kind, StackKind};

/// QEMU's iSCSI initiator (libiscsi inside qemu-io), logging in as `initiator`.
pub struct Initiator {
    pub portal: String,
    pub target: String,
    pub name: String,
    /// (user, file holding the secret)
    pub chap: Option<(String, PathBuf)>,
}

impl Initiator {
    pub fn new(portal: &str, target: &str, name: &str) -> Initiator {
        Initiator {
            portal: portal.into(),
            target: target.into(),
            name: name.into(),
            chap: None,
        }
    }

    fn image_opts(&self) -> String {
        let mut o = format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun=1,initiator-name={}",
            self.portal, self.target, self.name
        );
        if let Some((user, _)) = &self.chap {
            o.push_str(&format!(",user={user},password-secret=sec0"));
        }
        o
    }

    /// Runs qemu-io commands; Ok(stdout) when every command succeeded.
    /// On the lvm-lio stack (the lab VM) the kernel's initiator logs in and
    /// qemu-io works on the block device; elsewhere qemu-io logs in itself.
    pub fn io(&self, cmds: &[&str]) -> Result<String, String> {
        if stack_kind() == StackKind::LvmLio {
            return self.kernel_io(cmds);
        }
        let mut c = Command::new("qemu-io");
        if let Some((_, file)) = &self.chap {
            c.arg("--object")
                .arg(format!("secret,id=sec0,file={}", file.display()));
        }
        c.arg("--image-opts");
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        c.arg(self.image_opts());
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let failed = !out.status.success()
            || stdout.contains("Pattern verification failed")
            || stdout.contains("failed:")
            || stderr.contains("can't open");
        if failed {
            Err(format!("{stdout}{stderr}"))
        } else {
            Ok(stdout)
        }
    }

    /// Logs in with open-iscsi (an iface per initiator name, so ACLs see
    /// this name), runs qemu-io with O_DIRECT on the LUN's block device, and
    /// logs out again whatever happened, leaving no session, node record or
    /// pending udev removal for the next call (see [`open_iscsi`]).
    fn kernel_io(&self, cmds: &[&str]) -> Result<String, String> {
        let node = open_iscsi::KernelNode {
            iface: format!("st{:x}", fnv(&self.name)),
            initiator: &self.name,
            target: &self.target,
            portal: &self.portal,
        };
        // A session of ours here would be a leftover: the login below must
        // be the only way one exists, so that its 15 can be trusted.
        if node.has_session()? {
            node.log_out_and_forget()?;
        }
        let secret;
        let mut settings = vec![
            ("node.session.initial_login_retry_max", "1"),
            ("node.conn[0].timeo.login_timeout", "5"),
        ];
        if let Some((user, file)) = &self.chap {
            secret = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
            settings.push(("node.session.auth.authmethod", "CHAP"));
            settings.push(("node.session.auth.username", user));
            settings.push(("node.session.auth.password", secret.trim()));
        }
        let result = node.create(&settings).and_then(|()| {
            node.login()?;
            let dev = node.wait_device(1)?;
            let mut c = Command::new("qemu-io");
            c.args(["-n", "-f", "raw"]);
            for cmd in cmds {
                c.arg("-c").arg(cmd);
            }
            let out = c.arg(&dev).output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success()
                || stdout.contains("Pattern verification failed")
                || stdout.contains("failed:")
                || stderr.contains("can't open")
            {
                Err(format!("{stdout}{stderr}"))
            } else {
                Ok(stdout)
            }
        });
        match (result, node.log_out_and_forget()) {
            (r, Ok(())) => r,
            (Ok(_), Err(e)) => Err(format!("cleanup after the I/O: {e}")),
            (Err(r), Err(e)) => Err(format!("{r}\n(and the cleanup: {e})")),
        }
    }

    /// The LUN's size in bytes as the initiator sees it.
    pub fn length(&self) -> Result<u64, String> {
        let out = self.io(&["length"])?;
        // qemu-io prints e.g. "128 MiB" or "1 GiB"
        let t = out.trim();
        let (n, unit) = t
            .split_once(' ')
            .ok_or(format!("odd length output {t:?}"))?;
        let n: f64 = n.parse().map_err(|_| format!("odd length output {t:?}"))?;
        let mult = match unit {
            "bytes" => 1u64,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            _ => return Err(format!("odd length output {t:?}")),
        };
        Ok((n * mult as f64) as u64)
    }
}

/// A short stable hash of a name (FNV-1a), for interface names.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
