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

/// Keep-alive every 300 ms and a 1.2 s idle timeout: a lost peer (QUIC hears no reset
/// from a killed one) is noticed within 2 s, and idle connections and quiet streams
/// stay up.
pub fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
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
    cfg.transport_config(transport());
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
    cfg.transport_config(transport());
    Ok(cfg)
}
