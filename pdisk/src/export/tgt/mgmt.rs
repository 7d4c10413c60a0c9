//! tgt's management protocol (usr/tgtadm.h): a native-endian `struct
//! tgtadm_req` and a parameter string in; `struct tgtadm_rsp` and a payload
//! out; one request per connection.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// `sizeof(struct tgtadm_req)`: mode, op (enums, 4 bytes each), lld[64],
/// len, tid (4 each), sid, lun (8 each, at offset 80: no padding needed),
/// cid, host_no, device_type, ac_dir, pack, force (4 each) = 120.
pub const REQ_LEN: usize = 120;
/// `sizeof(struct tgtadm_rsp)`: err, len.
pub const RSP_LEN: usize = 8;
const LLD_LEN: usize = 64;
/// Largest payload we accept in a response.
const MAX_RSP: usize = 16 << 20;

pub const MODE_ACCOUNT: u32 = 7;
pub const OP_NEW: u32 = 0;
/// What tgtadm sends when no `--tid` is given.
pub const NO_TID: i32 = -1;

pub const TGTADM_SUCCESS: u32 = 0;
pub const TGTADM_NOMEM: u32 = 2;
pub const TGTADM_NO_DRIVER: u32 = 3;
pub const TGTADM_USER_EXIST: u32 = 14;
pub const TGTADM_TOO_MANY_USER: u32 = 16;

/// tgt's `enum tgtadm_errno`, with tgtadm's wording.
pub fn strerror(code: u32) -> String {
    const MSG: [&str; 25] = [
        "success",
        "unknown error",
        "out of memory",
        "can't find the driver",
        "can't find the target",
        "can't find the logical unit",
        "can't find the session",
        "can't find the connection",
        "can't find the binding",
        "this target already exists",
        "this logical unit number already exists",
        "this binding already exists",
        "this access control rule already exists",
        "this access control rule does not exist",
        "this account already exists",
        "can't find the account",
        "too many accounts",
        "invalid request",
        "this target already has an outgoing account",
        "this target is still active",
        "this logical unit is still active",
        "this driver is busy",
        "this operation isn't supported",
        "unknown parameter",
        "this device has Prevent Removal set",
    ];
    match MSG.get(code as usize) {
        Some(m) => format!("{m} (tgtadm error {code})"),
        None => format!("tgtadm error {code}"),
    }
}

/// The request header for the iscsi driver, followed by `params`.
pub fn encode(mode: u32, op: u32, tid: i32, params: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(REQ_LEN + params.len());
    b.extend_from_slice(&mode.to_ne_bytes());
    b.extend_from_slice(&op.to_ne_bytes());
    let mut lld = [0u8; LLD_LEN];
    lld[..5].copy_from_slice(b"iscsi");
    b.extend_from_slice(&lld);
    let len = u32::try_from(REQ_LEN + params.len()).expect("small request");
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&tid.to_ne_bytes());
    b.extend_from_slice(&0u64.to_ne_bytes()); // sid
    b.extend_from_slice(&u64::MAX.to_ne_bytes()); // lun: tgtadm's "none"
    b.extend_from_slice(&0u32.to_ne_bytes()); // cid
    b.extend_from_slice(&0u32.to_ne_bytes()); // host_no
    b.extend_from_slice(&0u32.to_ne_bytes()); // device_type: TYPE_DISK
    b.extend_from_slice(&0u32.to_ne_bytes()); // ac_dir: incoming
    b.extend_from_slice(&0u32.to_ne_bytes()); // pack
    b.extend_from_slice(&0u32.to_ne_bytes()); // force
    debug_assert_eq!(b.len(), REQ_LEN);
    b.extend_from_slice(params);
    b
}

/// Sends one request; returns tgt's error code and the payload.
pub async fn request(
    socket: &Path,
    mode: u32,
    op: u32,
    tid: i32,
    params: &[u8],
    timeout: Duration,
) -> std::io::Result<(u32, Vec<u8>)> {
    let exchange = async {
        let mut s = UnixStream::connect(socket).await?;
        let mut req = encode(mode, op, tid, params);
        let written = s.write_all(&req).await;
        req.fill(0);
        std::hint::black_box(&req);
        written?;
        let mut rsp = [0u8; RSP_LEN];
        s.read_exact(&mut rsp).await?;
        let err = u32::from_ne_bytes(rsp[0..4].try_into().expect("4 bytes"));
        let len = u32::from_ne_bytes(rsp[4..8].try_into().expect("4 bytes")) as usize;
        let payload_len = len
            .checked_sub(RSP_LEN)
            .filter(|n| *n <= MAX_RSP)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad response length {len}"),
                )
            })?;
        let mut payload = vec![0u8; payload_len];
        s.read_exact(&mut payload).await?;
        Ok((err, payload))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            ))
        })
}
