//! How the backend talks to Ceph: the one way to build an `rbd`/`ceph`
//! call (identity, `--format json`, timeouts), run it, read its JSON and
//! turn a failure into an error of the right kind.

use std::sync::Arc;

use serde::Deserialize;

use super::RbdBackend;
use super::{CHANGE_TIMEOUT, DATA_TIMEOUT, REPORT_TIMEOUT};
use crate::backend::ProgressFn;
use crate::error::{Error, ErrorKind, Result};
use crate::runner::{Cmd, Output};

// ---------- JSON of rbd 16.2 ----------

/// A row of `rbd ls -l --format json`: an image, or one of its snapshots.
#[derive(Debug, Deserialize)]
pub(super) struct LsRow {
    pub(super) image: String,
    #[serde(default)]
    pub(super) snapshot: Option<String>,
}

/// `rbd info --format json`.
#[derive(Debug, Deserialize)]
pub(super) struct Info {
    pub(super) size: u64,
    #[serde(default)]
    pub(super) parent: Option<ParentRef>,
    /// `layering`, `exclusive-lock`, `object-map`, ...
    #[serde(default)]
    pub(super) features: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ParentRef {
    pub(super) pool: String,
    pub(super) image: String,
}

/// `rbd du --format json`.
#[derive(Debug, Deserialize)]
pub(super) struct Du {
    pub(super) images: Vec<DuRow>,
}

#[derive(Debug, Deserialize)]
pub(super) struct DuRow {
    pub(super) name: String,
    #[serde(default)]
    pub(super) snapshot: Option<String>,
    pub(super) used_size: u64,
}

/// `rbd snap ls --format json`.
#[derive(Debug, Deserialize)]
pub(super) struct SnapRow {
    pub(super) name: String,
    #[serde(default)]
    pub(super) protected: Option<String>,
}

/// `ceph mon dump --format json` (the parts used).
#[derive(Debug, Deserialize)]
pub(super) struct MonDump {
    pub(super) fsid: String,
    pub(super) mons: Vec<MonEntry>,
}

#[derive(Debug, Deserialize)]
pub(super) struct MonEntry {
    pub(super) public_addrs: AddrVec,
}

#[derive(Debug, Deserialize)]
pub(super) struct AddrVec {
    pub(super) addrvec: Vec<MonAddr>,
}

#[derive(Debug, Deserialize)]
pub(super) struct MonAddr {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) addr: String,
}

impl MonDump {
    /// Each monitor's msgr v1 address when it has one (what every client
    /// parses unambiguously), else its v2 address.
    pub(super) fn monitors(&self) -> Vec<String> {
        self.mons
            .iter()
            .filter_map(|m| {
                let v = &m.public_addrs.addrvec;
                v.iter()
                    .find(|a| a.kind == "v1")
                    .or_else(|| v.iter().find(|a| a.kind == "v2"))
                    .map(|a| a.addr.clone())
            })
            .collect()
    }
}

/// `rbd children --format json`.
#[derive(Debug, Deserialize)]
pub(super) struct Child {
    pub(super) pool: String,
    pub(super) image: String,
}

/// `ceph df --format json` (the parts used).
#[derive(Debug, Deserialize)]
pub(super) struct Df {
    pub(super) pools: Vec<DfPool>,
}

#[derive(Debug, Deserialize)]
pub(super) struct DfPool {
    pub(super) name: String,
    pub(super) stats: DfStats,
}

#[derive(Debug, Deserialize)]
pub(super) struct DfStats {
    pub(super) stored: u64,
    pub(super) max_avail: u64,
}

pub(super) fn parse<'a, T: Deserialize<'a>>(what: &str, text: &'a str) -> Result<T> {
    serde_json::from_str(text.trim())
        .map_err(|e| Error::internal(format!("unexpected output of {what}: {e}")))
}

/// Reports `rbd`'s progress lines on stderr (`Importing image: 42%
/// complete...`) as bytes of `total` to `progress` under `phase`.
pub(super) fn rbd_progress(
    phase: &'static str,
    total: u64,
    progress: ProgressFn,
) -> crate::runner::LineSink {
    Arc::new(move |line: &str| {
        let Some((head, _)) = line.split_once("% complete") else {
            return;
        };
        let pct = head.rsplit(' ').next().and_then(|p| p.parse::<u64>().ok());
        if let Some(pct) = pct.filter(|p| *p <= 100) {
            progress(phase, total / 100 * pct + total % 100 * pct / 100, total);
        }
    })
}

