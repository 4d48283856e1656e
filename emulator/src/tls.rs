//! TLS for the emulator, all openssl: a CA and a `localhost` server certificate made at
//! start (the CA reused from `tls_dir` when one is there, so clients trust it once),
//! ALPN `h2` only, and in client-certificate mode a required client certificate signed by
//! the configured CA.
//!
//! [`CertificateAuthority`] is public: tests of certificate auth use it to make a CA for
//! the emulator to require and the client certificate a provider presents.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{self, AlpnError, SslAcceptor, SslMethod, SslVerifyMode};
use openssl::stack::Stack;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509Builder, X509NameBuilder, X509};

/// ALPN protocol list (wire format) the emulator speaks: HTTP/2 only, like APNs.
const ALPN_H2: &[u8] = b"\x02h2";
const CA_DAYS: u32 = 3650;
/// Below the 398 days clients such as Apple's accept for server certificates.
const LEAF_DAYS: u32 = 397;

/// A certificate authority: a self-signed CA certificate and its key.
pub struct CertificateAuthority {
    cert: X509,
    key: PKey<Private>,
}

/// A certificate issued by a [`CertificateAuthority`], with its private key (PKCS#8).
pub struct Issued {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl Issued {
    /// Certificate then key in one PEM, the `ck.pem` shape certificate auth reads.
    pub fn combined_pem(&self) -> Vec<u8> {
        [self.cert_pem.as_slice(), self.key_pem.as_slice()].concat()
    }
}

enum Leaf<'a> {
    Server {
        dns: &'a [&'a str],
        ips: &'a [IpAddr],
    },
    Client,
}

impl CertificateAuthority {
    /// A new CA (P-256 key, ten years).
    pub fn generate(common_name: &str) -> anyhow::Result<CertificateAuthority> {
        let key = new_key()?;
        let name = name(common_name)?;
        let mut builder = builder(&name, &name, &key, CA_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
        builder.append_extension(ski)?;
        builder.sign(&key, MessageDigest::sha256())?;
        Ok(CertificateAuthority {
            cert: builder.build(),
            key,
        })
    }

    /// A CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<CertificateAuthority> {
        let cert = X509::from_pem(cert_pem).context("cannot read the CA certificate")?;
        let key = PKey::private_key_from_pem(key_pem).context("cannot read the CA key")?;
        ensure!(
            cert.public_key()?.public_eq(&key),
            "the CA key does not match the CA certificate"
        );
        Ok(CertificateAuthority { cert, key })
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        self.cert.to_pem().expect("an X509 encodes to PEM")
    }

    /// The CA's private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> Vec<u8> {
        self.key
            .private_key_to_pem_pkcs8()
            .expect("a key encodes to PEM")
    }

    /// A TLS server certificate for these names and addresses (subjectAltName).
    pub fn issue_server(&self, dns: &[&str], ips: &[IpAddr]) -> anyhow::Result<Issued> {
        let cn = dns.first().copied().unwrap_or("pgpushd emulator");
        self.issue(cn, Leaf::Server { dns, ips })
    }

    /// A TLS client certificate (as for APNs certificate auth).
    pub fn issue_client(&self, common_name: &str) -> anyhow::Result<Issued> {
        self.issue(common_name, Leaf::Client)
    }

    fn issue(&self, common_name: &str, leaf: Leaf<'_>) -> anyhow::Result<Issued> {
        let key = new_key()?;
        let subject = name(common_name)?;
        let mut builder = builder(&subject, self.cert.subject_name(), &key, LEAF_DAYS)?;
        builder.append_extension(BasicConstraints::new().critical().build()?)?;
        builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        match leaf {
            Leaf::Server { dns, ips } => {
                builder.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
                let mut san = SubjectAlternativeName::new();
                for name in dns {
                    san.dns(name);
                }
                for ip in ips {
                    san.ip(&ip.to_string());
                }
                let san = san.build(&builder.x509v3_context(Some(&self.cert), None))?;
                builder.append_extension(san)?;
            }
            Leaf::Client => {
                builder.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
            }
        }
        let ski =
            SubjectKeyIdentifier::new().build(&builder.x509v3_context(Some(&self.cert), None))?;
        builder.append_extension(ski)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(false)
            .build(&builder.x509v3_context(Some(&self.cert), None))?;
        builder.append_extension(aki)?;
        builder.sign(&self.key, MessageDigest::sha256())?;
        Ok(Issued {
            cert_pem: builder.build().to_pem()?,
            key_pem: key.private_key_to_pem_pkcs8()?,
        })
    }
}

