//! OAuth 2.0 access tokens for FCM, as Google's service accounts get them: a JWT
//! assertion signed with the account's key (RS256) is exchanged at the key's `token_uri`
//! (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`) for a bearer token that
//! lasts about an hour. This module builds the request and reads the answer, and says
//! when a token should be renewed; the exchange itself goes over the app's connection.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::sign::Signer;
use serde::Deserialize;

use super::service_account::ServiceAccount;
use crate::secret::Secret;

/// The scope that allows `messages:send`.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// How long an assertion claims to be valid: Google accepts at most an hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest a token is believed to last, whatever the endpoint says (Google's last an
/// hour); it also keeps `Instant` arithmetic far from overflowing.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A token is renewed this long before it expires (or at two thirds of its life when that
/// is later), while sends go on with it.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// The signed assertion `iat` seconds after the epoch: `header.claims.signature`.
pub fn assertion(account: &ServiceAccount, iat: u64) -> Result<String, String> {
    let header = serde_json::json!({
        "alg": "RS256",
        "typ": "JWT",
        "kid": account.private_key_id,
    });
    let claims = serde_json::json!({
        "iss": account.client_email,
        "scope": SCOPE,
        "aud": account.token_uri,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME.as_secs(),
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sign = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let mut signer = Signer::new(MessageDigest::sha256(), &account.private_key)?;
        signer.update(signing_input.as_bytes())?;
        signer.sign_to_vec()
    };
    let signature = sign().map_err(|e| format!("cannot sign the token request: {e}"))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// The token request's form body, for `POST token_uri` with
/// `content-type: application/x-www-form-urlencoded`.
pub fn request_body(account: &ServiceAccount, now: SystemTime) -> Result<String, String> {
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_owned())?
        .as_secs();
    // The assertion is base64url with dots: nothing in it needs percent-encoding.
    Ok(format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
        assertion(account, iat)?
    ))
}

/// A bearer token and when it stops working.
#[derive(Clone, Debug)]
pub struct AccessToken {
    pub token: Secret<String>,
    pub obtained: Instant,
    pub expires: Instant,
}

impl AccessToken {
    /// Whether it still works at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        now < self.expires
    }

    /// When to start renewing it: [`RENEW_BEFORE`] its expiry, or at two thirds of its
    /// life when that is later (short-lived tokens).
    pub fn renew_at(&self) -> Instant {
        let life = self.expires.saturating_duration_since(self.obtained);
        let by_margin = self
            .expires
            .checked_sub(RENEW_BEFORE)
            .unwrap_or(self.obtained);
        by_margin.max(self.obtained + life * 2 / 3)
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    expires_in: Option<u64>,
    token_type: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Why no token came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Google refused the account (`invalid_grant`, `invalid_client`, 400/401/403):
    /// nothing will change until the key or its permissions do.
    Refused(String),
    /// Anything else (5xx, 429, a garbled answer): try again later.
    Failed(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Refused(e) => {
                write!(f, "the token endpoint refused the service account: {e}")
            }
            TokenError::Failed(e) => write!(f, "no access token: {e}"),
        }
    }
}

