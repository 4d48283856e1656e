//! TLS to the push services (APNs over both protocols, FCM and Google's token endpoint):
//! TLS 1.2 or later, the system's roots plus an app's `ca_file`, its client certificate
//! when it has one, and ALPN `h2` for HTTP/2.

use std::path::Path;

use crate::openssl_reason::openssl_reason;

/// A TLS connector; `alpn` is the protocols to offer (`&["h2"]`, or none).
pub fn connector(
    ca_file: Option<&Path>,
    identity: Option<native_tls::Identity>,
    alpn: &[&str],
) -> Result<native_tls::TlsConnector, String> {
    let mut builder = native_tls::TlsConnector::builder();
    builder.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
    if !alpn.is_empty() {
        builder.request_alpns(alpn);
    }
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            builder.add_root_certificate(cert);
        }
    }
    if let Some(identity) = identity {
        builder.identity(identity);
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

/// Every certificate in a PEM file, errors naming the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<native_tls::Certificate>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("{}: cannot read the CA file: {e}", path.display()))?;
    let certs = openssl::x509::X509::stack_from_pem(&pem).map_err(|e| {
        format!(
            "{}: not a PEM certificate file: {}",
            path.display(),
            openssl_reason(&e)
        )
    })?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the CA file", path.display()));
    }
    certs
        .iter()
        .map(|c| {
            c.to_der()
                .ok()
                .and_then(|der| native_tls::Certificate::from_der(&der).ok())
                .ok_or_else(|| format!("{}: a certificate cannot be used", path.display()))
        })
        .collect()
}
