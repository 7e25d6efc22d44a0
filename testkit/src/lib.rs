//! Test support with real sockets: a DNS responder whose records change while a test
//! runs, and greeter replicas on 127.0.0.x that can be stopped gracefully or killed.
//!
//! # Layout
//! - [`dns`]: [`Dns`], a UDP DNS server answering A/AAAA from a mutable table.
//! - [`echo`]: `echo.Echo`, client and bidi streaming for the proxy's tests.
//! - [`replica`]: [`Replica`], a greeter server on its own runtime and thread, and
//!   [`replica::silent`], one that hangs after its handshake.
//! - [`Subnet`]: a random 127.a.b.0/24 for one test, so tests run in parallel.

pub mod dns;
pub mod echo;
pub mod replica;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub use dns::Dns;
pub use replica::Replica;

/// The port every replica listens on, like pods behind a headless Service.
pub const PORT: u16 = 50051;

/// A /24 inside 127/8 (all of it routes to lo on Linux) that one test owns.
#[derive(Debug, Clone, Copy)]
pub struct Subnet([u8; 2]);

impl Subnet {
    /// Picks a block whose first address has port 50051 free.
    pub fn random() -> Subnet {
        loop {
            let n = random_u16();
            let s = Subnet([(n >> 8).clamp(1, 254) as u8, n as u8]);
            if std::net::TcpListener::bind(s.addr(1)).is_ok() {
                return s;
            }
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.0[0], self.0[1], host))
    }

    /// `127.a.b.host:50051`.
    pub fn addr(&self, host: u8) -> SocketAddr {
        SocketAddr::new(self.ip(host), PORT)
    }
}

fn random_u16() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id()) as u16
}

/// Sandbox certificates for this test process, made once: `(dir with ca.pem, cert.pem,
/// key.pem)`, valid for `server.test`, `svc.test`, `localhost` and 127.0.0.1.
pub fn certs() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lb-sandbox-certs-{}", std::process::id()));
        let names = ["server.test", "svc.test", "localhost", "127.0.0.1"].map(String::from);
        grpc_h3::certs::generate(&dir, &names).expect("making test certificates");
        dir
    })
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