fn new_key() -> anyhow::Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn name(common_name: &str) -> anyhow::Result<openssl::x509::X509Name> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "pgpushd emulator")?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(name.build())
}

fn builder(
    subject: &openssl::x509::X509NameRef,
    issuer: &openssl::x509::X509NameRef,
    key: &PKey<Private>,
    days: u32,
) -> anyhow::Result<X509Builder> {
    let mut builder = X509Builder::new()?;
    builder.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(subject)?;
    builder.set_issuer_name(issuer)?;
    builder.set_pubkey(key)?;
    // An hour back, for clients whose clock is a little behind.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let not_before = Asn1Time::from_unix(now.saturating_sub(3600) as _)?;
    let not_after = Asn1Time::days_from_now(days)?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    Ok(builder)
}

/// The emulator's TLS: what accepts connections, and the CA clients must trust.
pub(crate) struct ServerTls {
    pub acceptor: SslAcceptor,
    pub ca_pem: Vec<u8>,
}

/// Makes (or, from `tls_dir`, reuses) the CA, issues the server certificate, writes
/// `ca.pem`, `ca.key`, `server.pem` and `server.key` to `tls_dir` when given, and builds
/// the acceptor. `client_ca`: require client certificates signed by one of these (PEM).
pub(crate) fn server_tls(
    listen: SocketAddr,
    tls_dir: Option<&Path>,
    client_ca: Option<&[u8]>,
) -> anyhow::Result<ServerTls> {
    server_tls_with_alpn(listen, tls_dir, client_ca, Some(ALPN_H2))
}

/// [`server_tls`] for a server listening on several addresses (the APNs emulator's push
/// and channels listeners): one certificate valid for each of their addresses.
pub(crate) fn server_tls_on(
    listens: &[SocketAddr],
    tls_dir: Option<&Path>,
    client_ca: Option<&[u8]>,
) -> anyhow::Result<ServerTls> {
    server_tls_for(listens, tls_dir, client_ca, Some(ALPN_H2))
}

/// [`server_tls`] with another ALPN list (wire format); `None`: no ALPN at all, as the
/// binary protocol's gateway, whose clients offer none.
pub(crate) fn server_tls_with_alpn(
    listen: SocketAddr,
    tls_dir: Option<&Path>,
    client_ca: Option<&[u8]>,
    alpn: Option<&'static [u8]>,
) -> anyhow::Result<ServerTls> {
    server_tls_for(&[listen], tls_dir, client_ca, alpn)
}

fn server_tls_for(
    listens: &[SocketAddr],
    tls_dir: Option<&Path>,
    client_ca: Option<&[u8]>,
    alpn: Option<&'static [u8]>,
) -> anyhow::Result<ServerTls> {
    if let Some(dir) = tls_dir {
        check_tls_dir(dir)?;
    }
    let ca = match tls_dir {
        Some(dir) if dir.join("ca.pem").exists() && dir.join("ca.key").exists() => {
            let read = |f: &str| {
                std::fs::read(dir.join(f))
                    .with_context(|| format!("cannot read {}", dir.join(f).display()))
            };
            CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca.key")?)
                .with_context(|| format!("cannot reuse the CA in {}", dir.display()))?
        }
        _ => CertificateAuthority::generate("pgpushd emulator CA")?,
    };
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    for listen in listens {
        if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
            ips.push(listen.ip());
        }
    }
    let server = ca.issue_server(&["localhost"], &ips)?;
    let ca_pem = ca.cert_pem();
    if let Some(dir) = tls_dir {
        write_file(&dir.join("ca.pem"), &ca_pem, 0o644)?;
        write_file(&dir.join("ca.key"), &ca.key_pem(), 0o600)?;
        write_file(&dir.join("server.pem"), &server.cert_pem, 0o644)?;
        write_file(&dir.join("server.key"), &server.key_pem, 0o600)?;
    }

    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    let cert = X509::from_pem(&server.cert_pem)?;
    let key = PKey::private_key_from_pem(&server.key_pem)?;
    builder.set_certificate(&cert)?;
    builder.set_private_key(&key)?;
    builder.check_private_key()?;
    if let Some(alpn) = alpn {
        builder.set_alpn_select_callback(move |_, offered| {
            ssl::select_next_proto(alpn, offered).ok_or(AlpnError::ALERT_FATAL)
        });
    }
    if let Some(pem) = client_ca {
        let cas = X509::stack_from_pem(pem).context("cannot read the client CA")?;
        ensure!(!cas.is_empty(), "the client CA file holds no certificate");
        let mut store = X509StoreBuilder::new()?;
        let mut names = Stack::new()?;
        for ca in cas {
            names.push(ca.subject_name().to_owned()?)?;
            store.add_cert(ca)?;
        }
        builder.set_verify_cert_store(store.build())?;
        builder.set_client_ca_list(names);
        builder.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        builder.set_session_id_context(b"pgpushd-emulator")?;
    }
    Ok(ServerTls {
        acceptor: builder.build(),
        ca_pem,
    })
}

