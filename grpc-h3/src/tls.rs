//! QUIC endpoint configs: TLS 1.3 only, ALPN `h3`, rustls with the ring provider,
//! verification always on. Transport limits bound what one peer can hold open.

use std::{path::Path, sync::Arc, time::Duration};

use quinn::{
    ClientConfig, IdleTimeout, ServerConfig, TransportConfig, VarInt,
    crypto::rustls::{QuicClientConfig, QuicServerConfig},
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ALPN;

/// A certificate or key file that could not be used: names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct TlsError {
    pub path: String,
    pub problem: String,
}

fn problem(path: &Path, problem: impl ToString) -> TlsError {
    TlsError { path: path.display().to_string(), problem: problem.to_string() }
}

/// quinn's default initial RTT, RFC 9002's for a path it knows nothing of: the server
/// side keeps it, as its clients may be anywhere.
const ANY_PATH_RTT: Duration = Duration::from_millis(333);

/// The client side connects to replicas in the cluster, where a round trip takes well
/// under a millisecond. The first Initial is resent after three initial RTTs: a
/// replica whose address is published before it listens would otherwise wait a second
/// for the resend, as a TCP connect waits for the kernel's SYN retransmission.
const CLUSTER_RTT: Duration = Duration::from_millis(33);

/// Keep-alive every 300 ms and a 1.2 s idle timeout: a lost peer (QUIC hears no reset
/// from a killed one) is noticed within 2 s, and idle connections and quiet streams
/// stay up.
fn transport(initial_rtt: Duration) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.initial_rtt(initial_rtt);
    t.keep_alive_interval(Some(Duration::from_millis(300)));
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(1_200))));
    t.max_concurrent_bidi_streams(VarInt::from_u32(256));
    // h3 opens a few unidirectional control streams per connection.
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    Arc::new(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| problem(path, e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| problem(path, format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(problem(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| problem(path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| problem(path, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| problem(path, "no PEM private key in the file"))
}

/// A QUIC server config from a certificate chain and its key.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| problem(cert, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| problem(key, format!("does not match the certificate or is unusable: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| problem(cert, e))?;
    let mut cfg = ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport(ANY_PATH_RTT));
    Ok(cfg)
}

/// A QUIC client config that trusts only the CA in `ca`.
pub fn client_config(ca: &Path) -> Result<ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| problem(ca, format!("not a usable CA certificate: {e}")))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| problem(ca, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| problem(ca, e))?;
    let mut cfg = ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport(CLUSTER_RTT));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket};

    use tokio::time::{Instant, sleep_until};

    use super::*;

    /// The datagrams that reached `socket`, read until it has been quiet for 100 ms of
    /// real time: on a busy machine the kernel may hand a loopback packet over late.
    /// It blocks the runtime, which holds the paused clock still meanwhile.
    fn drain(socket: &UdpSocket) -> usize {
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut buf = [0u8; 2048];
        let mut n = 0;
        while socket.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    }

    /// quinn reads tokio's clock, so on the paused clock its resend timers fire in
    /// order and at their exact times, whatever the machine's load.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_initial_is_sent_again_after_about_100_ms_not_a_second() {
        let dir = std::env::temp_dir().join(format!("grpc-h3-initials-{}", std::process::id()));
        crate::certs::generate(&dir, &["localhost".to_owned()]).unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
        endpoint.set_default_client_config(client_config(&dir.join("ca.pem")).unwrap());
        let start = Instant::now();
        let attempt = tokio::spawn(endpoint.connect(silent.local_addr().unwrap(), "localhost").unwrap());

        let mut sent = Vec::new();
        for ms in [150, 250, 350] {
            sleep_until(start + Duration::from_millis(ms)).await;
            sent.push(sent.last().unwrap_or(&0) + drain(&silent));
        }
        attempt.abort();
        let _ = std::fs::remove_dir_all(&dir);

        // A replica whose address is published before it listens loses the first
        // Initial; quinn's default 333 ms initial RTT would send it again only at 1 s.
        assert!(sent[0] >= 2, "Initials sent by 150 ms, 250 ms, 350 ms: {sent:?}");
        assert_eq!(sent[1], sent[0], "the next resend waits twice as long: {sent:?}");
        assert!(sent[2] > sent[1], "and comes at about 300 ms: {sent:?}");
    }
}
