//! The OAuth 2.0 token endpoint, as Google's serves service accounts ("Using OAuth 2.0
//! for Server to Server Applications"): `POST /token` with the form
//! `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=JWT`, answered
//! `{"access_token", "expires_in", "token_type": "Bearer"}` or an OAuth error.
//!
//! The assertion is an RS256 JWT: header `{"alg": "RS256", "typ": "JWT", "kid":
//! private_key_id}`, claims `{"iss": client_email, "scope": "... space separated",
//! "aud": token_uri, "iat", "exp"}`, signed with the service account's private key.
//! [`check_assertion`] is pure (the clock is passed in); [`AccessTokens`] holds what was
//! issued.
//!
//! Where Google's documentation leaves room:
//! - A `kid` naming another key than the account's is refused like a bad signature
//!   (Google's answer for a deleted key); an assertion without `kid` is checked against
//!   the account's key.
//! - `iat` may be up to [`MAX_CLOCK_SKEW_SECS`] in the future.
//! - The scope must include [`FIREBASE_MESSAGING_SCOPE`]: the emulator's tokens serve
//!   FCM only. No scope at all is `invalid_scope` "Empty or missing scope not allowed."

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::sign::Verifier;
use serde::Deserialize;

use super::error::OauthError;
use super::service_account::ServiceAccount;

pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const FIREBASE_MESSAGING_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// `exp` may be at most this long after `iat`.
pub const MAX_ASSERTION_LIFETIME_SECS: u64 = 60 * 60;
/// How far in the future `iat` may be (clock skew).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// Access tokens remembered before expired ones are forgotten.
const TOKENS_KEPT: usize = 10_000;

const SHORT_LIVED: &str = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a \
     reasonable timeframe. Check your iat and exp values in the JWT claim.";
const BAD_SIGNATURE: &str = "Invalid JWT Signature.";

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    scope: Option<String>,
    iat: u64,
    exp: u64,
}

fn invalid_grant(description: impl Into<String>) -> OauthError {
    OauthError::new(400, "invalid_grant", description)
}

/// Checks a token request's form body at `now` (seconds since the epoch): the index in
/// `accounts` of the account a token is granted to, or the refusal.
pub fn check_assertion(
    accounts: &[ServiceAccount],
    form: &[u8],
    now: u64,
) -> Result<usize, OauthError> {
    let form = parse_form(form)?;
    let param = |name: &str| form.get(name).map(String::as_str);
    match param("grant_type") {
        None => {
            return Err(OauthError::new(
                400,
                "invalid_request",
                "Missing required parameter: grant_type",
            ))
        }
        Some(JWT_BEARER_GRANT) => {}
        Some(other) => {
            return Err(OauthError::new(
                400,
                "unsupported_grant_type",
                format!("Invalid grant_type: {other}"),
            ))
        }
    }
    let Some(jwt) = param("assertion") else {
        return Err(OauthError::new(
            400,
            "invalid_request",
            "Missing required parameter: assertion",
        ));
    };
    let not_a_jwt = || {
        invalid_grant(
            "Invalid JWT: the assertion is not a JWS (header.claims.signature, base64url)",
        )
    };
    let mut parts = jwt.split('.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(not_a_jwt());
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| not_a_jwt());
    let header: Header = serde_json::from_slice(&decode(header_b64)?).map_err(|_| not_a_jwt())?;
    let claims: Claims = serde_json::from_slice(&decode(claims_b64)?).map_err(|e| {
        invalid_grant(format!(
            "Invalid JWT: the claims must hold iss, aud, iat and exp ({e})"
        ))
    })?;
    let signature = decode(signature_b64)?;
    if header.alg != "RS256" {
        return Err(invalid_grant(format!(
            "Invalid JWT: alg must be RS256, not {:?}",
            header.alg
        )));
    }
    let Some(index) = accounts.iter().position(|a| a.client_email == claims.iss) else {
        return Err(OauthError::new(
            401,
            "invalid_client",
            "The OAuth client was not found.",
        ));
    };
    let account = &accounts[index];
    if header
        .kid
        .as_ref()
        .is_some_and(|kid| *kid != account.private_key_id)
    {
        return Err(invalid_grant(BAD_SIGNATURE));
    }
    let signed = &jwt.as_bytes()[..header_b64.len() + 1 + claims_b64.len()];
    let verified = Verifier::new(MessageDigest::sha256(), &account.key)
        .and_then(|mut v| v.verify_oneshot(&signature, signed));
    if !matches!(verified, Ok(true)) {
        return Err(invalid_grant(BAD_SIGNATURE));
    }
    if claims.aud != account.token_uri {
        return Err(invalid_grant(format!(
            "Invalid JWT: Failed audience check. The right audience is {}",
            account.token_uri
        )));
    }
    if claims.exp <= claims.iat
        || claims.exp - claims.iat > MAX_ASSERTION_LIFETIME_SECS
        || claims.exp <= now
        || claims.iat > now + MAX_CLOCK_SKEW_SECS
    {
        return Err(invalid_grant(SHORT_LIVED));
    }
    let scope = claims.scope.unwrap_or_default();
    if scope.split_whitespace().next().is_none() {
        return Err(OauthError::new(
            400,
            "invalid_scope",
            "Empty or missing scope not allowed.",
        ));
    }
    if !scope
        .split_whitespace()
        .any(|s| s == FIREBASE_MESSAGING_SCOPE)
    {
        return Err(OauthError::new(
            400,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        ));
    }
    Ok(index)
}

