//! ES256 JSON Web Tokens (RFC 7515, RFC 7518 §3.4), as both APNs's provider tokens and
//! Web Push's VAPID tokens are signed: ECDSA over P-256 with SHA-256, the signature as
//! JWS wants it (the raw 32-byte `r` and `s`), not OpenSSL's DER.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::ec::EcKeyRef;
use openssl::ecdsa::EcdsaSig;
use openssl::error::ErrorStack;
use openssl::pkey::Private;
use openssl::sha::sha256;

/// `base64url(header).base64url(claims).base64url(r || s)`, `header` and `claims` being
/// JSON texts, signed with `key` (a P-256 key).
pub fn sign(key: &EcKeyRef<Private>, header: &str, claims: &str) -> Result<String, ErrorStack> {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = EcdsaSig::sign(&sha256(input.as_bytes()), key)?;
    let mut raw = sig.r().to_vec_padded(32)?;
    raw.extend(sig.s().to_vec_padded(32)?);
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw)))
}
