//! Checking an application server's identity, RFC 8292 (VAPID), pure functions of the
//! `Authorization` header, the push resource's origin and the time.
//!
//! The header is `vapid t=<JWT>, k=<key>` (§3): `k` is the application server's P-256
//! public key, base64url (no padding) of its 65-byte uncompressed point, and `t` a JWT
//! (RFC 7519) signed with it, ES256 (a JWS whose signature is `r || s`, 32 bytes each,
//! RFC 7518 §3.4). Its claims: `aud`, the origin of the push resource (§2); `exp`, at
//! most 24 hours ahead (§2); `sub`, a `mailto:` or `https:` URI to reach the operator
//! (§2.1). Any failure here is answered 401 (§4.1); a key other than the one a
//! subscription was made with is 403 (§4.2), which the caller decides.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::bn::BigNum;
use openssl::ecdsa::EcdsaSig;
use openssl::hash::{hash, MessageDigest};
use serde_json::Value;

use super::ece;

/// RFC 8292 §2: "the "exp" (Expiry) claim MUST NOT be more than 24 hours from the time
/// of the request".
pub const MAX_EXPIRY_SECS: u64 = 24 * 60 * 60;

/// Why a VAPID credential was refused; the text is what the 401 answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VapidError {
    Missing,
    /// Another scheme (`WebPush`, `Bearer`, ...).
    Scheme(String),
    /// The parameters are not `t=..., k=...` (what is wrong).
    Malformed(&'static str),
    /// `k` is not base64url of an uncompressed P-256 point.
    BadKey,
    /// `t` is not three base64url parts, or a part is not what it should be.
    BadToken(&'static str),
    /// The JWT header's `alg` (or its absence).
    Algorithm(Option<String>),
    /// The JWT header's `typ`, when present and not `JWT`.
    Type(String),
    /// The signature does not verify with `k`.
    Signature,
    Audience {
        got: Option<String>,
        want: String,
    },
    NoExpiry,
    Expired {
        exp: u64,
        now: u64,
    },
    TooFarAhead {
        exp: u64,
        now: u64,
    },
    Subject(Option<String>),
}

impl fmt::Display for VapidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VapidError::Missing => {
                f.write_str("no Authorization header: send `Authorization: vapid t=<JWT>, k=<key>`")
            }
            VapidError::Scheme(s) => write!(
                f,
                "the Authorization scheme is {s:?}; this push service takes `vapid` (RFC 8292)"
            ),
            VapidError::Malformed(what) => write!(f, "malformed vapid Authorization: {what}"),
            VapidError::BadKey => f.write_str(
                "the vapid k parameter is not a base64url uncompressed P-256 public key (65 bytes)",
            ),
            VapidError::BadToken(what) => write!(f, "the vapid t parameter is not a JWT: {what}"),
            VapidError::Algorithm(alg) => write!(
                f,
                "the JWT's alg is {}; VAPID uses ES256",
                alg.as_deref().unwrap_or("missing")
            ),
            VapidError::Type(typ) => write!(f, "the JWT's typ is {typ:?}, not \"JWT\""),
            VapidError::Signature => {
                f.write_str("the JWT's signature does not verify with the key in k")
            }
            VapidError::Audience { got, want } => match got {
                Some(got) => write!(
                    f,
                    "the JWT's aud is {got:?}; it must be the push resource's origin, {want:?}"
                ),
                None => write!(
                    f,
                    "the JWT has no aud claim; it must be the push resource's origin, {want:?}"
                ),
            },
            VapidError::NoExpiry => f.write_str("the JWT has no exp claim (a number of seconds)"),
            VapidError::Expired { exp, now } => {
                write!(f, "the JWT expired: exp {exp} is not after now ({now})")
            }
            VapidError::TooFarAhead { exp, now } => write!(
                f,
                "the JWT's exp {exp} is more than 24 hours after now ({now})"
            ),
            VapidError::Subject(sub) => match sub {
                Some(sub) => write!(
                    f,
                    "the JWT's sub is {sub:?}; it must be a mailto: or https: URI"
                ),
                None => f.write_str("the JWT has no sub claim (a mailto: or https: URI)"),
            },
        }
    }
}

impl std::error::Error for VapidError {}

/// The `t` and `k` parameters of a `vapid` Authorization header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials<'a> {
    pub token: &'a str,
    pub key: &'a str,
}

