//! Service accounts, in Google's JSON key format (what the Firebase console's "Generate
//! new private key" downloads):
//!
//! ```json
//! {"type": "service_account", "project_id": "...", "private_key_id": "...",
//!  "private_key": "-----BEGIN PRIVATE KEY-----\n...", "client_email": "...",
//!  "client_id": "...", "token_uri": "https://oauth2.googleapis.com/token", ...}
//! ```
//!
//! The emulator knows an account by the public half of its RSA key: it verifies the
//! assertions signed with it. It can also make one ([`MadeAccount`]) whose `token_uri` is
//! the emulator itself, so a client given that file and the emulator's CA just works.

use std::path::Path;

use anyhow::{bail, ensure, Context};
use openssl::pkey::{PKey, Public};
use openssl::rsa::Rsa;
use serde::Deserialize;
use serde_json::{json, Value};

/// The name the emulator gives the file of the account it makes.
pub const MADE_FILE_NAME: &str = "service-account.json";

/// An account the emulator accepts assertions from.
pub struct ServiceAccount {
    pub project_id: String,
    /// The `kid` its assertions carry.
    pub private_key_id: String,
    /// The `iss` its assertions carry.
    pub client_email: String,
    /// The `aud` its assertions must carry: the token endpoint its clients post to.
    pub token_uri: String,
    pub(crate) key: PKey<Public>,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    project_id: String,
    private_key_id: String,
    private_key: String,
    client_email: String,
    token_uri: String,
}

impl ServiceAccount {
    /// From a JSON key file's contents; refuses one that is not a service account's key
    /// or whose private key is not RSA (Google's are RSA 2048, signed RS256).
    pub fn from_json(json: &[u8]) -> anyhow::Result<ServiceAccount> {
        let file: KeyFile = serde_json::from_slice(json).context(
            "not a service account key file (JSON with type, project_id, private_key_id, \
             private_key, client_email and token_uri)",
        )?;
        ensure!(
            file.kind == "service_account",
            "the key file's type is {:?}, not \"service_account\"",
            file.kind
        );
        for (name, value) in [
            ("project_id", &file.project_id),
            ("private_key_id", &file.private_key_id),
            ("client_email", &file.client_email),
            ("token_uri", &file.token_uri),
        ] {
            ensure!(!value.is_empty(), "the key file's {name} is empty");
        }
        let private = PKey::private_key_from_pem(file.private_key.as_bytes())
            .context("the key file's private_key is not a PEM private key")?;
        let Ok(rsa) = private.rsa() else {
            bail!("the key file's private_key is not an RSA key (RS256 needs one)");
        };
        let public = Rsa::from_public_components(rsa.n().to_owned()?, rsa.e().to_owned()?)?;
        Ok(ServiceAccount {
            project_id: file.project_id,
            private_key_id: file.private_key_id,
            client_email: file.client_email,
            token_uri: file.token_uri,
            key: PKey::from_rsa(public)?,
        })
    }

    pub fn from_file(path: &Path) -> anyhow::Result<ServiceAccount> {
        let json = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        ServiceAccount::from_json(&json).with_context(|| format!("in {}", path.display()))
    }
}

/// A service account the emulator made: its key file (private key included) and what the
/// emulator knows of it.
pub struct MadeAccount {
    /// The key file's contents, to hand to a client.
    pub json: Vec<u8>,
    pub account: ServiceAccount,
}