/// `application/x-www-form-urlencoded`: `+` is a space, `%XX` a byte. A parameter given
/// twice is refused, as OAuth 2.0 requires.
fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, OauthError> {
    let mut form = HashMap::new();
    for pair in body.split(|b| *b == b'&').filter(|p| !p.is_empty()) {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &[][..]),
        };
        let decode = |text: &[u8]| -> Result<String, OauthError> {
            let spaced: Vec<u8> = text
                .iter()
                .map(|b| if *b == b'+' { b' ' } else { *b })
                .collect();
            percent_encoding::percent_decode(&spaced)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| {
                    OauthError::new(400, "invalid_request", "The request body is not UTF-8.")
                })
        };
        let name = decode(name)?;
        if form.insert(name.clone(), decode(value)?).is_some() {
            return Err(OauthError::new(
                400,
                "invalid_request",
                format!("Duplicate parameter: {name}"),
            ));
        }
    }
    Ok(form)
}

/// Why an access token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    Unknown,
    Expired,
}

/// The access tokens issued: each names its account and expires after the lifetime.
pub(crate) struct AccessTokens {
    lifetime: Duration,
    issued: Mutex<HashMap<String, (usize, Instant)>>,
}

impl AccessTokens {
    pub fn new(lifetime: Duration) -> AccessTokens {
        AccessTokens {
            lifetime,
            issued: Mutex::new(HashMap::new()),
        }
    }

    /// A new token for `account` and its `expires_in` in seconds.
    pub fn issue(&self, account: usize) -> (String, u64) {
        let token = format!(
            "ya29.emulator-{}",
            URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
        );
        let now = Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if issued.len() >= TOKENS_KEPT {
            issued.retain(|_, (_, expires)| *expires > now);
        }
        issued.insert(token.clone(), (account, now + self.lifetime));
        (token, self.lifetime.as_secs().max(1))
    }

    /// The account of the `Authorization` header's bearer token, if it is valid now.
    pub fn check(&self, authorization: &str) -> Result<usize, Refused> {
        let token = authorization
            .split_at_checked(7)
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer "))
            .map(|(_, token)| token.trim())
            .ok_or(Refused::Unknown)?;
        let issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        match issued.get(token) {
            None => Err(Refused::Unknown),
            Some((_, expires)) if Instant::now() >= *expires => Err(Refused::Expired),
            Some((account, _)) => Ok(*account),
        }
    }