/// Reads `vapid t=..., k=...`: the scheme in any case; the parameters in any order,
/// separated by commas and optional spaces, names in any case, values bare or quoted.
pub fn parse_authorization(value: &str) -> Result<Credentials<'_>, VapidError> {
    let value = value.trim();
    let (scheme, params) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("vapid") {
        return Err(VapidError::Scheme(scheme.to_owned()));
    }
    let (mut token, mut key) = (None, None);
    for param in params.split(',') {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let Some((name, value)) = param.split_once('=') else {
            return Err(VapidError::Malformed("a parameter without `=`"));
        };
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        let slot = match name.trim().to_ascii_lowercase().as_str() {
            "t" => &mut token,
            "k" => &mut key,
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(VapidError::Malformed("a parameter given twice"));
        }
    }
    match (token, key) {
        (Some(token), Some(key)) if !token.is_empty() && !key.is_empty() => {
            Ok(Credentials { token, key })
        }
        (None | Some(""), _) => Err(VapidError::Malformed("no t parameter (the JWT)")),
        _ => Err(VapidError::Malformed("no k parameter (the public key)")),
    }
}

/// What a valid credential says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `k`, decoded: 65 bytes.
    pub key: Vec<u8>,
    pub sub: String,
    pub exp: u64,
}

/// Checks the whole header against the push resource's `origin` at `now` (Unix
/// seconds): syntax, key, JWT header, signature, then the claims.
pub fn check(authorization: Option<&str>, origin: &str, now: u64) -> Result<Verified, VapidError> {
    let credentials = parse_authorization(authorization.ok_or(VapidError::Missing)?)?;
    let key = b64(credentials.key).ok_or(VapidError::BadKey)?;
    let public = ece::public_key(&key).map_err(|_| VapidError::BadKey)?;
    let mut parts = credentials.token.split('.');
    let (Some(head), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VapidError::BadToken("not three dot-separated parts"));
    };
    let header = json_object(head).ok_or(VapidError::BadToken("the header is not JSON"))?;
    check_header(&header)?;
    let claims = json_object(body).ok_or(VapidError::BadToken("the claims are not JSON"))?;
    let signature = b64(signature).ok_or(VapidError::BadToken("the signature is not base64url"))?;
    let signing_input = &credentials.token[..head.len() + 1 + body.len()];
    if !verify_es256(signing_input.as_bytes(), &signature, &public) {
        return Err(VapidError::Signature);
    }
    let (sub, exp) = check_claims(&claims, origin, now)?;
    Ok(Verified { key, sub, exp })
}

/// `alg` must be ES256; `typ`, when present, `JWT`.
pub fn check_header(header: &Value) -> Result<(), VapidError> {
    match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => {}
        other => {
            return Err(VapidError::Algorithm(
                other
                    .map(str::to_owned)
                    .or_else(|| header.get("alg").map(Value::to_string)),
            ))
        }
    }
    match header.get("typ") {
        None => Ok(()),
        Some(Value::String(t)) if t.eq_ignore_ascii_case("JWT") => Ok(()),
        Some(other) => Err(VapidError::Type(
            other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_owned),
        )),
    }
}

