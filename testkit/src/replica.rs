//! A greeter replica on its own thread and runtime, so a test can kill it outright
//! (every connection drops, like `kill -9`) or stop it gracefully (SIGTERM's drain).
//! Besides HelloService it serves `echo.Echo` for client and bidi streaming.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use server::Config;
use tokio::{io::AsyncWriteExt, sync::oneshot};

use crate::echo::{EchoCounts, EchoService, pb::echo_server::EchoServer};

pub struct Replica {
    pub addr: SocketAddr,
    pub name: String,
    /// What its `echo.Echo` service saw.
    pub echo: Arc<EchoCounts>,
    stop: Option<oneshot::Sender<()>>,
    kill: Option<oneshot::Sender<()>>,
    sick: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// Settings for [`Replica::start_with`].
#[derive(Debug, Clone)]
pub struct Faults {
    pub fail_rate: f64,
    pub fail_code: tonic::Code,
    pub fail_pushback_ms: Option<i64>,
    pub delay: Duration,
    pub drain_timeout: Duration,
    /// Serve HTTP/3 too, with these certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Never serve HTTP/3, even in a cluster that speaks it.
    pub no_h3: bool,
    /// Over TCP, nothing comes from the replica until this long after a connection
    /// opens: its HTTP/2 settings, its first health answer and every response wait (a
    /// replica whose socket is open before it serves).
    pub answers_after: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            fail_rate: 0.0,
            fail_code: tonic::Code::Unavailable,
            fail_pushback_ms: None,
            delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(5),
            tls: None,
            no_h3: false,
            answers_after: Duration::ZERO,
        }
    }
}

impl Replica {
    pub fn start(addr: SocketAddr, name: &str, node: &str) -> Replica {
        Self::start_with(addr, name, node, Faults::default())
    }

    /// Starts serving on `addr` and returns once the listener is bound.
    pub fn start_with(addr: SocketAddr, name: &str, node: &str, faults: Faults) -> Replica {
        // Its HTTP/3 would listen where its TCP is served: the inner listener's port.
        assert!(faults.answers_after.is_zero() || faults.tls.is_none(), "answers_after holds back HTTP/2 only");
        let (sick, sick_rx) = tokio::sync::watch::channel(false);
        let cfg = Config {
            sick: sick_rx,
            name: name.to_owned(),
            node: node.to_owned(),
            drain_timeout: faults.drain_timeout,
            fail_rate: faults.fail_rate,
            fail_code: faults.fail_code,
            fail_pushback_ms: faults.fail_pushback_ms,
            delay: faults.delay,
            h3: faults
                .tls
                .as_ref()
                .map(|(cert, key)| grpc_h3::tls::server_config(cert, key).expect("test certificate")),
        };
        let echo = EchoService::new(name, faults.delay);
        let counts = echo.counts.clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => return bound_tx.send(Err(e.to_string())).unwrap(),
                };
                let listener = match faults.answers_after {
                    Duration::ZERO => listener,
                    after => answering_after(listener, after).await, // serves no HTTP/3 (asserted)
                };
                bound_tx.send(Ok(())).unwrap();
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                let routes = tonic::service::Routes::new(EchoServer::new(echo));
                tokio::select! {
                    res = server::run_with_routes(cfg, listener, shutdown, routes) => res.expect("replica failed"),
                    _ = kill_rx => {}
                }
            });
            // Dropping the runtime here drops every connection task with it.
        });
        bound_rx.recv().unwrap().unwrap_or_else(|e| panic!("binding replica {addr}: {e}"));
        Replica {
            addr,
            name: name.to_owned(),
            echo: counts,
            stop: Some(stop_tx),
            kill: Some(kill_tx),
            sick,
            thread: Some(thread),
        }
    }

    /// Makes the replica sick (health NOT_SERVING, calls UNAVAILABLE) or well, as the
    /// binary's SIGUSR1 does.
    pub fn set_sick(&self, sick: bool) {
        self.sick.send_replace(sick);
    }

    /// Signals a graceful drain, like SIGTERM, without waiting for it to finish.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Drains like SIGTERM and waits for the replica to exit.
    pub fn stop(mut self) {
        self.begin_stop();
        self.join();
    }

    /// Drops every connection at once, like `kill -9`.
    pub fn kill(mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.join();
    }

    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(kill) = self.kill.take() {
            let _ = kill.send(());
        }
        self.join();
    }
}

/// Serves `front`'s connections through a listener of its own, returned, holding back
/// what the server sends on each until `after` has passed since it opened.
async fn answering_after(front: tokio::net::TcpListener, after: Duration) -> tokio::net::TcpListener {
    let ip = front.local_addr().unwrap().ip();
    let inner = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let to = inner.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = front.accept().await {
            tokio::spawn(async move {
                let opened = tokio::time::Instant::now();
                let Ok(server) = tokio::net::TcpStream::connect(to).await else { return };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                // Each way, its end passed on.
                let up = async {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                    server_tx.shutdown().await
                };
                let down = async {
                    tokio::time::sleep_until(opened + after).await;
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                    client_tx.shutdown().await
                };
                let _ = tokio::join!(up, down);
            });
        }
    });
    inner
}

/// A replica that hangs: it accepts connections on `addr`, answers the HTTP/2
/// handshake, then never reads or writes again, holding the sockets open (a hung
/// process, or its node gone without a FIN). Pings and calls go unanswered. Runs on
/// the caller's runtime until the test ends.
pub async fn silent(addr: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(conn) = h2::server::handshake(tcp).await {
                held.push(conn); // kept, never polled
            }
        }
    });
}

/// A replica that resets every stream it is sent with HTTP/2 error code `reason`,
/// before any response, and is otherwise a well-behaved HTTP/2 server (settings,
/// pings). Returns the count of streams it reset. Runs on the caller's runtime until
/// the test ends.
pub async fn resetting(addr: SocketAddr, reason: u32) -> Arc<AtomicUsize> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let resets = Arc::new(AtomicUsize::new(0));
    let counted = resets.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let resets = counted.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    respond.send_reset(h2::Reason::from(reason));
                    resets.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    resets
}
