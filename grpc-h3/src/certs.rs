//! Sandbox certificates: a CA (`ca.pem`) and one leaf certificate (`cert.pem`,
//! `key.pem`) whose SANs cover every name and IP given. For the sandbox only.

use std::{net::IpAddr, path::Path};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

/// What [`ensure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// New certificates, written.
    Written,
    /// The ones already in the directory, made for the same names, kept.
    Kept,
}

/// The names the certificates in a directory were made for, one per line.
const NAMES: &str = "names.txt";

/// Makes certificates for `names` in `dir` unless it already holds a set made for the
/// same names. Replicas load their certificate once, at start: a CA made anew while
/// they run would fail every handshake (BadSignature) until they restart.
pub fn ensure(dir: &Path, names: &[String]) -> Result<Made, String> {
    let recorded = std::fs::read_to_string(dir.join(NAMES)).ok();
    let complete = ["ca.pem", "cert.pem", "key.pem"].iter().all(|f| dir.join(f).is_file());
    if complete && recorded.as_deref() == Some(names.join("\n").as_str()) {
        return Ok(Made::Kept);
    }
    generate(dir, names)?;
    let path = dir.join(NAMES);
    std::fs::write(&path, names.join("\n")).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Made::Written)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_made_for_the_same_names_are_kept_and_others_replaced() {
        let dir = std::env::temp_dir().join(format!("grpc-h3-ensure-{}", std::process::id()));
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ca = || std::fs::read(dir.join("ca.pem")).unwrap();

        assert_eq!(ensure(&dir, &names(&["server", "proxy"])), Ok(Made::Written));
        let first = ca();
        assert_eq!(ensure(&dir, &names(&["server", "proxy"])), Ok(Made::Kept));
        assert_eq!(ca(), first, "the CA the running replicas were signed by stays");

        assert_eq!(ensure(&dir, &names(&["server", "proxy", "server4"])), Ok(Made::Written));
        assert_ne!(ca(), first, "other names: a new set");
        std::fs::remove_file(dir.join("key.pem")).unwrap();
        assert_eq!(
            ensure(&dir, &names(&["server", "proxy", "server4"])),
            Ok(Made::Written),
            "an incomplete set is made again"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