/// `--tls-dir` holds the CA key the emulator reuses and the keys it writes: a directory
/// another user owns, or one its group or others may write to, would let someone else
/// swap the CA clients trust, or read a key through a file they planted. Such a
/// directory is refused; a missing one is created for this user alone (0700).
pub(crate) fn check_tls_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};

    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the TLS directory {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir)
        .with_context(|| format!("cannot use the TLS directory {}", dir.display()))?;
    ensure!(
        meta.is_dir(),
        "the TLS directory {} is not a directory",
        dir.display()
    );
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    ensure!(
        meta.uid() == me,
        "refusing the TLS directory {}: it belongs to uid {}, not to this user (uid {me}); \
         another user could replace the CA and keys in it. Use a directory of your own",
        dir.display(),
        meta.uid()
    );
    let mode = meta.mode() & 0o7777;
    ensure!(
        mode & 0o022 == 0,
        "refusing the TLS directory {}: its group or others may write to it (mode {mode:04o}); \
         they could replace the CA and keys in it. Run `chmod go-w {}` or use another directory",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// Writes with `mode` from the start, so a key is never readable by others.
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::x509::store::X509StoreBuilder;
    use openssl::x509::X509StoreContext;

    fn verifies(ca: &CertificateAuthority, cert_pem: &[u8]) -> bool {
        let mut store = X509StoreBuilder::new().unwrap();
        store
            .add_cert(X509::from_pem(&ca.cert_pem()).unwrap())
            .unwrap();
        let store = store.build();
        let cert = X509::from_pem(cert_pem).unwrap();
        let chain = Stack::new().unwrap();
        let mut ctx = X509StoreContext::new().unwrap();
        ctx.init(&store, &cert, &chain, |c| c.verify_cert())
            .unwrap()
    }

    #[test]
    fn issued_certificates_chain_to_their_ca_only() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let other = CertificateAuthority::generate("other CA").unwrap();
        let server = ca
            .issue_server(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        let client = ca.issue_client("client").unwrap();
        assert!(verifies(&ca, &server.cert_pem));
        assert!(verifies(&ca, &client.cert_pem));
        assert!(!verifies(&other, &client.cert_pem));

        let cert = X509::from_pem(&server.cert_pem).unwrap();
        let sans: Vec<String> = cert
            .subject_alt_names()
            .unwrap()
            .iter()
            .map(|n| match (n.dnsname(), n.ipaddress()) {
                (Some(dns), _) => dns.to_owned(),
                (_, Some(ip)) => format!("{ip:?}"),
                _ => String::new(),
            })
            .collect();
        assert_eq!(sans, ["localhost", "[127, 0, 0, 1]"]);
        let key = PKey::private_key_from_pem(&server.key_pem).unwrap();
        assert!(cert.public_key().unwrap().public_eq(&key));
        assert!(client.combined_pem().starts_with(&client.cert_pem));
    }

    #[test]
    fn a_ca_round_trips_through_pem() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let again = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let client = again.issue_client("c").unwrap();
        assert!(verifies(&ca, &client.cert_pem));
        let other = CertificateAuthority::generate("other").unwrap();
        assert!(CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pem()).is_err());
    }

    #[test]
    fn tls_dir_is_written_then_its_ca_reused() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = server_tls(listen, Some(dir.path()), None).unwrap();
        for file in ["ca.pem", "ca.key", "server.pem", "server.key"] {
            assert!(dir.path().join(file).exists(), "{file}");
        }
        let mode = std::fs::metadata(dir.path().join("server.key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read(dir.path().join("ca.pem")).unwrap(),
            first.ca_pem
        );
        let second = server_tls(listen, Some(dir.path()), None).unwrap();
        assert_eq!(first.ca_pem, second.ca_pem);
        let fresh = server_tls(listen, None, None).unwrap();
        assert_ne!(first.ca_pem, fresh.ca_pem);
        assert!(server_tls(listen, None, Some(b"not a pem")).is_err());
    }
}