impl MadeAccount {
    /// A new account of `project_id` (a fresh RSA 2048 key) whose `token_uri` is
    /// `token_uri`.
    pub fn generate(project_id: &str, token_uri: &str) -> anyhow::Result<MadeAccount> {
        ensure!(!project_id.is_empty(), "the project id is empty");
        let key = PKey::from_rsa(Rsa::generate(2048)?)?;
        let pem = String::from_utf8(key.private_key_to_pem_pkcs8()?)?;
        let email = format!("pgpushd-emulator@{project_id}.iam.gserviceaccount.com");
        let file = json!({
            "type": "service_account",
            "project_id": project_id,
            "private_key_id": hex::encode(rand::random::<[u8; 20]>()),
            "private_key": pem,
            "client_email": email,
            "client_id": format!("1{:020}", rand::random::<u64>()),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": format!(
                "https://www.googleapis.com/robot/v1/metadata/x509/{}",
                email.replace('@', "%40")
            ),
            "universe_domain": "googleapis.com",
        });
        MadeAccount::from_value(file)
    }

    /// The account in `json` (a key file the emulator made earlier) with its `token_uri`
    /// set to `token_uri`, if it is of `project_id`; `None` if it is another project's.
    pub fn reuse(
        json: &[u8],
        project_id: &str,
        token_uri: &str,
    ) -> anyhow::Result<Option<MadeAccount>> {
        let mut file: Value = serde_json::from_slice(json).context("not JSON")?;
        if file.get("project_id").and_then(Value::as_str) != Some(project_id) {
            return Ok(None);
        }
        let Some(object) = file.as_object_mut() else {
            bail!("not a JSON object");
        };
        object.insert("token_uri".into(), Value::from(token_uri));
        MadeAccount::from_value(file).map(Some)
    }

    fn from_value(file: Value) -> anyhow::Result<MadeAccount> {
        let mut json = serde_json::to_vec_pretty(&file)?;
        json.push(b'\n');
        let account = ServiceAccount::from_json(&json)?;
        Ok(MadeAccount { json, account })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_account_reads_back_as_google_writes_them() {
        let made = MadeAccount::generate("demo-project", "https://127.0.0.1:1/token").unwrap();
        let file: Value = serde_json::from_slice(&made.json).unwrap();
        for key in [
            "type",
            "project_id",
            "private_key_id",
            "private_key",
            "client_email",
            "client_id",
            "auth_uri",
            "token_uri",
        ] {
            assert!(file[key].is_string(), "{key}");
        }
        assert!(file["private_key"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let account = &made.account;
        assert_eq!(account.project_id, "demo-project");
        assert_eq!(account.token_uri, "https://127.0.0.1:1/token");
        assert_eq!(account.private_key_id.len(), 40);
        assert!(account
            .client_email
            .ends_with("@demo-project.iam.gserviceaccount.com"));

        let again = MadeAccount::reuse(&made.json, "demo-project", "https://127.0.0.1:2/token")
            .unwrap()
            .unwrap();
        assert_eq!(again.account.token_uri, "https://127.0.0.1:2/token");
        assert_eq!(again.account.private_key_id, account.private_key_id);
        assert!(again.account.key.public_eq(&account.key));
        assert!(MadeAccount::reuse(&made.json, "other", "x")
            .unwrap()
            .is_none());
    }

    #[test]
    fn key_files_that_are_not_service_accounts_are_refused() {
        let made = MadeAccount::generate("p", "https://x/token").unwrap();
        let mut file: Value = serde_json::from_slice(&made.json).unwrap();
        let refused = |file: &Value| {
            ServiceAccount::from_json(&serde_json::to_vec(file).unwrap())
                .err()
                .map(|e| format!("{e:#}"))
        };
        file["type"] = Value::from("authorized_user");
        assert!(refused(&file).unwrap().contains("not \"service_account\""));
        file["type"] = Value::from("service_account");
        file["client_email"] = Value::from("");
        assert!(refused(&file).unwrap().contains("client_email is empty"));
        file["client_email"] = Value::from("a@b");
        let ec = openssl::ec::EcKey::generate(
            &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        let ec = PKey::from_ec_key(ec)
            .unwrap()
            .private_key_to_pem_pkcs8()
            .unwrap();
        file["private_key"] = Value::from(String::from_utf8(ec).unwrap());
        assert!(refused(&file).unwrap().contains("not an RSA key"));
        file.as_object_mut().unwrap().remove("token_uri");
        assert!(refused(&file)
            .unwrap()
            .contains("not a service account key file"));
        assert!(ServiceAccount::from_json(b"[]").is_err());
    }
}
