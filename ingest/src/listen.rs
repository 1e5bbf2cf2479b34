//! Accepting connections, the same way on every listener ingest has (gRPC plaintext and TLS,
//! health, metrics, console) — SPEC §12.
//!
//! - Every listener asks the kernel for a backlog of [`BACKLOG`] connections (capped by
//!   `net.core.somaxconn`): a fleet reconnecting at once after an outage arrives faster than
//!   connections are accepted, and past the backlog the kernel drops them or, with SYN cookies,
//!   resets connections the client already counts as open.
//! - Every accepted socket gets `TCP_NODELAY`: a response of a few packets must not wait 40 ms
//!   for Nagle and the client's delayed ACK.
//! - A connection must prove it speaks the listener's protocol within `--hello-timeout` (the
//!   HTTP/2 preface, an HTTP/1.1 request head, or a TLS handshake) before any server sees it;
//!   otherwise it is closed, so idle sockets cannot pile up and exhaust file descriptors. Proofs
//!   run concurrently, at most `--max-pending-connections` per listener: beyond that, new
//!   connections wait in the kernel's backlog.
//! - Running out of file descriptors (EMFILE/ENFILE) is logged as an error at most every
//!   [`EXHAUSTION_REPORT_EVERY`], and the accept loop pauses [`EXHAUSTION_PAUSE`] before trying
//!   again instead of spinning; it serves again as soon as descriptors free up.
//!
//! The bytes a proof reads are replayed to the server ([`Replayed`]), which sees the connection
//! from its first byte.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long the accept loop pauses when the process is out of file descriptors.
pub const EXHAUSTION_PAUSE: Duration = Duration::from_millis(50);
/// Running out of file descriptors is logged at most this often.
pub const EXHAUSTION_REPORT_EVERY: Duration = Duration::from_secs(10);
/// Connections the kernel may hold for a listener before they are accepted. Tokio's default is
/// 1,024; 10,000 agents reconnecting within seconds overflowed it (`TcpExtListenOverflows`),
/// and some of them were reset while opening their stream.
pub const BACKLOG: u32 = 4096;
/// Default of `--max-pending-connections`.
pub const DEFAULT_MAX_UNPROVEN: usize = 4096;
/// The longest HTTP/1.1 request head accepted.
const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;
/// Every HTTP/2 connection starts with these bytes (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Binds a listener with [`BACKLOG`] (and `SO_REUSEADDR`, as tokio's own `bind` sets: a restarted
/// ingest binds its port again while the old connections are in TIME_WAIT).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// How a listener treats connections that have not shown yet that they speak its protocol.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// A connection must prove itself within this long.
    pub proof_timeout: Duration,
    /// Accepted connections not yet proven, at most.
    pub max_unproven: usize,
}

/// What a connection must show before a server gets it.
pub trait Proof: Clone + Send + Sync + 'static {
    /// The connection handed to the server once proven.
    type Connection: Send + 'static;
    /// What is awaited, for messages ("TLS handshake").
    const AWAITED: &'static str;
    /// Reads (and keeps) what the protocol starts with; `Err` says why the connection is refused.
    fn prove(
        &self,
        tcp: TcpStream,
    ) -> impl Future<Output = Result<Self::Connection, String>> + Send;
}

/// Plaintext HTTP/2 with prior knowledge (gRPC): the 24-byte connection preface.
#[derive(Debug, Clone, Copy)]
pub struct Http2Preface;

/// Plaintext HTTP/1.1 (the console, metrics): a complete request head.
#[derive(Debug, Clone, Copy)]
pub struct Http1RequestHead;

/// A proven connection: the bytes read while proving it come first, then the socket.
#[derive(Debug)]
pub struct Replayed {
    read: Vec<u8>,
    replayed: usize,
    tcp: TcpStream,
}

