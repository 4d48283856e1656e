//! Test certificates: a throwaway CA, server and client certificates it signs; the APNs
//! emulator the client's tests run against; waiting on a condition.

use std::path::PathBuf;
use std::time::Duration;

use pgpushd_emulator::{Emulator, EmulatorConfig};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};

pub struct Ca {
    pub cert: X509,
    pub key: PKey<Private>,
}

pub fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

pub fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn builder(cn: &str, key: &PKey<Private>, days: u32) -> X509Builder {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(days).unwrap())
        .unwrap();
    b
}

impl Ca {
    pub fn new() -> Ca {
        let key = ec_key();
        let mut b = builder("pgpushd test CA", &key, 2);
        let name = {
            let mut n = X509NameBuilder::new().unwrap();
            n.append_entry_by_nid(Nid::COMMONNAME, "pgpushd test CA")
                .unwrap();
            n.build()
        };
        b.set_issuer_name(&name).unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        Ca {
            cert: b.build(),
            key,
        }
    }

    /// A server certificate for `sans` (IP addresses or DNS names).
    pub fn server(&self, key: &PKey<Private>, sans: &[&str]) -> X509 {
        let mut b = builder("pgpushd test server", key, 2);
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        let mut san = SubjectAlternativeName::new();
        for s in sans {
            match s.parse::<std::net::IpAddr>() {
                Ok(_) => san.ip(s),
                Err(_) => san.dns(s),
            };
        }
        let san = san
            .build(&b.x509v3_context(Some(&self.cert), None))
            .unwrap();
        b.append_extension(san).unwrap();
        b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap())
            .unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    /// A client certificate like Apple's "Apple Push Services: <bundle id>".
    pub fn client(&self, key: &PKey<Private>, cn: &str) -> X509 {
        let mut b = builder(cn, key, 2);
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap())
            .unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        b.build()
    }
}

/// How long a test waits for a condition before failing.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `cond` holds, checking every few milliseconds; panics after [`DEADLINE`].
pub async fn eventually(cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .expect("the condition the test waits for");
}

/// The APNs emulator, with its CA written to a file for the client's `ca_file`: the
/// client trusts it the way it trusts any private CA, verification on.
pub struct TestEmulator {
    pub emulator: Emulator,
    pub ca_file: PathBuf,
    /// Holds `ca_file` and anything else a test writes.
    pub dir: tempfile::TempDir,
}

impl TestEmulator {
    pub async fn start(config: EmulatorConfig) -> TestEmulator {
        let emulator = Emulator::start(config).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, emulator.ca_pem()).unwrap();
        TestEmulator {
            emulator,
            ca_file,
            dir,
        }
    }

    /// An open emulator (no authentication, any topic).
    pub async fn open() -> TestEmulator {
        TestEmulator::start(EmulatorConfig::default()).await
    }

    pub fn port(&self) -> u16 {
        self.emulator.addr().port()
    }
}

impl std::ops::Deref for TestEmulator {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        &self.emulator
    }
}
