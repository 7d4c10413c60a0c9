//! A tiny HTTP/1.1 server on 127.0.0.1 for the unit tests: serves bytes,
//! counts requests, and misbehaves on demand (404, a body cut short, a
//! stall, a body held until the test releases it). One request per
//! connection (`Connection: close`); nothing but loopback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the server does for one path.
#[derive(Clone)]
pub(crate) enum Reply {
    /// 200 with these bytes and their Content-Length.
    Body(Vec<u8>),
    /// This status with an empty body.
    Status(u16, &'static str),
    /// Announces the whole body, sends the first `sent` bytes, closes.
    Truncated { body: Vec<u8>, sent: usize },
    /// Sends the headers, then nothing, keeping the connection open.
    Stall,
    /// Sends the headers and waits for `gate` before sending the body.
    Gated { body: Vec<u8>, gate: Arc<Notify> },
    /// 200 without Content-Length (the body ends when the connection
    /// closes): the first `first` bytes, then, once `gate` is notified
    /// (at once when there is none), the rest.
    Unsized {
        body: Vec<u8>,
        first: usize,
        gate: Option<Arc<Notify>>,
    },
    /// 302 to this location, with a body that must never reach a message.
    Redirect(String),
}

pub(crate) struct TestHttp {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TestHttp {
    pub(crate) async fn start() -> TestHttp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let (r2, c2) = (routes.clone(), requests.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, r2.clone(), c2.clone()));
            }
        });
        TestHttp {
            addr,
            requests,
            routes,
            accept,
        }
    }

    pub(crate) fn route(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests received so far (any path).
    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TestHttp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
    requests: Arc<AtomicUsize>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let reply = routes.lock().unwrap().get(&path).cloned();
    let ok = |len: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    let _ = match reply {
        None => {
            stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await
        }
        Some(Reply::Status(code, reason)) => {
            let h = format!(
                "HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(h.as_bytes()).await
        }
        Some(Reply::Body(body)) => {
            let _ = stream.write_all(ok(body.len()).as_bytes()).await;
            stream.write_all(&body).await
        }
        Some(Reply::Truncated { body, sent }) => {
            let _ = stream.write_all(ok(body.len()).as_bytes()).await;
            let _ = stream.write_all(&body[..sent]).await;
            stream.shutdown().await
        }
        Some(Reply::Stall) => {
            let _ = stream.write_all(ok(1 << 20).as_bytes()).await;
            // Holds the connection open until the test's runtime ends.
            std::future::pending::<()>().await;
            Ok(())
        }
        Some(Reply::Redirect(to)) => {
            let body = "SECRET-BODY-OF-THE-REDIRECT";
            let h = format!(
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(h.as_bytes()).await
        }
        Some(Reply::Unsized { body, first, gate }) => {
            let h = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(h.as_bytes()).await;
            let _ = stream.write_all(&body[..first]).await;
            if let Some(gate) = gate {
                gate.notified().await;
            }
            let _ = stream.write_all(&body[first..]).await;
            stream.shutdown().await
        }
        Some(Reply::Gated { body, gate }) => {
            let _ = stream.write_all(ok(body.len()).as_bytes()).await;
            gate.notified().await;
            stream.write_all(&body).await
        }
    };
}
