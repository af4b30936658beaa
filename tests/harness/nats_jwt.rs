//! NATS operator mode (decentralized JWT auth) without `nsc`: an operator,
//! a system account, an account with JetStream and its user, encoded as
//! nats-io/jwt v2 tokens, the nats-server config that trusts them, and
//! creds files.
//!
//! A v2 JWT is `b64url(header).b64url(claims).b64url(sig)`, where `sig`
//! is the issuer's ed25519 nkey signature over `header.claims` (the two
//! encoded parts and the dot). nats-server checks the signature, the
//! issuer chain (operator → account → user) and the nkey prefixes; it does
//! not recompute `jti`, so any unique string does.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};

/// Signs `nats` (the claim type's own fields) as a v2 JWT about `subject`,
/// issued by `issuer`.
pub fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let jti = format!(
        "WALNATS{}X{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        "jti": jti,
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
}

/// An account JWT; `jetstream` gives it unlimited JetStream.
pub fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1,
        "imports": -1, "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        limits["mem_storage"] = json!(-1);
        limits["disk_storage"] = json!(-1);
        limits["streams"] = json!(-1);
        limits["consumer"] = json!(-1);
    }
    encode(
        operator,
        &account.public_key(),
        name,
        json!({"limits": limits, "type": "account", "version": 2}),
    )
}

/// A user JWT issued by `account`, allowed everything the account allows.
pub fn user_jwt(account: &KeyPair, user: &KeyPair, name: &str) -> String {
    encode(
        account,
        &user.public_key(),
        name,
        json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    )
}

/// A `.creds` file as `nsc generate creds` writes it.
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// One operator with a system account and an application account `APP`
/// (JetStream enabled), as a nats-server trusts them.
pub struct Operator {
    pub operator: KeyPair,
    pub system: KeyPair,
    pub app: KeyPair,
    operator_jwt: String,
    system_jwt: String,
    app_jwt: String,
}

impl Operator {
    pub fn new() -> Operator {
        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let app = KeyPair::new_account();
        let operator_jwt = encode(
            &operator,
            &operator.public_key(),
            "WALNATS_TEST",
            json!({"system_account": system.public_key(), "type": "operator", "version": 2}),
        );
        let system_jwt = account_jwt(&operator, &system, "SYS", false);
        let app_jwt = account_jwt(&operator, &app, "APP", true);
        Operator {
            operator,
            system,
            app,
            operator_jwt,
            system_jwt,
            app_jwt,
        }
    }

    /// The nats-server config text: trust this operator, resolve its two
    /// accounts from memory.
    pub fn server_config(&self) -> String {
        format!(
            "operator: \"{}\"\nsystem_account: \"{}\"\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.operator_jwt,
            self.system.public_key(),
            self.system.public_key(),
            self.system_jwt,
            self.app.public_key(),
            self.app_jwt
        )
    }

    /// A new user of `APP`: (creds file text, the user's seed).
    pub fn app_user(&self, name: &str) -> (String, String) {
        let user = KeyPair::new_user();
        let seed = user.seed().unwrap();
        (creds(&user_jwt(&self.app, &user, name), &seed), seed)
    }
}
