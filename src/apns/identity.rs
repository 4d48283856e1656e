//! The TLS client identity for certificate auth, from the file users actually have: a
//! PKCS#12 export, or a PEM with the certificate(s) and a key that may be encrypted —
//! PKCS#8 (`ENCRYPTED PRIVATE KEY`) or the legacy `Proc-Type: 4,ENCRYPTED` form of the
//! `ck.pem` the old Apple guides build with `cat PushChatCert.pem PushChatKey.pem`.
//!
//! OpenSSL decrypts; native-tls gets the unencrypted PKCS#8 key and the chain. Errors name
//! the file and the problem, never any key material.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use openssl::pkcs12::Pkcs12;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use crate::config::CertificateAuth;
use crate::openssl_reason::openssl_reason;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: cannot read the certificate file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot read the passphrase file: {source}", path.display())]
    ReadPassphrase {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: wrong passphrase (or a damaged file)", path.display())]
    WrongPassphrase { path: PathBuf },
    #[error(
        "{}: the private key is encrypted but no passphrase_file is configured",
        path.display()
    )]
    NeedPassphrase { path: PathBuf },
    #[error(
        "{}: no private key in the PEM file (expected a PRIVATE KEY, ENCRYPTED PRIVATE KEY \
         or RSA PRIVATE KEY block next to the certificate)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("{}: no certificate in the file (expected a CERTIFICATE block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: the private key does not belong to the certificate {subject:?}", path.display())]
    KeyMismatch { path: PathBuf, subject: String },
    #[error("{}: not a valid PKCS#12 (.p12) file: {message}", path.display())]
    MalformedP12 { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: the certificate expired on {not_after}; download a new one from Apple", path.display())]
    Expired { path: PathBuf, not_after: String },
}

/// A client identity, ready for the TLS connector.
pub struct ClientIdentity {
    pub identity: native_tls::Identity,
    /// The certificate's subject, e.g. `CN=Apple Push Services: com.example.app`.
    pub subject: String,
    /// When the certificate stops working (Apple's expire after a year).
    pub not_after: String,
    pub expired: bool,
    /// Whole days until it expires (negative once it has).
    pub days_left: i32,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// [`load`] for an app at start-up: an expired certificate is an error, one close to
/// expiry a warning; both transports use it.
pub(crate) fn load_for_app(
    app: &str,
    auth: &CertificateAuth,
) -> Result<native_tls::Identity, IdentityError> {
    let id = load(auth)?;
    if id.expired {
        return Err(IdentityError::Expired {
            path: auth.file.clone(),
            not_after: id.not_after,
        });
    }
    tracing::info!(app, subject = %id.subject, not_after = %id.not_after,
                   "loaded the APNs client certificate");
    if id.days_left < 30 {
        tracing::warn!(app, subject = %id.subject, not_after = %id.not_after,
                       days_left = id.days_left, "the APNs client certificate expires soon");
    }
    Ok(id.identity)
}

/// Reads the identity `auth` names.
pub fn load(auth: &CertificateAuth) -> Result<ClientIdentity, IdentityError> {
    let data = std::fs::read(&auth.file).map_err(|source| IdentityError::Read {
        path: auth.file.clone(),
        source,
    })?;
    let passphrase = auth
        .passphrase_file
        .as_ref()
        .map(|p| read_passphrase(p))
        .transpose()?;
    from_bytes(&data, &auth.file, passphrase.as_deref())
}

/// The passphrase file's content, less one trailing newline (as `echo` writes it).
pub fn read_passphrase(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let mut p = std::fs::read(path).map_err(|source| IdentityError::ReadPassphrase {
        path: path.to_owned(),
        source,
    })?;
    if p.last() == Some(&b'\n') {
        p.pop();
        if p.last() == Some(&b'\r') {
            p.pop();
        }
    }
    Ok(p)
}

/// `path` names the file in errors; PEM when the data looks like PEM, else PKCS#12.
pub fn from_bytes(
    data: &[u8],
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<ClientIdentity, IdentityError> {
    let (key, chain) = if data.windows(11).any(|w| w == b"-----BEGIN ") {
        from_pem(data, path, passphrase)?
    } else {
        from_pkcs12(data, path, passphrase)?
    };
    let invalid = |e: openssl::error::ErrorStack| IdentityError::Invalid {
        path: path.to_owned(),
        message: openssl_reason(&e),
    };
    let leaf = &chain[0];
    let subject = describe_name(leaf);
    let not_after = leaf.not_after().to_string();
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(invalid)?;
    let expired = leaf.not_after() < now;
    let days_left = now.diff(leaf.not_after()).map_err(invalid)?.days;
    let mut chain_pem = Vec::new();
    for cert in &chain {
        chain_pem.extend(cert.to_pem().map_err(invalid)?);
    }
    let key_pem = key.private_key_to_pem_pkcs8().map_err(invalid)?;
    let identity = native_tls::Identity::from_pkcs8(&chain_pem, &key_pem).map_err(|e| {
        IdentityError::Invalid {
            path: path.to_owned(),
            message: format!("TLS cannot use this certificate and key: {e}"),
        }
    })?;
    Ok(ClientIdentity {
        identity,
        subject,
        not_after,
        expired,
        days_left,
    })
}

fn describe_name(cert: &X509) -> String {
    cert.subject_name()
        .entries()
        .map(|e| {
            let field = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_default();
            format!("{field}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One `-----BEGIN label-----` ... `-----END label-----` block, headers included.
struct PemBlock<'a> {
    label: &'a str,
    text: &'a str,
}

fn pem_blocks(text: &str) -> Vec<PemBlock<'_>> {
    let mut blocks = Vec::new();
    let mut rest = text;
    let mut offset = 0;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = &after[..label_end];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = rest[start..].find(&end_marker) else {
            break;
        };
        let block_end = start + end + end_marker.len();
        blocks.push(PemBlock {
            label,
            text: &text[offset + start..offset + block_end],
        });
        offset += block_end;
        rest = &rest[block_end..];
    }
    blocks
}

fn from_pem(
    data: &[u8],
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<(PKey<Private>, Vec<X509>), IdentityError> {
    let text = String::from_utf8_lossy(data);
    let blocks = pem_blocks(&text);
    let keys: Vec<_> = blocks
        .iter()
        .filter(|b| b.label.ends_with("PRIVATE KEY"))
        .collect();
    let key_block = match keys.as_slice() {
        [] => return Err(IdentityError::NoKey { path: path.into() }),
        [one] => one,
        more => {
            return Err(IdentityError::Invalid {
                path: path.into(),
                message: format!("{} private keys in one file; keep one", more.len()),
            })
        }
    };
    let key = decrypt_key(key_block.text.as_bytes(), path, passphrase)?;
    let certs = blocks
        .iter()
        .filter(|b| b.label == "CERTIFICATE")
        .map(|b| {
            X509::from_pem(b.text.as_bytes()).map_err(|e| IdentityError::Invalid {
                path: path.into(),
                message: format!("a CERTIFICATE block does not parse: {}", openssl_reason(&e)),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((key.clone(), leaf_first(key, certs, path)?))
}

/// Decrypts (if need be) without ever letting OpenSSL prompt on a terminal.
fn decrypt_key(
    pem: &[u8],
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<PKey<Private>, IdentityError> {
    let mut asked = false;
    let result = PKey::private_key_from_pem_callback(pem, |buf| {
        asked = true;
        match passphrase {
            Some(p) if p.len() <= buf.len() => {
                buf[..p.len()].copy_from_slice(p);
                Ok(p.len())
            }
            _ => Ok(0),
        }
    });
    match result {
        Ok(key) => Ok(key),
        Err(_) if asked && passphrase.is_none() => {
            Err(IdentityError::NeedPassphrase { path: path.into() })
        }
        Err(_) if asked => Err(IdentityError::WrongPassphrase { path: path.into() }),
        Err(e) => Err(IdentityError::Invalid {
            path: path.into(),
            message: format!("the private key does not parse: {}", openssl_reason(&e)),
        }),
    }
}

/// The certificate that goes with `key` first, then the rest (intermediates).
fn leaf_first(
    key: PKey<Private>,
    mut certs: Vec<X509>,
    path: &Path,
) -> Result<Vec<X509>, IdentityError> {
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate { path: path.into() });
    }
    let matches = |c: &X509| c.public_key().is_ok_and(|p| p.public_eq(&key));
    match certs.iter().position(matches) {
        Some(i) => {
            let leaf = certs.remove(i);
            certs.insert(0, leaf);
            Ok(certs)
        }
        None => Err(IdentityError::KeyMismatch {
            path: path.into(),
            subject: describe_name(&certs[0]),
        }),
    }
}

fn from_pkcs12(
    data: &[u8],
    path: &Path,
    passphrase: Option<&[u8]>,
) -> Result<(PKey<Private>, Vec<X509>), IdentityError> {
    let p12 = Pkcs12::from_der(data).map_err(|e| IdentityError::MalformedP12 {
        path: path.into(),
        message: openssl_reason(&e),
    })?;
    let given = passphrase.is_some();
    // Exports without a password use the empty one.
    let passphrase = std::str::from_utf8(passphrase.unwrap_or_default()).map_err(|_| {
        IdentityError::Invalid {
            path: path.into(),
            message: "the passphrase is not UTF-8, which PKCS#12 passwords must be".into(),
        }
    })?;
    let parsed = match p12.parse2(passphrase) {
        Err(e) if is_unsupported(&e) && load_legacy_provider() => p12.parse2(passphrase),
        other => other,
    };
    let parsed = parsed.map_err(|e| {
        let reason = openssl_reason(&e);
        if reason.contains("mac verify failure") && !given {
            IdentityError::NeedPassphrase { path: path.into() }
        } else if reason.contains("mac verify failure") {
            IdentityError::WrongPassphrase { path: path.into() }
        } else if is_unsupported(&e) {
            IdentityError::MalformedP12 {
                path: path.into(),
                message: format!(
                    "it uses an algorithm this OpenSSL does not offer ({reason}); \
                     re-export it with modern encryption, e.g. `openssl pkcs12 -legacy \
                     -in old.p12 -nodes | openssl pkcs12 -export -out new.p12`"
                ),
            }
        } else if reason.contains("decrypt") {
            IdentityError::WrongPassphrase { path: path.into() }
        } else {
            IdentityError::MalformedP12 {
                path: path.into(),
                message: reason,
            }
        }
    })?;
    let key = parsed
        .pkey
        .ok_or_else(|| IdentityError::NoKey { path: path.into() })?;
    let mut certs: Vec<X509> = parsed.cert.into_iter().collect();
    certs.extend(parsed.ca.into_iter().flatten());
    Ok((key.clone(), leaf_first(key, certs, path)?))
}

fn is_unsupported(e: &openssl::error::ErrorStack) -> bool {
    let reason = openssl_reason(e);
    reason.contains("unsupported") || reason.contains("unknown algorithm")
}

/// Keychain exports encrypt with RC2-40 and 3DES, which OpenSSL 3 keeps in its "legacy"
/// provider. Loaded once, on demand, next to the default provider.
fn load_legacy_provider() -> bool {
    static LEGACY: OnceLock<Option<openssl::provider::Provider>> = OnceLock::new();
    LEGACY
        .get_or_init(|| {
            let p = openssl::provider::Provider::try_load(None, "legacy", true).ok();
            if p.is_none() {
                tracing::warn!("cannot load OpenSSL's legacy provider for an old .p12");
            }
            p
        })
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{self, Ca};
    use openssl::symm::Cipher;
    use std::process::Command;

    struct Fixture {
        dir: tempfile::TempDir,
        ca: Ca,
        key: PKey<Private>,
        cert: X509,
    }

    fn fixture() -> Fixture {
        let ca = Ca::new();
        let key = testutil::rsa_key();
        let cert = ca.client(&key, "Apple Push Services: com.example.app");
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            ca,
            key,
            cert,
        }
    }

    impl Fixture {
        fn write(&self, name: &str, data: &[u8]) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            p
        }
        fn auth(&self, file: PathBuf, passphrase: Option<&[u8]>) -> CertificateAuth {
            CertificateAuth {
                file,
                passphrase_file: passphrase.map(|p| self.write("pass", p)),
            }
        }
        fn cert_pem(&self) -> Vec<u8> {
            self.cert.to_pem().unwrap()
        }
        fn p12(&self, pass: &str) -> Vec<u8> {
            let mut ca = openssl::stack::Stack::new().unwrap();
            ca.push(self.ca.cert.clone()).unwrap();
            Pkcs12::builder()
                .name("push")
                .pkey(&self.key)
                .cert(&self.cert)
                .ca(ca)
                .build2(pass)
                .unwrap()
                .to_der()
                .unwrap()
        }
    }

    fn loaded(auth: &CertificateAuth) -> ClientIdentity {
        let id = load(auth).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.subject, "CN=Apple Push Services: com.example.app");
        assert!(!id.expired);
        assert!((0..=2).contains(&id.days_left), "{}", id.days_left);
        id
    }

    fn error(auth: &CertificateAuth) -> String {
        let e = load(auth).unwrap_err().to_string();
        assert!(
            e.starts_with(&auth.file.display().to_string()),
            "names the file: {e}"
        );
        assert!(!e.contains("BEGIN"), "no key material: {e}");
        e
    }

    #[test]
    fn pkcs12_with_a_passphrase() {
        let f = fixture();
        let p12 = f.write("push.p12", &f.p12("s3cret"));
        loaded(&f.auth(p12.clone(), Some(b"s3cret\n")));
        let e = error(&f.auth(p12.clone(), Some(b"wrong")));
        assert!(e.ends_with("wrong passphrase (or a damaged file)"), "{e}");
        let e = error(&f.auth(p12, None));
        assert!(e.contains("no passphrase_file is configured"), "{e}");
        let empty = f.write("empty.p12", &f.p12(""));
        loaded(&f.auth(empty, None));
    }

    #[test]
    fn malformed_pkcs12() {
        let f = fixture();
        let mut p12 = f.p12("x");
        p12.truncate(p12.len() / 2);
        let e = error(&f.auth(f.write("cut.p12", &p12), Some(b"x")));
        assert!(e.contains("not a valid PKCS#12 (.p12) file"), "{e}");
    }

    #[test]
    fn pem_with_an_encrypted_pkcs8_key() {
        let f = fixture();
        let key = f
            .key
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"pw")
            .unwrap();
        assert!(String::from_utf8_lossy(&key).contains("ENCRYPTED PRIVATE KEY"));
        let pem = f.write("ck.pem", &[f.cert_pem(), key].concat());
        loaded(&f.auth(pem.clone(), Some(b"pw\n")));
        let e = error(&f.auth(pem.clone(), Some(b"pw2")));
        assert!(e.ends_with("wrong passphrase (or a damaged file)"), "{e}");
        let e = error(&f.auth(pem, None));
        assert!(
            e.ends_with("the private key is encrypted but no passphrase_file is configured"),
            "{e}"
        );
    }

    #[test]
    fn pem_with_a_legacy_encrypted_rsa_key() {
        let f = fixture();
        let rsa = f.key.rsa().unwrap();
        let key = rsa
            .private_key_to_pem_passphrase(Cipher::des_ede3_cbc(), b"pushchat")
            .unwrap();
        assert!(String::from_utf8_lossy(&key).contains("Proc-Type: 4,ENCRYPTED"));
        // The key first, the chain in any order: the leaf is found by its key.
        let file = [key, f.ca.cert.to_pem().unwrap(), f.cert_pem()].concat();
        let pem = f.write("ck.pem", &file);
        loaded(&f.auth(pem.clone(), Some(b"pushchat")));
        let e = error(&f.auth(pem, Some(b"pushchap")));
        assert!(e.contains("wrong passphrase"), "{e}");
    }

    #[test]
    fn pem_without_encryption() {
        let f = fixture();
        let key = f.key.private_key_to_pem_pkcs8().unwrap();
        loaded(&f.auth(f.write("ck.pem", &[f.cert_pem(), key].concat()), None));
        let ec = testutil::ec_key();
        let cert = f.ca.client(&ec, "Apple Push Services: com.example.app");
        let sec1 = ec.ec_key().unwrap().private_key_to_pem().unwrap();
        let file = [cert.to_pem().unwrap(), sec1].concat();
        loaded(&f.auth(f.write("ec.pem", &file), None));
    }

    /// The old guides: export from Keychain, split with `openssl pkcs12`, `cat` together.
    #[test]
    fn a_ck_pem_made_like_the_old_apple_guides() {
        let f = fixture();
        let p12 = f.write("PushChatKey.p12", &f.p12("export"));
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(f.dir.path())
                .output()
                .expect("the openssl command");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        f.write("PushChatCert.pem", &f.cert_pem());
        openssl(&[
            "pkcs12",
            "-in",
            p12.to_str().unwrap(),
            "-nocerts",
            "-passin",
            "pass:export",
            "-passout",
            "pass:pushchat",
            "-out",
            "PushChatKey.pem",
        ]);
        let ck = [
            std::fs::read(f.dir.path().join("PushChatCert.pem")).unwrap(),
            std::fs::read(f.dir.path().join("PushChatKey.pem")).unwrap(),
        ]
        .concat();
        assert!(String::from_utf8_lossy(&ck).contains("Bag Attributes"));
        loaded(&f.auth(f.write("ck.pem", &ck), Some(b"pushchat\n")));
    }

    /// Keychain-style encryption (RC2-40 for certificates) needs OpenSSL's legacy provider.
    #[test]
    fn a_legacy_pkcs12() {
        let f = fixture();
        let pem = [f.cert_pem(), f.key.private_key_to_pem_pkcs8().unwrap()].concat();
        f.write("in.pem", &pem);
        let out = Command::new("openssl")
            .args([
                "pkcs12", "-export", "-legacy", "-in", "in.pem", "-passout", "pass:old", "-out",
                "old.p12",
            ])
            .current_dir(f.dir.path())
            .output()
            .expect("the openssl command");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        loaded(&f.auth(f.dir.path().join("old.p12"), Some(b"old")));
    }

    #[test]
    fn pem_failures() {
        let f = fixture();
        let key = f.key.private_key_to_pem_pkcs8().unwrap();

        let e = error(&f.auth(f.write("cert-only.pem", &f.cert_pem()), None));
        assert!(e.contains(": no private key in the PEM file"), "{e}");

        let e = error(&f.auth(f.write("key-only.pem", &key), None));
        assert!(
            e.ends_with(": no certificate in the file (expected a CERTIFICATE block)"),
            "{e}"
        );

        let other =
            f.ca.client(&testutil::rsa_key(), "Apple Push Services: other");
        let file = [other.to_pem().unwrap(), key.clone()].concat();
        let e = error(&f.auth(f.write("mismatch.pem", &file), None));
        assert!(
            e.ends_with(
                ": the private key does not belong to the certificate \
                 \"CN=Apple Push Services: other\""
            ),
            "{e}"
        );

        let e = error(&f.auth(f.dir.path().join("missing.pem"), None));
        assert!(e.contains(": cannot read the certificate file: "), "{e}");

        let pem = f.write("ck.pem", &[f.cert_pem(), key].concat());
        let auth = CertificateAuth {
            file: pem,
            passphrase_file: Some(f.dir.path().join("no-such-pass")),
        };
        let e = load(&auth).unwrap_err().to_string();
        assert!(
            e.contains("no-such-pass: cannot read the passphrase file"),
            "{e}"
        );
    }

    #[test]
    fn passphrases_lose_one_trailing_newline() {
        let f = fixture();
        let p = f.write("p", b"secret\n\n");
        assert_eq!(read_passphrase(&p).unwrap(), b"secret\n");
        let p = f.write("p", b"secret\r\n");
        assert_eq!(read_passphrase(&p).unwrap(), b"secret");
        let p = f.write("p", b" secret ");
        assert_eq!(read_passphrase(&p).unwrap(), b" secret ");
    }

    #[test]
    fn pem_blocks_are_split_with_their_headers() {
        let text = "Bag Attributes\n-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nx\n\
                    -----END RSA PRIVATE KEY-----\njunk\n-----BEGIN CERTIFICATE-----\ny\n-----END CERTIFICATE-----\n";
        let blocks = pem_blocks(text);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].label, "RSA PRIVATE KEY");
        assert!(blocks[0].text.contains("Proc-Type"));
        assert!(blocks[0].text.ends_with("-----END RSA PRIVATE KEY-----"));
        assert_eq!(
            blocks[1].text,
            "-----BEGIN CERTIFICATE-----\ny\n-----END CERTIFICATE-----"
        );
    }
}
