//! Minting the JWTs of a NATS operator-mode setup (operator, account, user) with the
//! `nkeys` crate, as `nsc` would: header `{"typ":"JWT","alg":"ed25519-nkey"}`, the
//! claims, and the issuer's Ed25519 signature over both, each base64url without padding.

use nkeys::KeyPair;
use serde_json::{Value, json};

/// Base64url without padding (RFC 4648 §5), as JWTs use.
fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}

/// A JWT for `subject` with the `nats` claims given, signed by `issuer`.
fn sign(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = b64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "jti": uuid::Uuid::now_v7().simple().to_string().to_uppercase(),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
    let sig = issuer.sign(body.as_bytes()).expect("an nkey signs");
    format!("{body}.{}", b64url(&sig))
}

/// An operator, its system account (JetStream needs one), one account with JetStream
/// and one user of it.
pub(crate) struct Decentralised {
    /// The system account's public key.
    system: String,
    /// The system account's JWT.
    system_jwt: String,
    /// The operator's self-signed JWT.
    pub(crate) operator_jwt: String,
    /// The account's public key.
    pub(crate) account: String,
    /// The account's JWT, signed by the operator.
    pub(crate) account_jwt: String,
    /// The user's JWT, signed by the account.
    pub(crate) user_jwt: String,
    /// The user's seed.
    pub(crate) user_seed: String,
}

impl Decentralised {
    pub(crate) fn new() -> Self {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let user = KeyPair::new_user();
        let system = KeyPair::new_account();
        let system_jwt = sign(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2, "limits": {"conn": -1}}),
        );
        let operator_jwt = sign(
            &operator,
            &operator.public_key(),
            "sfop",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = sign(
            &operator,
            &account.public_key(),
            "sfacc",
            json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "default_permissions": {"pub": {}, "sub": {}}
            }),
        );
        let user_jwt = sign(
            &account,
            &user.public_key(),
            "sfuser",
            json!({
                "type": "user", "version": 2,
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1
            }),
        );
        Self {
            system: system.public_key(),
            system_jwt,
            operator_jwt,
            account: account.public_key(),
            account_jwt,
            user_jwt,
            user_seed: user.seed().expect("a user seed"),
        }
    }

    /// The server configuration lines: operator mode with both accounts preloaded in a
    /// memory resolver. `operator_file` holds [`Self::operator_jwt`].
    pub(crate) fn server_conf(&self, operator_file: &str) -> String {
        format!(
            "operator: {operator_file:?}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{ {}: {:?}, {}: {:?} }}\n",
            self.system, self.system, self.system_jwt, self.account, self.account_jwt
        )
    }

    /// A `.creds` file's text, as `nsc` writes it.
    pub(crate) fn creds(&self) -> String {
        format!(
            "-----BEGIN NATS USER JWT-----\n{}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n",
            self.user_jwt, self.user_seed
        )
    }
}

#[test]
fn base64url_matches_rfc_4648_vectors() {
    for (raw, enc) in [
        ("", ""),
        ("f", "Zg"),
        ("fo", "Zm8"),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg"),
        ("fooba", "Zm9vYmE"),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(b64url(raw.as_bytes()), enc);
    }
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
}
