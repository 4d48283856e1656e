//! The one curve of Web Push (its keys, the browser's and the application server's, and
//! VAPID's), made once: OpenSSL builds a group afresh each time it is asked for one.

use std::sync::OnceLock;

use openssl::ec::{EcGroup, EcGroupRef};
use openssl::error::ErrorStack;
use openssl::nid::Nid;

/// P-256 (`prime256v1`, `secp256r1`).
pub(crate) fn group() -> Result<&'static EcGroupRef, ErrorStack> {
    static P256: OnceLock<EcGroup> = OnceLock::new();
    if let Some(group) = P256.get() {
        return Ok(group);
    }
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(P256.get_or_init(|| group))
}