impl Replayed {
    fn new(read: Vec<u8>, tcp: TcpStream) -> Replayed {
        Replayed {
            read,
            replayed: 0,
            tcp,
        }
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.read.len() {
            let rest = &this.read[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.read.len() {
                this.read = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl Connected for Replayed {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.tcp.connect_info()
    }
}

/// Whether the first bytes of a connection look like an HTTP/1 request line.
fn looks_like_http1(bytes: &[u8]) -> bool {
    let method_end = bytes.iter().position(|&b| b == b' ');
    matches!(method_end, Some(n) if n > 0 && bytes[..n].iter().all(u8::is_ascii_uppercase))
}

impl Proof for Http2Preface {
    type Connection = Replayed;
    const AWAITED: &'static str = "HTTP/2 preface";

    async fn prove(&self, mut tcp: TcpStream) -> Result<Replayed, String> {
        let mut read = vec![0u8; HTTP2_PREFACE.len()];
        tcp.read_exact(&mut read)
            .await
            .map_err(|e| format!("closed before the HTTP/2 preface: {e}"))?;
        if read != HTTP2_PREFACE {
            if looks_like_http1(&read) {
                // Someone pointed curl or a browser at a gRPC port: say so, in its language.
                let body = "this port speaks gRPC (HTTP/2); use a gRPC client such as grpcurl\n";
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                answer_and_close(tcp, response.as_bytes()).await;
                return Err("an HTTP/1 request on a gRPC port (answered 400)".into());
            }
            return Err("not HTTP/2: the connection did not start with its preface".into());
        }
        Ok(Replayed::new(read, tcp))
    }
}

/// Sends a last answer and closes. What the client sent and we did not read is drained first
/// (briefly): closing a socket with unread input resets it, and the reset can destroy the answer
/// before the client reads it.
async fn answer_and_close(mut tcp: TcpStream, answer: &[u8]) {
    if tcp.write_all(answer).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        for _ in 0..16 {
            if matches!(tcp.read(&mut sink).await, Ok(0) | Err(_)) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// Where the head of an HTTP/1 request ends in `bytes`, if it does.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

impl Proof for Http1RequestHead {
    type Connection = Replayed;
    const AWAITED: &'static str = "HTTP/1.1 request head";

    async fn prove(&self, mut tcp: TcpStream) -> Result<Replayed, String> {
        let mut read = Vec::with_capacity(1024);
        let mut chunk = [0u8; 2048];
        loop {
            let n = tcp
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the request head: {e}"))?;
            if n == 0 {
                return Err("closed before a complete request head".into());
            }
            // Only the newly read bytes (and the three before them) can complete the head.
            let from = read.len().saturating_sub(3);
            read.extend_from_slice(&chunk[..n]);
            if head_end(&read[from..]).is_some() {
                return Ok(Replayed::new(read, tcp));
            }
            if read.len() > MAX_REQUEST_HEAD_BYTES {
                answer_and_close(
                    tcp,
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                      connection: close\r\n\r\n",
                )
                .await;
                return Err(format!(
                    "request head longer than {MAX_REQUEST_HEAD_BYTES} bytes"
                ));
            }
        }
    }
}

/// Rate-limits the report of running out of file descriptors.
#[derive(Debug, Default)]
struct Exhaustion {
    last_report: Option<Instant>,
    unreported: u64,
}

impl Exhaustion {
    fn happened(&mut self, listener: &'static str, err: &io::Error) {
        self.unreported += 1;
        if self
            .last_report
            .is_some_and(|at| at.elapsed() < EXHAUSTION_REPORT_EVERY)
        {
            return;
        }
        let limit = fd_soft_limit()
            .map(|n| n.to_string())
            .unwrap_or_else(|| "unknown".into());
        tracing::error!(
            listener,
            error = %err,
            failed_accepts = self.unreported,
            fd_limit = %limit,
            "out of file descriptors: new connections wait until some close (raise the limit, \
             e.g. LimitNOFILE= in systemd, or look for clients holding idle connections)"
        );
        self.last_report = Some(Instant::now());
        self.unreported = 0;
    }
}

/// The file descriptors this process may open.
pub fn fd_soft_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// Raises the soft limit on open files to the hard limit (every connection is one); returns the
/// limit ingest runs with.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard.max(soft))
}

fn out_of_descriptors(err: &io::Error) -> bool {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const ENOBUFS: i32 = 105;
    matches!(err.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS))
        || err.kind() == io::ErrorKind::OutOfMemory
}

/// Accepts connections on `listener` and yields those that proved themselves in time, until
/// `stop`. `name` names the listener in logs ("gRPC", "health", "metrics", "console").
pub fn incoming<P: Proof>(
    listener: TcpListener,
    name: &'static str,
    proof: P,
    limits: AcceptLimits,
    stop: CancellationToken,
) -> ReceiverStream<Result<P::Connection, Infallible>> {
    let (ready, connections) = mpsc::channel(64);
    let unproven = std::sync::Arc::new(Semaphore::new(limits.max_unproven.max(1)));
    tokio::spawn(async move {
        let mut exhaustion = Exhaustion::default();
        loop {
            let permit = tokio::select! {
                p = unproven.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = stop.cancelled() => return,
            };
            let (tcp, remote_addr) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) if out_of_descriptors(&err) => {
                        exhaustion.happened(name, &err);
                        tokio::time::sleep(EXHAUSTION_PAUSE).await;
                        continue;
                    }
                    Err(err) => {
                        // The peer gave up before we accepted (ECONNABORTED and the like).
                        tracing::debug!(listener = name, error = %err, "accepting a connection failed");
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::debug!(listener = name, error = %err, "setting TCP_NODELAY failed");
            }
            let (proof, ready) = (proof.clone(), ready.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(limits.proof_timeout, proof.prove(tcp)).await {
                    Ok(Ok(connection)) => {
                        let _ = ready.send(Ok(connection)).await;
                    }
                    Ok(Err(reason)) => {
                        tracing::info!(listener = name, %remote_addr, %reason, "connection refused");
                    }
                    Err(_) => tracing::info!(
                        listener = name,
                        %remote_addr,
                        timeout = ?limits.proof_timeout,
                        "{} not completed in time: connection closed",
                        P::AWAITED
                    ),
                }
            });
        }
    });
    ReceiverStream::new(connections)
}

/// Serves `app` over HTTP/1.1 on the connections `incoming` yields, until `stop` (then each
/// connection finishes its request in flight). Every later request head on a kept-alive
/// connection must also arrive within `header_timeout`, so an idle connection is closed.
pub async fn serve_http1<C>(
    app: axum::Router,
    mut incoming: ReceiverStream<Result<C, Infallible>>,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio_stream::StreamExt;
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let io = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "HTTP connection ended with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio_stream::StreamExt;

    use super::*;

    fn limits(proof_timeout: Duration, max_unproven: usize) -> AcceptLimits {
        AcceptLimits {
            proof_timeout,
            max_unproven,
        }
    }

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    #[tokio::test]
    async fn a_proven_connection_has_nodelay_and_replays_what_was_read() {
        let (l, addr) = listener().await;
        let stop = CancellationToken::new();
        let mut accepted = incoming(
            l,
            "test",
            Http2Preface,
            limits(Duration::from_secs(5), 4),
            stop.clone(),
        );
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(HTTP2_PREFACE).await.unwrap();
        client.write_all(b"then a frame").await.unwrap();
        let Ok(mut conn) = accepted.next().await.unwrap();
        assert!(
            conn.tcp().nodelay().unwrap(),
            "TCP_NODELAY on the server's socket"
        );
        let mut seen = vec![0u8; HTTP2_PREFACE.len() + 12];
        conn.read_exact(&mut seen).await.unwrap();
        assert_eq!(&seen[..24], HTTP2_PREFACE);
        assert_eq!(&seen[24..], b"then a frame");
        stop.cancel();
    }

    #[tokio::test]
    async fn silent_and_wrong_connections_are_closed_and_never_reach_the_server() {
        let (l, addr) = listener().await;
        let mut accepted = incoming(
            l,
            "test",
            Http2Preface,
            limits(Duration::from_millis(200), 16),
            CancellationToken::new(),
        );
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut http1 = TcpStream::connect(addr).await.unwrap();
        http1
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        http1.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("speaks gRPC"), "{answer}");
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        let nothing = tokio::time::timeout(Duration::from_millis(100), accepted.next()).await;
        assert!(nothing.is_err(), "nothing unproven was handed over");
    }

    #[tokio::test]
    async fn unproven_connections_are_bounded_and_the_rest_wait_in_the_backlog() {
        let (l, addr) = listener().await;
        let mut accepted = incoming(
            l,
            "test",
            Http1RequestHead,
            limits(Duration::from_millis(600), 2),
            CancellationToken::new(),
        );
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Both places are taken by silent clients: this one is not even accepted yet...
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), accepted.next()).await;
        assert!(
            early.is_err(),
            "a third connection was proven while two held the places"
        );
        // ...until the silent ones time out and give their places back.
        let Ok(mut conn) = tokio::time::timeout(Duration::from_secs(3), accepted.next())
            .await
            .expect("served once the silent clients were dropped")
            .unwrap();
        let mut head = vec![0u8; 16];
        conn.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"GET /metrics HTT");
    }

    #[test]
    fn request_heads_end_at_the_blank_line_and_http1_is_recognised() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nhost: x\r\n"), None);
        assert!(looks_like_http1(b"POST /x HTTP/1.1"));
        assert!(!looks_like_http1(b"\x16\x03\x01 TLS"));
    }
}