/// `aud` exactly `origin`, `exp` after `now` and at most 24 h later, `sub` a `mailto:` or
/// `https:` URI; gives `sub` and `exp`.
pub fn check_claims(claims: &Value, origin: &str, now: u64) -> Result<(String, u64), VapidError> {
    let aud = claims.get("aud").and_then(Value::as_str);
    if aud != Some(origin) {
        return Err(VapidError::Audience {
            got: aud
                .map(str::to_owned)
                .or_else(|| claims.get("aud").map(Value::to_string)),
            want: origin.to_owned(),
        });
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(VapidError::NoExpiry)?;
    if exp <= now {
        return Err(VapidError::Expired { exp, now });
    }
    if exp > now + MAX_EXPIRY_SECS {
        return Err(VapidError::TooFarAhead { exp, now });
    }
    let sub = claims.get("sub").and_then(Value::as_str);
    match sub {
        Some(sub) if is_contact(sub) => Ok((sub.to_owned(), exp)),
        _ => Err(VapidError::Subject(
            sub.map(str::to_owned)
                .or_else(|| claims.get("sub").map(Value::to_string)),
        )),
    }
}

/// A `mailto:` URI with an address, or an `https:` URL with a host.
pub fn is_contact(sub: &str) -> bool {
    let lower = sub.to_ascii_lowercase();
    if let Some(address) = lower.strip_prefix("mailto:") {
        return address.contains('@') && !address.contains(char::is_whitespace);
    }
    if let Some(rest) = lower.strip_prefix("https://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        return !host.is_empty() && !rest.contains(char::is_whitespace);
    }
    false
}

/// ES256: `signature` is `r || s` (32 bytes each), over SHA-256 of `input`.
pub fn verify_es256(
    input: &[u8],
    signature: &[u8],
    key: &openssl::pkey::PKeyRef<openssl::pkey::Public>,
) -> bool {
    if signature.len() != 64 {
        return false;
    }
    let verified = (|| -> Result<bool, openssl::error::ErrorStack> {
        let r = BigNum::from_slice(&signature[..32])?;
        let s = BigNum::from_slice(&signature[32..])?;
        let sig = EcdsaSig::from_private_components(r, s)?;
        let digest = hash(MessageDigest::sha256(), input)?;
        sig.verify(&digest, &*key.ec_key()?)
    })();
    verified.unwrap_or(false)
}

/// base64url without padding (padding, if sent anyway, is tolerated).
pub(crate) fn b64(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

fn json_object(part: &str) -> Option<Value> {
    let value: Value = serde_json::from_slice(&b64(part)?).ok()?;
    value.is_object().then_some(value)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::{PKey, Private};
    use serde_json::json;

    const ORIGIN: &str = "https://127.0.0.1:8443";
    const NOW: u64 = 1_700_000_000;

    pub(crate) fn new_key() -> PKey<Private> {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    /// A JWT over `header` and `claims`, signed ES256 with `key`.
    pub(crate) fn sign(key: &PKey<Private>, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let digest = hash(MessageDigest::sha256(), input.as_bytes()).unwrap();
        let sig = EcdsaSig::sign(&digest, &*key.ec_key().unwrap()).unwrap();
        let mut raw = sig.r().to_vec_padded(32).unwrap();
        raw.extend(sig.s().to_vec_padded(32).unwrap());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(raw))
    }

    /// `vapid t=..., k=...` for `claims`, signed by `key`.
    pub(crate) fn authorization(key: &PKey<Private>, claims: &Value) -> String {
        let jwt = sign(key, &json!({"typ": "JWT", "alg": "ES256"}), claims);
        let k = URL_SAFE_NO_PAD.encode(ece::public_bytes(key).unwrap());
        format!("vapid t={jwt}, k={k}")
    }

    fn claims() -> Value {
        json!({"aud": ORIGIN, "exp": NOW + 3600, "sub": "mailto:ops@example.com"})
    }

    #[test]
    fn a_valid_credential_passes() {
        let key = new_key();
        let verified = check(Some(&authorization(&key, &claims())), ORIGIN, NOW).unwrap();
        assert_eq!(verified.key, ece::public_bytes(&key).unwrap());
        assert_eq!(verified.sub, "mailto:ops@example.com");
        assert_eq!(verified.exp, NOW + 3600);
    }

    #[test]
    fn header_syntax() {
        let ok = |v| parse_authorization(v).unwrap();
        assert_eq!(
            ok("vapid t=a.b.c, k=BKEY"),
            Credentials {
                token: "a.b.c",
                key: "BKEY"
            }
        );
        assert_eq!(ok("VAPID k=\"BKEY\",t=a.b.c").token, "a.b.c");
        assert_eq!(ok("vapid t=a.b.c,k=BKEY,x=1").key, "BKEY");
        let err = |v| parse_authorization(v).unwrap_err();
        assert_eq!(err("WebPush a.b.c"), VapidError::Scheme("WebPush".into()));
        assert_eq!(err("Bearer x"), VapidError::Scheme("Bearer".into()));
        assert!(matches!(err("vapid k=BKEY"), VapidError::Malformed(_)));
        assert!(matches!(err("vapid t=a.b.c"), VapidError::Malformed(_)));
        assert!(matches!(
            err("vapid t=a.b.c, t=d, k=K"),
            VapidError::Malformed(_)
        ));
        assert!(matches!(err("vapid t"), VapidError::Malformed(_)));
        assert!(matches!(err("vapid"), VapidError::Malformed(_)));
    }

    #[test]
    fn each_failure_is_named() {
        let key = new_key();
        let run = |auth: &str| check(Some(auth), ORIGIN, NOW).unwrap_err();
        assert_eq!(check(None, ORIGIN, NOW), Err(VapidError::Missing));
        let k = URL_SAFE_NO_PAD.encode(ece::public_bytes(&key).unwrap());
        let jwt = sign(&key, &json!({"alg": "ES256"}), &claims());
        assert_eq!(run(&format!("vapid t={jwt}, k=AAAA")), VapidError::BadKey);
        assert_eq!(run(&format!("vapid t={jwt}, k=!!")), VapidError::BadKey);
        assert!(matches!(
            run(&format!("vapid t=a.b, k={k}")),
            VapidError::BadToken(_)
        ));
        // Signed by another key than k.
        let other = authorization(&new_key(), &claims());
        let t = other.split_once("t=").unwrap().1.split_once(',').unwrap().0;
        assert_eq!(run(&format!("vapid t={t}, k={k}")), VapidError::Signature);
        let with = |claims: Value| run(&authorization(&key, &claims));
        let mut c = claims();
        c["aud"] = json!(format!("{ORIGIN}/"));
        assert!(matches!(with(c), VapidError::Audience { got: Some(g), .. } if g.ends_with('/')));
        let mut c = claims();
        c["aud"] = json!("https://localhost:8443");
        assert!(matches!(with(c), VapidError::Audience { .. }));
        let mut c = claims();
        c.as_object_mut().unwrap().remove("aud");
        assert!(matches!(with(c), VapidError::Audience { got: None, .. }));
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(with(c), VapidError::NoExpiry);
        let mut c = claims();
        c["exp"] = json!("soon");
        assert_eq!(with(c), VapidError::NoExpiry);
        let mut c = claims();
        c["exp"] = json!(NOW);
        assert_eq!(with(c), VapidError::Expired { exp: NOW, now: NOW });
        let mut c = claims();
        c["exp"] = json!(NOW + MAX_EXPIRY_SECS + 1);
        assert!(matches!(with(c), VapidError::TooFarAhead { .. }));
        let mut c = claims();
        c["exp"] = json!(NOW + MAX_EXPIRY_SECS);
        assert!(check(Some(&authorization(&key, &c)), ORIGIN, NOW).is_ok());
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(with(c), VapidError::Subject(None));
        let mut c = claims();
        c["sub"] = json!("ops@example.com");
        assert!(matches!(with(c), VapidError::Subject(Some(_))));
    }

    #[test]
    fn jwt_headers() {
        assert!(check_header(&json!({"typ": "JWT", "alg": "ES256"})).is_ok());
        assert!(check_header(&json!({"alg": "ES256"})).is_ok());
        assert!(check_header(&json!({"alg": "ES256", "typ": "jwt"})).is_ok());
        assert_eq!(
            check_header(&json!({"alg": "RS256", "typ": "JWT"})),
            Err(VapidError::Algorithm(Some("RS256".into())))
        );
        assert_eq!(
            check_header(&json!({"alg": "none"})),
            Err(VapidError::Algorithm(Some("none".into())))
        );
        assert_eq!(
            check_header(&json!({"typ": "JWT"})),
            Err(VapidError::Algorithm(None))
        );
        assert_eq!(
            check_header(&json!({"alg": "ES256", "typ": "JOSE"})),
            Err(VapidError::Type("JOSE".into()))
        );
        // A token whose header says another algorithm is refused before its signature.
        let key = new_key();
        let jwt = sign(&key, &json!({"alg": "HS256"}), &claims());
        let k = URL_SAFE_NO_PAD.encode(ece::public_bytes(&key).unwrap());
        assert!(matches!(
            check(Some(&format!("vapid t={jwt},k={k}")), ORIGIN, NOW),
            Err(VapidError::Algorithm(_))
        ));
    }

    #[test]
    fn contacts() {
        assert!(is_contact("mailto:ops@example.com"));
        assert!(is_contact("MAILTO:ops@example.com"));
        assert!(is_contact("https://example.com/contact"));
        assert!(is_contact("https://example.com"));
        assert!(!is_contact("mailto:"));
        assert!(!is_contact("mailto:nobody"));
        assert!(!is_contact("http://example.com"));
        assert!(!is_contact("https://"));
        assert!(!is_contact("ops@example.com"));
        assert!(!is_contact(""));
    }

    #[test]
    fn signatures_must_be_raw_r_and_s() {
        let key = new_key();
        let jwt = sign(&key, &json!({"alg": "ES256"}), &claims());
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let sig = b64(sig).unwrap();
        let public = ece::public_key(&ece::public_bytes(&key).unwrap()).unwrap();
        assert!(verify_es256(input.as_bytes(), &sig, &public));
        assert!(!verify_es256(input.as_bytes(), &sig[..63], &public));
        assert!(!verify_es256(b"other input", &sig, &public));
        // DER, as openssl writes it by default, is not what JWS carries.
        let der = EcdsaSig::from_private_components(
            BigNum::from_slice(&sig[..32]).unwrap(),
            BigNum::from_slice(&sig[32..]).unwrap(),
        )
        .unwrap()
        .to_der()
        .unwrap();
        assert!(!verify_es256(input.as_bytes(), &der, &public));
    }
}
