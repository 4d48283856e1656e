//! The service-account key Google issues (the JSON file from the Firebase console or
//! `gcloud iam service-accounts keys create`): who the daemon is to Google, and the RSA
//! key it signs its token requests with.

use std::path::Path;

use openssl::pkey::{PKey, Private};
use serde::Deserialize;

/// A service account, loaded and checked.
#[derive(Clone)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    /// The key's id, sent as the assertion's `kid`.
    pub private_key_id: String,
    pub private_key: PKey<Private>,
    /// Where access tokens are asked for: `https://oauth2.googleapis.com/token`, or an
    /// emulator's.
    pub token_uri: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("private_key_id", &self.private_key_id)
            .field("private_key", &"<hidden>")
            .field("token_uri", &self.token_uri)
            .finish()
    }
}

/// The file as Google writes it; other fields (`client_id`, `auth_uri`, ...) are ignored.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<String>,
    client_email: Option<String>,
    token_uri: Option<String>,
}

impl ServiceAccount {
    /// Reads and checks `path`; the error names the file and what is wrong with it,
    /// never the key itself.
    pub fn load(path: &Path) -> Result<ServiceAccount, String> {
        let text = std::fs::read(path).map_err(|e| {
            format!(
                "{}: cannot read the service-account file: {e}",
                path.display()
            )
        })?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a service-account key file's contents.
    pub fn parse(text: &[u8]) -> Result<ServiceAccount, String> {
        let file: KeyFile = serde_json::from_slice(text).map_err(|e| {
            format!("not a service-account key file (JSON as Google issues it): {e}")
        })?;
        match file.kind.as_deref() {
            Some("service_account") => {}
            Some(other) => {
                return Err(format!(
                    "\"type\" is {other:?}, not \"service_account\": use a service account's key \
                     (Firebase console > Project settings > Service accounts > Generate new private key)"
                ))
            }
            None => return Err("no \"type\": not a service-account key file".to_owned()),
        }
        let field = |name: &str, value: Option<String>| {
            value
                .filter(|v| !v.trim().is_empty())
                .ok_or_else(|| format!("no \"{name}\" in the service-account key file"))
        };
        let project_id = field("project_id", file.project_id)?;
        let client_email = field("client_email", file.client_email)?;
        let private_key_id = field("private_key_id", file.private_key_id)?;
        let pem = field("private_key", file.private_key)?;
        let token_uri = field("token_uri", file.token_uri)?;
        if !token_uri.starts_with("https://") {
            return Err(format!(
                "\"token_uri\" {token_uri:?} is not an https:// URL"
            ));
        }
        let private_key = PKey::private_key_from_pem(pem.as_bytes()).map_err(|_| {
            "\"private_key\" is not a PEM private key (PKCS#8, as Google issues it)".to_owned()
        })?;
        if private_key.rsa().is_err() {
            return Err("\"private_key\" is not an RSA key: Google signs with RS256".to_owned());
        }
        Ok(ServiceAccount {
            project_id,
            client_email,
            private_key_id,
            private_key,
            token_uri,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use openssl::rsa::Rsa;

    /// A service-account key file as Google writes one, with a fresh 2048-bit key.
    pub fn key_file(project: &str, token_uri: &str) -> (String, PKey<Private>) {
        let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
        let pem = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let json = serde_json::json!({
            "type": "service_account",
            "project_id": project,
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": pem,
            "client_email": format!("pgpushd@{project}.iam.gserviceaccount.com"),
            "client_id": "100000000000000000000",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "universe_domain": "googleapis.com"
        });
        (json.to_string(), key)
    }

    #[test]
    fn a_key_file_as_google_issues_it_loads() {
        let (json, key) = key_file("demo-project", "https://oauth2.googleapis.com/token");
        let sa = ServiceAccount::parse(json.as_bytes()).unwrap();
        assert_eq!(sa.project_id, "demo-project");
        assert_eq!(
            sa.client_email,
            "pgpushd@demo-project.iam.gserviceaccount.com"
        );
        assert_eq!(sa.token_uri, "https://oauth2.googleapis.com/token");
        assert!(sa.private_key.public_eq(&key));
        assert!(!format!("{sa:?}").contains("BEGIN"), "{sa:?}");
    }

    #[test]
    fn bad_key_files_say_what_is_wrong() {
        let (good, _) = key_file("p", "https://oauth2.googleapis.com/token");
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
            f(&mut v);
            ServiceAccount::parse(v.to_string().as_bytes()).unwrap_err()
        };
        let ec = String::from_utf8(
            PKey::from_ec_key(
                openssl::ec::EcKey::generate(
                    &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
                        .unwrap(),
                )
                .unwrap(),
            )
            .unwrap()
            .private_key_to_pem_pkcs8()
            .unwrap(),
        )
        .unwrap();
        for (error, expected) in [
            (
                ServiceAccount::parse(b"not json").unwrap_err(),
                "not a service-account key file",
            ),
            (
                edit(&|v| v["type"] = "authorized_user".into()),
                "not \"service_account\"",
            ),
            (
                edit(&|v| {
                    v.as_object_mut().unwrap().remove("client_email");
                }),
                "no \"client_email\"",
            ),
            (edit(&|v| v["project_id"] = "".into()), "no \"project_id\""),
            (
                edit(&|v| v["token_uri"] = "http://evil/token".into()),
                "not an https:// URL",
            ),
            (
                edit(&|v| v["private_key"] = "-----BEGIN PRIVATE KEY-----\nxx\n".into()),
                "not a PEM private key",
            ),
            (
                edit(&|v| v["private_key"] = ec.clone().into()),
                "not an RSA key",
            ),
        ] {
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
            assert!(!error.contains("BEGIN"), "{error}");
        }
        let missing = ServiceAccount::load(Path::new("/nonexistent/sa.json")).unwrap_err();
        assert!(
            missing.contains("/nonexistent/sa.json: cannot read the service-account file"),
            "{missing}"
        );
    }
}