/// Reads the token endpoint's answer to a request sent at `sent`.
pub fn read_answer(status: u16, body: &[u8], sent: Instant) -> Result<AccessToken, TokenError> {
    let answer: Option<TokenAnswer> = serde_json::from_slice(body).ok();
    // Only an error's body is ever quoted: a 200's may hold a token.
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match (status, answer) {
        (200, None) => Err(TokenError::Failed(
            "200 with a body that is not the token endpoint's JSON".to_owned(),
        )),
        (200, Some(a)) => {
            let (Some(token), Some(expires_in)) = (a.access_token, a.expires_in) else {
                return Err(TokenError::Failed(
                    "200 without access_token and expires_in".to_owned(),
                ));
            };
            if let Some(kind) = a.token_type.filter(|t| !t.eq_ignore_ascii_case("bearer")) {
                return Err(TokenError::Failed(format!(
                    "a {kind:.20} token, not a bearer token"
                )));
            }
            Ok(AccessToken {
                token: Secret::new(token),
                obtained: sent,
                expires: sent + Duration::from_secs(expires_in.min(MAX_LIFETIME.as_secs())),
            })
        }
        (400..=403, Some(a)) if a.error.is_some() => {
            let error = a.error.unwrap_or_default();
            Err(TokenError::Refused(match a.error_description {
                Some(d) => format!("{status} {error}: {d}"),
                None => format!("{status} {error}"),
            }))
        }
        (400..=403, _) => Err(TokenError::Refused(format!("{status}: {}", text()))),
        _ => Err(TokenError::Failed(format!("{status}: {}", text()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcm::service_account::tests::key_file;
    use openssl::sign::Verifier;

    fn account() -> ServiceAccount {
        let (json, _) = key_file("p1", "https://oauth2.example/token");
        ServiceAccount::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn the_assertion_is_an_rs256_jwt_with_googles_claims() {
        let sa = account();
        let jwt = assertion(&sa, 1_800_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let json = |p: &str| -> serde_json::Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
        };
        assert_eq!(
            json(parts[0]),
            serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": sa.private_key_id})
        );
        assert_eq!(
            json(parts[1]),
            serde_json::json!({
                "iss": "pgpushd@p1.iam.gserviceaccount.com",
                "scope": SCOPE,
                "aud": "https://oauth2.example/token",
                "iat": 1_800_000_000u64,
                "exp": 1_800_003_600u64,
            })
        );
        let mut verifier = Verifier::new(MessageDigest::sha256(), &sa.private_key).unwrap();
        verifier
            .update(format!("{}.{}", parts[0], parts[1]).as_bytes())
            .unwrap();
        assert!(verifier
            .verify(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .unwrap());
    }

    #[test]
    fn the_request_is_a_jwt_bearer_grant() {
        let body = request_body(&account(), SystemTime::now()).unwrap();
        let (grant, assertion) = body.split_once('&').unwrap();
        assert_eq!(
            grant,
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
        );
        assert!(assertion.starts_with("assertion=ey"), "{assertion}");
    }

    #[test]
    fn answers_become_tokens_or_say_why_not() {
        let sent = Instant::now();
        let t = read_answer(
            200,
            br#"{"access_token":"ya29.c.abc","expires_in":3599,"token_type":"Bearer"}"#,
            sent,
        )
        .unwrap();
        assert_eq!(t.token.expose(), "ya29.c.abc");
        assert_eq!(t.expires, sent + Duration::from_secs(3599));
        assert_eq!(t.renew_at(), sent + Duration::from_secs(3299));
        assert!(!format!("{t:?}").contains("ya29"), "{t:?}");

        let short = read_answer(200, br#"{"access_token":"x","expires_in":30}"#, sent).unwrap();
        assert_eq!(short.renew_at(), sent + Duration::from_secs(20));
        assert!(short.valid_at(sent + Duration::from_secs(29)));
        assert!(!short.valid_at(sent + Duration::from_secs(30)));

        assert_eq!(
            read_answer(
                400,
                br#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
                sent
            )
            .unwrap_err(),
            TokenError::Refused("400 invalid_grant: Invalid JWT Signature.".into())
        );
        assert!(matches!(
            read_answer(503, b"upstream unavailable", sent),
            Err(TokenError::Failed(e)) if e == "503: upstream unavailable"
        ));
        assert!(matches!(
            read_answer(200, br#"{"expires_in":30}"#, sent),
            Err(TokenError::Failed(_))
        ));
        // A 200's body is never quoted: it may hold a token.
        for body in [
            &br#"{"access_token":"ya29.secret","token_type":"MAC","expires_in":30}"#[..],
            br#"{"access_token":"ya29.secret"}"#,
            br#"{"access_token":"ya29.secret","expires_in":"soon"}"#,
        ] {
            let e = read_answer(200, body, sent).unwrap_err().to_string();
            assert!(!e.contains("ya29"), "{e}");
        }
        // An absurd lifetime is capped, not an overflow.
        let long = read_answer(
            200,
            br#"{"access_token":"x","expires_in":18446744073709551615}"#,
            sent,
        )
        .unwrap();
        assert_eq!(long.expires, sent + MAX_LIFETIME);
        assert!(long.renew_at() < long.expires);
        assert!(matches!(
            read_answer(
                200,
                br#"{"access_token":"x","expires_in":30,"token_type":"MAC"}"#,
                sent
            ),
            Err(TokenError::Failed(_))
        ));
    }
}
