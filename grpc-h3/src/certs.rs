//! Sandbox certificates: a CA (`ca.pem`) and one leaf certificate (`cert.pem`,
//! `key.pem`) whose SANs cover every name and IP given. For the sandbox only.

use std::{net::IpAddr, path::Path};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// Writes `ca.pem`, `cert.pem` and `key.pem` into `dir`; `names` may be DNS names or IPs.
pub fn generate(dir: &Path, names: &[String]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "lb-sandbox CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| e.to_string())?;

    let mut leaf = CertificateParams::default();
    leaf.distinguished_name.push(DnType::CommonName, names.first().map_or("lb-sandbox", String::as_str));
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into().map_err(|e| format!("{name:?}: {e}"))?),
        };
        leaf.subject_alt_names.push(san);
    }
    let leaf_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(|e| e.to_string())?;

    for (file, pem) in [("ca.pem", ca_cert.pem()), ("cert.pem", leaf_cert.pem()), ("key.pem", leaf_key.serialize_pem())]
    {
        let path = dir.join(file);
        std::fs::write(&path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