/// The error of a failed rbd/ceph call: the program, its subcommand and
/// target, the exit status and the tool's messages, its kind read from the
/// errno the tools print ("(2) No such file or directory").
pub(super) fn ceph_error(cmd: &Cmd, out: &Output) -> Error {
    let e = &out.stderr;
    let kind = if e.contains("(2) No such file or directory") {
        ErrorKind::NotFound
    } else if e.contains("(17) File exists") {
        ErrorKind::AlreadyExists
    } else if e.contains("(28) No space left") || e.contains("(122) Disk quota exceeded") {
        ErrorKind::ResourceExhausted
    } else if e.contains("(16) Device or resource busy")
        || e.contains("still has watchers")
        || e.contains("has snapshots")
    {
        ErrorKind::FailedPrecondition
    } else if e.contains("(110) Connection timed out") || e.contains("(13) Permission denied") {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    };
    // The first lines are enough: rbd prints its error, then librbd's.
    let said: Vec<&str> = e
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("% complete"))
        .take(5)
        .collect();
    let target = cmd
        .args
        .iter()
        .rev()
        .find(|a| a.contains('/') && !a.starts_with('/'))
        .or(cmd.args.last())
        .map(String::as_str)
        .unwrap_or("");
    Error::new(
        kind,
        format!(
            "{} {} exited with status {}: {}",
            cmd.program,
            target,
            out.status,
            if said.is_empty() {
                "(no stderr)".to_string()
            } else {
                said.join("; ")
            }
        ),
    )
}

impl RbdBackend {
    /// `POOL/IMAGE`.
    pub(super) fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.settings.pool)
    }

    /// The common arguments of every call: who we are and where the cluster is.
    pub(super) fn cli(&self, program: &str) -> Cmd {
        let mut c = Cmd::new(program)
            .arg("--conf")
            .arg(self.settings.ceph_conf.to_string_lossy())
            .args(["--id", self.settings.ceph_id.as_str()]);
        if let Some(k) = &self.settings.keyring {
            c = c.arg("--keyring").arg(k.to_string_lossy());
        }
        c
    }

    /// An `rbd` call that reads, with `--format json`.
    pub(super) fn rbd_report<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cli("rbd")
            .args(args)
            .args(["--format", "json"])
            .timeout(REPORT_TIMEOUT)
    }

    /// An `rbd` call that changes something. (Its progress lines go to
    /// stderr and are dropped from errors; `--no-progress` is not taken by
    /// every subcommand.)
    pub(super) fn rbd_change<I, S>(&self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cli("rbd").args(args).timeout(CHANGE_TIMEOUT)
    }

    pub(super) async fn run(&self, cmd: &Cmd) -> Result<Output> {
        let out = self.runner.run(cmd).await?;
        if out.success() {
            Ok(out)
        } else {
            Err(ceph_error(cmd, &out))
        }
    }

    /// Every image and snapshot of the pool: one `rbd ls -l`.
    pub(super) async fn ls(&self) -> Result<Vec<LsRow>> {
        let out = self
            .run(&self.rbd_report(["ls", "-l", self.settings.pool.as_str()]))
            .await?;
        // An empty pool prints nothing at all, not "[]".
        if out.stdout.trim().is_empty() {
            return Ok(Vec::new());
        }
        parse("rbd ls -l", &out.stdout)
    }

    pub(super) async fn info(&self, spec: &str) -> Result<Info> {
        let out = self.run(&self.rbd_report(["info", spec])).await?;
        parse("rbd info", &out.stdout)
    }

    pub(super) fn data_pool_args(&self) -> Vec<String> {
        match &self.settings.data_pool {
            Some(p) => vec!["--data-pool".into(), p.to_string()],
            None => Vec::new(),
        }
    }

    /// `rbd rm`; Ok when the image does not exist.
    pub(super) async fn remove_image(&self, image: &str) -> Result<()> {
        let cmd = self
            .rbd_change(["rm", &self.spec(image)])
            .timeout(DATA_TIMEOUT);
        let out = self.runner.run(&cmd).await?;
        if out.success() || out.stderr.contains("(2) No such file or directory") {
            return Ok(());
        }
        Err(ceph_error(&cmd, &out))
    }

    pub(super) fn size_arg(size: u64) -> String {
        // rbd's --size takes a unit; bytes are "B"... in 16.2 only M/G/T
        // are documented, so sizes are whole MiB (the size granularity).
        format!("{}M", size.div_ceil(1 << 20))
    }
}
