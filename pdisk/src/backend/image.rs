//! Image import drivers: qemu-img conversions of an [`inspect`]ed image into
//! a pool object. Format detection and inspection live in
//! `stratus_core::image`, shared with the agent.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use stratus_core::image::{detect_format, inspect};

use super::{ImageFormat, ProgressFn};
use crate::error::Result;
use crate::runner::{run_checked, Cmd, CommandRunner, LineSink};

/// Turns qemu-img's `-p` lines ("    (42.00/100%)") into progress reports
/// of `phase` as bytes of `total`.
fn progress_sink(phase: &'static str, total: u64, progress: ProgressFn) -> LineSink {
    Arc::new(move |line: &str| {
        let t = line.trim().trim_start_matches('(');
        if let Some(pct) = t.split('/').next().and_then(|p| p.parse::<f64>().ok()) {
            progress(phase, (total as f64 * pct / 100.0) as u64, total);
        }
    })
}

/// How long a whole-image conversion may take.
const CONVERT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Converts a qcow2 image to a new sparse raw file at `dst` with qemu-img,
/// reporting progress from its `-p` output as bytes of `total`.
pub async fn convert_qcow2_to_raw(
    runner: &dyn CommandRunner,
    src: &Path,
    dst: &Path,
    total: u64,
    progress: ProgressFn,
) -> Result<()> {
    let cmd = Cmd::new("qemu-img")
        .args(["convert", "-p", "-f", "qcow2", "-O", "raw"])
        .arg(src.to_string_lossy())
        .arg(dst.to_string_lossy())
        .timeout(CONVERT_TIMEOUT)
        .on_stdout_line(progress_sink("convert", total, progress));
    run_checked(runner, &cmd)
        .await
        .map(|_| ())
        .map_err(|e| e.context(format!("converting {}", src.display())))
}

/// Writes the image `src` (in `format`, already [`inspect`]ed) into `dst`,
/// an existing block device at least as large that reads as zeros (a fresh
/// thin LV). `-n` writes into the device instead of creating a file;
/// `--target-is-zero` makes qemu-img skip zero blocks, so they stay
/// unallocated in the thin pool; `-t none` bypasses the page cache and makes
/// qemu-img's final flush reach the device before it exits, so the data is
/// durable when the volume is published.
pub async fn convert_into_device(
    runner: &dyn CommandRunner,
    src: &Path,
    format: ImageFormat,
    dst: &Path,
    total: u64,
    progress: ProgressFn,
) -> Result<()> {
    let cmd = Cmd::new("qemu-img")
        .args(["convert", "-p", "-n", "--target-is-zero", "-t", "none"])
        .args(["-f", format.as_str(), "-O", "raw"])
        .arg(src.to_string_lossy())
        .arg(dst.to_string_lossy())
        .timeout(CONVERT_TIMEOUT)
        .on_stdout_line(progress_sink("import", total, progress));
    run_checked(runner, &cmd)
        .await
        .map(|_| ())
        .map_err(|e| e.context(format!("importing {}", src.display())))
}
