//! Fault injection on the network path, and a front over several replicas.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
};

/// A TCP proxy between a client and a server that a test can break: `cut()` drops every open
/// connection and refuses new ones; `blackhole()` silently stops forwarding on every connection,
/// open and new (like a dead network path: no FIN, no RST); `heal()` lets NEW connections through
/// again — connections broken before stay broken, so only a client that notices and reconnects
/// recovers.
pub struct FaultProxy {
    pub addr: SocketAddr,
    state: Arc<tokio::sync::watch::Sender<ProxyState>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyState {
    Forwarding,
    Cut,
    Blackhole,
}

/// Holds a connection open without ever moving a byte again.
async fn hold<T>(held: T) {
    let _held = held;
    std::future::pending::<()>().await
}

impl FaultProxy {
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(tokio::sync::watch::Sender::new(ProxyState::Forwarding));
        let states = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                // Subscribed before anything else, so no state change can slip past.
                let mut state = states.subscribe();
                tokio::spawn(async move {
                    let now = *state.borrow_and_update();
                    let outbound = match now {
                        ProxyState::Cut => return,
                        ProxyState::Blackhole => return hold(inbound).await,
                        ProxyState::Forwarding => TcpStream::connect(upstream).await,
                    };
                    let Ok(mut outbound) = outbound else { return };
                    let broken = tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => return,
                        broken = state.wait_for(|s| *s != ProxyState::Forwarding) => broken.map(|s| *s),
                    };
                    if matches!(broken, Ok(ProxyState::Blackhole)) {
                        hold((inbound, outbound)).await;
                    }
                });
            }
        });
        FaultProxy { addr, state }
    }

    fn set(&self, state: ProxyState) {
        self.state.send_replace(state);
    }

    pub fn cut(&self) {
        self.set(ProxyState::Cut);
    }

    pub fn blackhole(&self) {
        self.set(ProxyState::Blackhole);
    }

    pub fn heal(&self) {
        self.set(ProxyState::Forwarding);
    }
}

/// A TCP front over several replicas, as a Kubernetes Service is: each new connection goes to
/// the next upstream in rotation, and stays there until either side closes it. A replica that
/// died refuses its connections, and the front closes the client's at once (no retry here: the
/// client reconnects and lands on the next replica); [`RoundRobin::remove`] takes an upstream out
/// of rotation, as the Service does once the replica's endpoint is gone. Counters per upstream
/// say where the clients went.
pub struct RoundRobin {
    pub addr: SocketAddr,
    upstreams: Arc<[Upstream]>,
}

/// One upstream of a [`RoundRobin`] and what it was given.
#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    in_rotation: AtomicBool,
    /// Connections forwarded and still open.
    open: AtomicUsize,
    /// Connections forwarded since the start.
    forwarded: AtomicUsize,
    /// Connections it refused (the front closed the client's).
    refused: AtomicUsize,
}

/// Counts a forwarded connection as open until it ends, however it ends.
struct OpenGuard<'a>(&'a AtomicUsize);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RoundRobin {
    pub async fn start(upstreams: &[SocketAddr]) -> RoundRobin {
        assert!(!upstreams.is_empty(), "a front needs an upstream");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let upstreams: Arc<[Upstream]> = upstreams
            .iter()
            .map(|&addr| Upstream {
                addr,
                in_rotation: AtomicBool::new(true),
                open: AtomicUsize::new(0),
                forwarded: AtomicUsize::new(0),
                refused: AtomicUsize::new(0),
            })
            .collect();
        let rotation = upstreams.clone();
        tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let picked = (0..rotation.len())
                    .map(|i| (next + i) % rotation.len())
                    .find(|&i| rotation[i].in_rotation.load(Ordering::SeqCst));
                let Some(picked) = picked else {
                    continue;
                };
                next = picked + 1;
                let upstreams = rotation.clone();
                tokio::spawn(async move {
                    let upstream = &upstreams[picked];
                    let Ok(mut outbound) = TcpStream::connect(upstream.addr).await else {
                        upstream.refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    upstream.forwarded.fetch_add(1, Ordering::SeqCst);
                    upstream.open.fetch_add(1, Ordering::SeqCst);
                    let _open = OpenGuard(&upstream.open);
                    let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        RoundRobin { addr, upstreams }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn upstream(&self, addr: SocketAddr) -> &Upstream {
        self.upstreams
            .iter()
            .find(|u| u.addr == addr)
            .unwrap_or_else(|| panic!("{addr} is not an upstream of this front"))
    }

    /// Takes `upstream` out of rotation: new connections go to the others (open ones stay).
    pub fn remove(&self, upstream: SocketAddr) {
        self.upstream(upstream)
            .in_rotation
            .store(false, Ordering::SeqCst);
    }

    /// Connections to `upstream` open now.
    pub fn open(&self, upstream: SocketAddr) -> usize {
        self.upstream(upstream).open.load(Ordering::SeqCst)
    }

    /// Connections forwarded to `upstream` so far.
    pub fn forwarded(&self, upstream: SocketAddr) -> usize {
        self.upstream(upstream).forwarded.load(Ordering::SeqCst)
    }

    /// Connections `upstream` refused so far.
    pub fn refused(&self, upstream: SocketAddr) -> usize {
        self.upstream(upstream).refused.load(Ordering::SeqCst)
    }
}
