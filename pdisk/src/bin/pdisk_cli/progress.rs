//! Progress of long operations, drawn on stderr with indicatif.
//!
//! Two sources: WatchProgress, which pdiskd streams for a client-chosen
//! request id while an import, copy or snapshot runs; and the bytes this
//! process has handed to an upload. The progress display is advisory: a watch
//! that fails or ends early never fails the command; only the operation's own
//! result counts.

use std::future::Future;
use std::io;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use stratus_proto::pdisk::v1::upload_volume_request::Part;
use stratus_proto::pdisk::v1::volume_service_client::VolumeServiceClient;
use stratus_proto::pdisk::v1::{
    Progress, UploadHeader, UploadVolumeRequest, Volume, WatchProgressRequest,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Status;

pub type Client = VolumeServiceClient<Channel>;

/// Bytes of image data per UploadVolume message.
pub const CHUNK: usize = 1 << 20;

/// Chunks read ahead of the network; bounds memory to a few MiB.
const READ_AHEAD: usize = 2;

const TICK: Duration = Duration::from_millis(120);

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {msg:<10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn unknown_total_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg:<10} {bytes} {bytes_per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

/// A fresh id for a long operation, so its progress can be watched.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Awaits `call` while following WatchProgress(`request_id`) on a bar when
/// `show` is set. The bar appears with the first progress message, so quick
/// operations (reflink clones) draw nothing, and is cleared when `call` ends.
pub async fn watched<T>(
    client: &Client,
    (project, request_id): (&str, &str),
    show: bool,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<tonic::Response<T>, Status> {
    let bar = ProgressBar::hidden();
    let follower = show.then(|| {
        tokio::spawn(follow(
            client.clone(),
            project.to_owned(),
            request_id.to_owned(),
            bar.clone(),
            true,
        ))
    });
    let result = call.await;
    if let Some(follower) = follower {
        follower.abort();
    }
    bar.finish_and_clear();
    result
}

/// Mirrors WatchProgress onto `bar` until the stream ends, fails or says the
/// operation finished. With `reveal`, the bar is hidden until the first message.
async fn follow(
    mut client: Client,
    project: String,
    request_id: String,
    bar: ProgressBar,
    reveal: bool,
) {
    let Ok(response) = client
        .watch_progress(WatchProgressRequest {
            request_id,
            project,
        })
        .await
    else {
        return;
    };
    let mut stream = response.into_inner();
    let mut has_total = None;
    while let Ok(Some(p)) = stream.message().await {
        if bar.is_finished() {
            return;
        }
        let first = has_total.is_none();
        apply(&bar, &p, &mut has_total);
        if reveal && first {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(TICK);
        }
        if p.finished || !p.error.is_empty() {
            return;
        }
    }
}

/// Shows one progress message: a bar when the total is known, else a counter.
fn apply(bar: &ProgressBar, p: &Progress, has_total: &mut Option<bool>) {
    let known = p.total_bytes > 0;
    if *has_total != Some(known) {
        if known {
            bar.set_style(bytes_style());
        } else {
            bar.set_style(unknown_total_style());
            bar.unset_length();
        }
        *has_total = Some(known);
    }
    if bar.message() != p.phase {
        // A new phase counts from zero: restart the rate and the ETA.
        bar.reset();
        bar.set_message(p.phase.clone());
    }
    if known {
        bar.set_length(p.total_bytes);
    }
    bar.set_position(p.done_bytes);
}

/// Why an upload failed.
pub enum UploadError {
    /// The call failed (refused by the server, or the connection broke).
    Server(Status),
    /// The local file could not be read; the upload was cancelled.
    Read(io::Error),
}

/// Streams `file` to UploadVolume: `header` first, then the data in
/// [`CHUNK`]-sized messages, with a bar of the bytes sent when `show` is set.
/// Once all bytes are sent the bar follows the server's own progress (e.g. a
/// qcow2 conversion) until the volume is ready.
pub async fn upload(
    client: &mut Client,
    header: UploadHeader,
    file: tokio::fs::File,
    show: bool,
) -> Result<Volume, UploadError> {
    let bar = ProgressBar::hidden();
    if show {
        apply(
            &bar,
            &Progress {
                phase: "upload".into(),
                total_bytes: header.content_length,
                ..Progress::default()
            },
            &mut None,
        );
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.enable_steady_tick(TICK);
    }
    let watcher = client.clone();
    let request_id = header.request_id.clone();
    let project = header.project.clone();
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    let mut reader = tokio::spawn(send_file(header, file, tx, bar.clone()));
    let mut call = Box::pin(client.upload_volume(ReceiverStream::new(rx)));
    let mut reading = true;
    let mut follower = None;
    let result = loop {
        tokio::select! {
            done = &mut call => break done.map(tonic::Response::into_inner).map_err(UploadError::Server),
            read = &mut reader, if reading => match read {
                Ok(Ok(())) => {
                    reading = false;
                    bar.set_message("finishing");
                    if show {
                        follower = Some(tokio::spawn(follow(watcher.clone(), project.clone(), request_id.clone(), bar.clone(), false)));
                    }
                }
                Ok(Err((err, tx))) => {
                    // Cancel the call before the data stream can end cleanly:
                    // pdiskd must see an aborted upload, not a short one.
                    drop(call);
                    drop(tx);
                    break Err(UploadError::Read(err));
                }
                Err(join) => break Err(UploadError::Read(io::Error::other(join))),
            },
        }
    };
    reader.abort();
    if let Some(follower) = follower {
        follower.abort();
    }
    bar.finish_and_clear();
    result
}

/// The upload's request stream. On a read error it hands the sender back so
/// the caller decides when the stream ends; when the call has already ended
/// (the receiver is gone) it stops quietly, as the call's result says why.
async fn send_file(
    header: UploadHeader,
    mut file: tokio::fs::File,
    tx: mpsc::Sender<UploadVolumeRequest>,
    bar: ProgressBar,
) -> Result<(), (io::Error, mpsc::Sender<UploadVolumeRequest>)> {
    let first = UploadVolumeRequest {
        part: Some(Part::Header(header)),
    };
    if tx.send(first).await.is_err() {
        return Ok(());
    }
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = match fill(&mut file, &mut buf).await {
            Ok(n) => n,
            Err(err) => return Err((err, tx)),
        };
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        let data = UploadVolumeRequest {
            part: Some(Part::Data(buf)),
        };
        if tx.send(data).await.is_err() {
            return Ok(());
        }
        bar.inc(n as u64);
        if n < CHUNK {
            return Ok(());
        }
    }
}

/// Reads until `buf` is full or the file ends, so every chunk but the last is
/// exactly [`CHUNK`] bytes.
async fn fill(file: &mut tokio::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(r) => n += r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn the_stream_is_a_header_then_full_chunks() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..(2 * CHUNK + 5)).map(|i| (i % 251) as u8).collect();
        tmp.write_all(&content).unwrap();
        let file = tokio::fs::File::open(tmp.path()).await.unwrap();
        let header = UploadHeader {
            name: "img".into(),
            content_length: content.len() as u64,
            ..UploadHeader::default()
        };
        let (tx, mut rx) = mpsc::channel(READ_AHEAD);
        let bar = ProgressBar::hidden();
        let sender = tokio::spawn(send_file(header, file, tx, bar.clone()));
        let mut parts = Vec::new();
        while let Some(m) = rx.recv().await {
            parts.push(m.part.unwrap());
        }
        assert!(sender.await.unwrap().is_ok());
        assert!(matches!(&parts[0], Part::Header(h) if h.name == "img"));
        let sizes: Vec<usize> = parts[1..]
            .iter()
            .map(|p| match p {
                Part::Data(d) => d.len(),
                Part::Header(_) => panic!("a second header"),
            })
            .collect();
        assert_eq!(sizes, vec![CHUNK, CHUNK, 5]);
        let sent: Vec<u8> = parts[1..]
            .iter()
            .flat_map(|p| match p {
                Part::Data(d) => d.clone(),
                Part::Header(_) => Vec::new(),
            })
            .collect();
        assert_eq!(sent, content);
        assert_eq!(bar.position(), content.len() as u64);
    }

    #[tokio::test]
    async fn an_exact_multiple_ends_without_an_empty_chunk() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![7u8; CHUNK]).unwrap();
        let file = tokio::fs::File::open(tmp.path()).await.unwrap();
        let (tx, mut rx) = mpsc::channel(READ_AHEAD);
        let sender = tokio::spawn(send_file(
            UploadHeader::default(),
            file,
            tx,
            ProgressBar::hidden(),
        ));
        let mut count = 0;
        while let Some(m) = rx.recv().await {
            if let Some(Part::Data(d)) = m.part {
                assert!(!d.is_empty());
            }
            count += 1;
        }
        assert!(sender.await.unwrap().is_ok());
        assert_eq!(count, 2, "header and one chunk");
    }

    #[tokio::test]
    async fn a_closed_call_stops_the_reader_quietly() {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(&vec![1u8; 3 * CHUNK]).unwrap();
        let file = tokio::fs::File::open(tmp.path()).await.unwrap();
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        drop(rx);
        let done = send_file(UploadHeader::default(), file, tx, ProgressBar::hidden()).await;
        assert!(done.is_ok());
    }

    #[test]
    fn progress_switches_between_bar_and_counter() {
        let bar = ProgressBar::hidden();
        let mut has_total = None;
        let p = |done, total| Progress {
            phase: "copy".into(),
            done_bytes: done,
            total_bytes: total,
            ..Progress::default()
        };
        apply(&bar, &p(10, 0), &mut has_total);
        assert_eq!(
            (bar.length(), bar.position(), has_total),
            (None, 10, Some(false))
        );
        apply(&bar, &p(20, 100), &mut has_total);
        assert_eq!(
            (bar.length(), bar.position(), has_total),
            (Some(100), 20, Some(true))
        );
        assert_eq!(bar.message(), "copy");
    }
}