    /// Forgets every token issued so far: they are refused as unknown from now on.
    pub fn revoke_all(&self) {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fcm::service_account::MadeAccount;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;
    use serde_json::{json, Value};

    const NOW: u64 = 1_700_000_000;
    const URI: &str = "https://127.0.0.1:1/token";

    struct Setup {
        made: MadeAccount,
        accounts: Vec<ServiceAccount>,
    }

    fn setup() -> Setup {
        let made = MadeAccount::generate("proj", URI).unwrap();
        let accounts = vec![
            MadeAccount::generate("other", URI).unwrap().account,
            ServiceAccount::from_json(&made.json).unwrap(),
        ];
        Setup { made, accounts }
    }

    /// Signs `claims` with the made account's key, as a client does.
    fn assertion(made: &MadeAccount, header: Value, claims: Value) -> String {
        let file: Value = serde_json::from_slice(&made.json).unwrap();
        let key =
            PKey::private_key_from_pem(file["private_key"].as_str().unwrap().as_bytes()).unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signer = Signer::new(MessageDigest::sha256(), &key).unwrap();
        let sig = signer.sign_oneshot_to_vec(input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn header(s: &Setup) -> Value {
        json!({"alg": "RS256", "typ": "JWT", "kid": s.made.account.private_key_id})
    }

    fn claims(s: &Setup) -> Value {
        json!({
            "iss": s.made.account.client_email,
            "scope": format!("openid {FIREBASE_MESSAGING_SCOPE}"),
            "aud": URI,
            "iat": NOW - 10,
            "exp": NOW - 10 + 3600,
        })
    }

    fn form(jwt: &str) -> Vec<u8> {
        format!("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={jwt}")
            .into_bytes()
    }

    fn refusal(s: &Setup, header: Value, claims: Value) -> (u16, String, String) {
        let jwt = assertion(&s.made, header, claims);
        let e = check_assertion(&s.accounts, &form(&jwt), NOW).unwrap_err();
        (e.status, e.error, e.description)
    }

    #[test]
    fn a_good_assertion_names_its_account() {
        let s = setup();
        let jwt = assertion(&s.made, header(&s), claims(&s));
        assert_eq!(check_assertion(&s.accounts, &form(&jwt), NOW), Ok(1));
        let mut no_kid = header(&s);
        no_kid.as_object_mut().unwrap().remove("kid");
        let jwt = assertion(&s.made, no_kid, claims(&s));
        assert_eq!(check_assertion(&s.accounts, &form(&jwt), NOW), Ok(1));
    }

    #[test]
    fn each_claim_is_checked() {
        let s = setup();
        let set = |key: &str, value: Value| {
            let mut c = claims(&s);
            c[key] = value;
            c
        };
        let grant = |d: &str| (400, "invalid_grant".to_owned(), d.to_owned());
        let mut wrong_kid = header(&s);
        wrong_kid["kid"] = json!("0123");
        assert_eq!(refusal(&s, wrong_kid, claims(&s)), grant(BAD_SIGNATURE));
        assert_eq!(
            refusal(
                &s,
                header(&s),
                set("aud", json!("https://oauth2.googleapis.com/token"))
            ),
            grant(&format!(
                "Invalid JWT: Failed audience check. The right audience is {URI}"
            ))
        );
        for (what, c) in [
            ("expired", set("exp", json!(NOW))),
            ("two hours", set("exp", json!(NOW - 10 + 7200))),
            ("exp before iat", set("exp", json!(NOW - 20))),
            ("future iat", {
                let mut c = set("iat", json!(NOW + 600));
                c["exp"] = json!(NOW + 1200);
                c
            }),
        ] {
            assert_eq!(refusal(&s, header(&s), c), grant(SHORT_LIVED), "{what}");
        }
        let mut unscoped = claims(&s);
        unscoped.as_object_mut().unwrap().remove("scope");
        assert_eq!(
            refusal(&s, header(&s), unscoped).2,
            "Empty or missing scope not allowed."
        );
        let other = set("scope", json!("https://www.googleapis.com/auth/datastore"));
        assert_eq!(
            refusal(&s, header(&s), other),
            (
                400,
                "invalid_scope".into(),
                "Invalid OAuth scope or ID token audience provided.".into()
            )
        );
        let stranger = set("iss", json!("someone@else.iam.gserviceaccount.com"));
        assert_eq!(refusal(&s, header(&s), stranger).0, 401);
        let hs = json!({"alg": "HS256", "kid": s.made.account.private_key_id});
        assert_eq!(refusal(&s, hs, claims(&s)).1, "invalid_grant");
    }

    #[test]
    fn another_key_or_a_changed_claim_breaks_the_signature() {
        let s = setup();
        // The other account's key, claiming to be the made account.
        let forger = MadeAccount::generate("proj", URI).unwrap();
        let jwt = assertion(&forger, header(&s), claims(&s));
        let e = check_assertion(&s.accounts, &form(&jwt), NOW).unwrap_err();
        assert_eq!(e.description, BAD_SIGNATURE);
        let good = assertion(&s.made, header(&s), claims(&s));
        let (head, rest) = good.split_once('.').unwrap();
        let sig = rest.split_once('.').unwrap().1;
        let mut c = claims(&s);
        c["exp"] = json!(NOW + 3000);
        let tampered = format!("{head}.{}.{sig}", URL_SAFE_NO_PAD.encode(c.to_string()));
        let e = check_assertion(&s.accounts, &form(&tampered), NOW).unwrap_err();
        assert_eq!(e.description, BAD_SIGNATURE);
    }

    #[test]
    fn malformed_requests() {
        let s = setup();
        let check = |body: &str| check_assertion(&s.accounts, body.as_bytes(), NOW).unwrap_err();
        assert_eq!(check("assertion=x").error, "invalid_request");
        assert_eq!(
            check("grant_type=client_credentials&assertion=x").error,
            "unsupported_grant_type"
        );
        let grant = "grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer";
        assert_eq!(
            check(grant).description,
            "Missing required parameter: assertion"
        );
        assert_eq!(
            check(&format!("{grant}&assertion=%FF")).error,
            "invalid_request"
        );
        for jwt in ["", "a.b", "a.b.c", "a.b.c.d", ".."] {
            let e = check(&format!("{grant}&assertion={jwt}"));
            assert_eq!(
                (e.status, e.error.as_str()),
                (400, "invalid_grant"),
                "{jwt:?}"
            );
        }
        assert_eq!(
            check(&format!("{grant}&{grant}&assertion=a")).description,
            "Duplicate parameter: grant_type"
        );
    }

    #[test]
    fn form_decoding() {
        let form = parse_form(b"a=x+y%2Bz&b=&c&d=%C3%A9").unwrap();
        assert_eq!(form["a"], "x y+z");
        assert_eq!((form["b"].as_str(), form["c"].as_str()), ("", ""));
        assert_eq!(form["d"], "é");
    }

    #[test]
    fn access_tokens_expire_and_can_be_revoked() {
        let tokens = AccessTokens::new(Duration::from_millis(50));
        let (token, expires_in) = tokens.issue(3);
        assert_eq!(expires_in, 1, "at least a second");
        assert!(token.starts_with("ya29."));
        assert_eq!(tokens.check(&format!("Bearer {token}")), Ok(3));
        assert_eq!(tokens.check(&format!("bearer {token}")), Ok(3));
        assert_eq!(
            tokens.check(&format!("Basic {token}")),
            Err(Refused::Unknown)
        );
        assert_eq!(tokens.check("Bearer ya29.other"), Err(Refused::Unknown));
        assert_eq!(tokens.check(""), Err(Refused::Unknown));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            tokens.check(&format!("Bearer {token}")),
            Err(Refused::Expired)
        );
        let (fresh, _) = tokens.issue(0);
        tokens.revoke_all();
        assert_eq!(
            tokens.check(&format!("Bearer {fresh}")),
            Err(Refused::Unknown)
        );
    }
}
