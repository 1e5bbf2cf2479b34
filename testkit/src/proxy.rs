//! Fault injection on the network path.
use std::{net::SocketAddr, sync::Arc};

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
