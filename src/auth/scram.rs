//! SCRAM-SHA-256 authentication, server side.
//!
//! Implements the server role of SCRAM (RFC 5802) with SHA-256 (RFC 7677) as
//! PostgreSQL uses it: see the "SASL Authentication" section of the
//! PostgreSQL frontend/backend protocol documentation and the backend
//! implementation in `src/backend/libpq/auth-scram.c`. The exchange is
//!
//! ```text
//! S: AuthenticationSASL         "SCRAM-SHA-256"
//! C: SASLInitialResponse        client-first-message  "n,,n=,r=<client nonce>"
//! S: AuthenticationSASLContinue server-first-message  "r=<client nonce><server nonce>,s=<salt>,i=<iterations>"
//! C: SASLResponse               client-final-message  "c=biws,r=<nonce>,p=<ClientProof>"
//! S: AuthenticationSASLFinal    server-final-message  "v=<ServerSignature>"
//! ```
//!
//! with (RFC 5802 §3)
//!
//! ```text
//! SaltedPassword  = Hi(Normalize(password), salt, i)   -- PBKDF2-HMAC-SHA-256
//! ClientKey       = HMAC(SaltedPassword, "Client Key")
//! StoredKey       = H(ClientKey)
//! ServerKey       = HMAC(SaltedPassword, "Server Key")
//! AuthMessage     = client-first-message-bare + "," + server-first-message + "," +
//!                   client-final-message-without-proof
//! ClientSignature = HMAC(StoredKey, AuthMessage)
//! ClientProof     = ClientKey XOR ClientSignature
//! ServerSignature = HMAC(ServerKey, AuthMessage)
//! ```
//!
//! The server verifies a proof by recovering `ClientKey = ClientProof XOR
//! ClientSignature` and checking `H(ClientKey) == StoredKey`.
//!
//! Deliberate PostgreSQL behaviour followed here:
//!
//! * only `SCRAM-SHA-256` is offered, never `SCRAM-SHA-256-PLUS`, so channel
//!   binding is not supported: the gs2 flags `n` and `y` are accepted, `p=`
//!   is rejected (RFC 5802 §6: `y` means "client supports channel binding
//!   but thinks the server does not", which is true here);
//! * the user name in `n=` is ignored (libpq sends it empty; the user comes
//!   from the startup packet), authorization identities (`a=`) are refused;
//! * mandatory extensions (`m=`) are refused, optional extensions after the
//!   nonce are ignored;
//! * for an unknown user a "mock" exchange runs with a salt derived from a
//!   secret and the user name (auth-scram.c `scram_mock_salt()`), so a
//!   client cannot probe which users exist; it always fails at the end.

use std::fmt;
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::{constant_time_eq, AuthError, ScramKeys, Secret};

/// SASL mechanism name to advertise in `AuthenticationSASL`.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Iteration count used for verifiers derived here; PostgreSQL's default
/// (`scram_iterations`, `SCRAM_SHA_256_DEFAULT_ITERATIONS`).
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Largest iteration count accepted in a verifier.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Prefix of PostgreSQL's stored SCRAM-SHA-256 verifier format.
pub(super) const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

/// Salt length for derived verifiers (`SCRAM_DEFAULT_SALT_LEN` in PostgreSQL).
const DEFAULT_SALT_LEN: usize = 16;
/// Raw length of the server nonce (`SCRAM_RAW_NONCE_LEN` in PostgreSQL);
/// 18 bytes encode to 24 base64 characters without padding.
const SERVER_NONCE_LEN: usize = 18;
/// SHA-256 output length, the size of every SCRAM key, proof and signature.
pub(super) const KEY_LEN: usize = 32;
/// Base64 length of a [`KEY_LEN`]-byte value.
const KEY_B64_LEN: usize = 44;
/// Upper bound on a client SCRAM message. Real ones are ~100 bytes
/// (a user name of at most 63 bytes, escaped, plus nonces and the proof).
const MAX_MESSAGE_LEN: usize = 4096;
/// Upper bound on a verifier's decoded salt.
pub(super) const MAX_SALT_LEN: usize = 1024;
/// Upper bound on the length of a verifier string.
const MAX_VERIFIER_LEN: usize = 4096;

type HmacSha256 = Hmac<Sha256>;
pub(super) type Key = [u8; KEY_LEN];

/// A SCRAM-SHA-256 verifier: what the server stores instead of the password.
///
/// Textual form (PostgreSQL's `pg_authid.rolpassword`):
/// `SCRAM-SHA-256$<iterations>:<salt base64>$<StoredKey base64>:<ServerKey base64>`.
///
/// Both keys are sensitive (together with an observed exchange they allow
/// impersonating the server, and StoredKey lets one brute-force the password
/// offline), so `Debug` redacts them; use [`ScramVerifier::to_pg_string`]
/// deliberately when the textual form is needed.
#[derive(Clone)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Key,
    server_key: Key,
}

impl ScramVerifier {
    /// Derives a verifier from a password with the given salt and iteration
    /// count (clamped to `1..=MAX_ITERATIONS`).
    ///
    /// The password's UTF-8 bytes are used as they are. PostgreSQL first
    /// applies SASLprep (RFC 4013), which leaves every ASCII password (and any
    /// already-normalised one) unchanged; for arbitrary non-ASCII passwords
    /// use [`ScramVerifier::generate`], which normalises exactly like libpq.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.clamp(1, MAX_ITERATIONS);
        let salted_password = hi(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted_password, &[b"Client Key"]);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted_password, &[b"Server Key"]),
        }
    }

    /// Derives a verifier from a password with a fresh random 16-byte salt and
    /// [`DEFAULT_ITERATIONS`], exactly as PostgreSQL does for
    /// `password_encryption = scram-sha-256` (including SASLprep of the
    /// password, done by `postgres_protocol`, which mirrors libpq's
    /// `PQencryptPasswordConn()`).
    pub fn generate(password: &str) -> Self {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        match Self::parse(&text) {
            Ok(verifier) => verifier,
            // Not expected; fall back to our own derivation rather than fail.
            Err(_) => {
                let mut salt = [0u8; DEFAULT_SALT_LEN];
                rand::fill(&mut salt[..]);
                Self::from_password(password, &salt, DEFAULT_ITERATIONS)
            }
        }
    }

    /// Parses PostgreSQL's verifier format (see the type documentation), as
    /// `parse_scram_secret()` in auth-scram.c does, but strictly: the
    /// iteration count must be plain decimal in `1..=MAX_ITERATIONS`, the salt
    /// non-empty, both keys exactly 32 bytes of canonical base64.
    pub fn parse(s: &str) -> Result<Self, AuthError> {
        if s.len() > MAX_VERIFIER_LEN {
            return Err(AuthError::Malformed("SCRAM verifier too long"));
        }
        let rest = s
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(AuthError::Malformed("not a SCRAM-SHA-256 verifier"))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or(AuthError::Malformed("SCRAM verifier lacks keys"))?;
        let (iterations, salt) = iter_salt
            .split_once(':')
            .ok_or(AuthError::Malformed("SCRAM verifier lacks salt"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(AuthError::Malformed("SCRAM verifier lacks server key"))?;

        let iterations = parse_iterations(iterations)?;
        let salt = decode_base64(salt, MAX_SALT_LEN, "invalid salt in SCRAM verifier")?;
        if salt.is_empty() {
            return Err(AuthError::Malformed("empty salt in SCRAM verifier"));
        }
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key, "invalid StoredKey in SCRAM verifier")?,
            server_key: decode_key(server_key, "invalid ServerKey in SCRAM verifier")?,
        })
    }

    /// The verifier in PostgreSQL's textual format. Sensitive: do not log.
    pub fn to_pg_string(&self) -> String {
        format!(
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key),
        )
    }

    /// The PBKDF2 iteration count.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// The salt (sent to every client that asks, so not secret).
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt", &format_args!("<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The server side of one SCRAM-SHA-256 exchange.
///
/// Use one instance per authentication attempt: call
/// [`client_first`](Self::client_first) with the `SASLInitialResponse` data,
/// send the result in `AuthenticationSASLContinue`, call
/// [`client_final`](Self::client_final) with the `SASLResponse` data and send
/// the result in `AuthenticationSASLFinal` (followed by
/// `AuthenticationOk`). Any error ends the exchange; further calls fail.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// Set for mock exchanges: the proof is checked as usual (so the work,
    /// and hence the timing, is the same) but the outcome is always failure,
    /// like `state->doomed` in auth-scram.c.
    doomed: bool,
    state: State,
    /// The ClientKey recovered from a proof that verified: what pass-through answers the
    /// server's SCRAM exchange with (see [`ScramServer::pass_through_keys`]).
    client_key: Option<Key>,
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal(Box<Exchange>),
    Finished,
}

/// What the server must remember between the two client messages.
struct Exchange {
    /// `"n,,"` or `"y,,"`: the client's gs2 header, whose base64 encoding must
    /// come back in the `c=` attribute.
    gs2_header: &'static str,
    client_first_bare: String,
    server_first: String,
    /// Client nonce followed by server nonce.
    nonce: String,
}

impl ScramServer {
    /// Prepares an exchange for a user with this secret.
    ///
    /// For a plaintext secret a verifier is derived with a fresh random salt
    /// and [`DEFAULT_ITERATIONS`] (as auth-scram.c does for a plaintext
    /// `rolpassword`), which costs one PBKDF2 run per call; configuring
    /// verifiers instead avoids that cost and makes the salt stable. Returns
    /// `None` for an MD5 secret: SCRAM cannot be done with an MD5 hash (the
    /// caller should then use MD5 authentication, as PostgreSQL does).
    pub fn new(secret: &Secret) -> Option<ScramServer> {
        let verifier = match secret {
            Secret::Plain(password) => ScramVerifier::generate(password),
            Secret::Md5(_) => return None,
            Secret::Scram(verifier) => verifier.clone(),
        };
        Some(Self::with_verifier(verifier, false))
    }

    /// A mock exchange for a user that does not exist (or cannot use SCRAM),
    /// indistinguishable on the wire from a real one until it fails with
    /// [`AuthError::WrongPassword`] at the final step.
    ///
    /// The salt is derived from the user name and a random secret drawn once
    /// per process, so it is stable for a user while the process runs and
    /// looks random (auth-scram.c `scram_mock_salt()` uses a per-cluster
    /// nonce instead; use [`ScramServer::mock_with_secret`] with a persistent
    /// secret to get salts that survive restarts as well).
    pub fn mock(user: &str) -> ScramServer {
        Self::mock_with_secret(user, process_mock_secret())
    }

    /// Like [`ScramServer::mock`], with the caller's secret for deriving the
    /// salt.
    pub fn mock_with_secret(user: &str, secret: &[u8]) -> ScramServer {
        let digest = hmac(secret, &[b"tidepool SCRAM mock salt\0", user.as_bytes()]);
        let verifier = ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: digest[..DEFAULT_SALT_LEN].to_vec(),
            // Never matched: the exchange is doomed regardless.
            stored_key: [0; KEY_LEN],
            server_key: [0; KEY_LEN],
        };
        Self::with_verifier(verifier, true)
    }

    fn with_verifier(verifier: ScramVerifier, doomed: bool) -> ScramServer {
        ScramServer {
            verifier,
            doomed,
            state: State::AwaitingClientFirst,
            client_key: None,
        }
    }

    /// Handles the client-first-message (the `SASLInitialResponse` data) and
    /// returns the server-first-message `r=<nonce>,s=<salt>,i=<iterations>`.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(
            std::mem::replace(&mut self.state, State::Finished),
            State::AwaitingClientFirst
        ) {
            return Err(AuthError::Malformed(
                "unexpected SCRAM client-first-message",
            ));
        }
        let first = parse_client_first(msg)?;

        let mut raw_nonce = [0u8; SERVER_NONCE_LEN];
        rand::fill(&mut raw_nonce[..]);
        let nonce = format!("{}{}", first.client_nonce, BASE64.encode(raw_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        let reply = server_first.clone().into_bytes();
        self.state = State::AwaitingClientFinal(Box::new(Exchange {
            gs2_header: first.gs2_header,
            client_first_bare: first.bare.to_owned(),
            server_first,
            nonce,
        }));
        Ok(reply)
    }

    /// Handles the client-final-message (the `SASLResponse` data). Returns the
    /// server-final-message `v=<ServerSignature>` if the client proved
    /// knowledge of the password, [`AuthError::WrongPassword`] if not.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let exchange = match std::mem::replace(&mut self.state, State::Finished) {
            State::AwaitingClientFinal(exchange) => exchange,
            _ => {
                return Err(AuthError::Malformed(
                    "unexpected SCRAM client-final-message",
                ))
            }
        };
        let fin = parse_client_final(msg)?;

        // RFC 5802 §7 / auth-scram.c read_client_final_message(): without
        // channel binding, c= carries the base64 of the gs2 header the client
        // sent first ("biws" for "n,,", "eSws" for "y,,").
        if !constant_time_eq(
            fin.channel_binding.as_bytes(),
            BASE64.encode(exchange.gs2_header).as_bytes(),
        ) {
            return Err(AuthError::Malformed("SCRAM channel-binding data mismatch"));
        }
        if !constant_time_eq(fin.nonce.as_bytes(), exchange.nonce.as_bytes()) {
            return Err(AuthError::Malformed("SCRAM nonce mismatch"));
        }

        let auth_message = [
            exchange.client_first_bare.as_bytes(),
            b",",
            exchange.server_first.as_bytes(),
            b",",
            fin.without_proof.as_bytes(),
        ];
        let client_signature = hmac(&self.verifier.stored_key, &auth_message);
        let mut client_key = fin.proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let matches = constant_time_eq(&sha256(&client_key), &self.verifier.stored_key);
        if !matches || self.doomed {
            return Err(AuthError::WrongPassword);
        }

        self.client_key = Some(client_key);
        let server_signature = hmac(&self.verifier.server_key, &auth_message);
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }

    /// After a successful exchange: the keys that let tidepool log in to a server that
    /// stores the same verifier, without the password (the ClientKey recovered from the
    /// client's proof, and the verifier's ServerKey to check the server's signature). Only
    /// meaningful when the verifier is the server's own (configured or looked up), not one
    /// derived here from a plaintext password with a salt of our own.
    pub fn pass_through_keys(&self) -> Option<ScramKeys> {
        let client_key = self.client_key?;
        Some(ScramKeys::new(
            client_key,
            self.verifier.server_key,
            &self.verifier.salt,
            self.verifier.iterations,
        ))
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitingClientFirst => "awaiting client-first-message",
            State::AwaitingClientFinal(_) => "awaiting client-final-message",
            State::Finished => "finished",
        };
        f.debug_struct("ScramServer")
            .field("iterations", &self.verifier.iterations)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

/// The parts of a client-first-message the server needs.
struct ClientFirst<'a> {
    gs2_header: &'static str,
    bare: &'a str,
    client_nonce: &'a str,
}

/// Parses `gs2-header client-first-message-bare` (RFC 5802 §7):
///
/// ```text
/// gs2-header = gs2-cbind-flag "," [ authzid ] ","
/// gs2-cbind-flag = ("p=" cb-name) / "n" / "y"
/// client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
/// ```
fn parse_client_first(msg: &[u8]) -> Result<ClientFirst<'_>, AuthError> {
    let s = message_str(msg)?;
    let mut gs2 = s.splitn(3, ',');
    let cbind_flag = gs2.next().unwrap_or_default();
    let gs2_header = match cbind_flag {
        "n" => "n,,",
        "y" => "y,,",
        flag if flag.starts_with("p=") => {
            return Err(AuthError::Unsupported(
                "SCRAM channel binding (SCRAM-SHA-256-PLUS) was not offered",
            ))
        }
        _ => return Err(AuthError::Malformed("invalid SCRAM channel-binding flag")),
    };
    let authzid = gs2
        .next()
        .ok_or(AuthError::Malformed("truncated SCRAM gs2 header"))?;
    if authzid.starts_with("a=") {
        return Err(AuthError::Unsupported("SCRAM authorization identity"));
    }
    if !authzid.is_empty() {
        return Err(AuthError::Malformed("invalid SCRAM gs2 header"));
    }
    let bare = gs2
        .next()
        .ok_or(AuthError::Malformed("truncated SCRAM gs2 header"))?;

    let mut attrs = bare.split(',');
    let user_attr = attrs.next().unwrap_or_default();
    if user_attr.starts_with("m=") {
        return Err(AuthError::Malformed(
            "mandatory SCRAM extensions are not supported",
        ));
    }
    // The user name itself is ignored, as in PostgreSQL: the role comes from
    // the startup packet.
    if !user_attr.starts_with("n=") {
        return Err(AuthError::Malformed("expected SCRAM username attribute"));
    }
    let client_nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(AuthError::Malformed("expected SCRAM nonce attribute"))?;
    if client_nonce.is_empty() || !client_nonce.bytes().all(is_printable) {
        return Err(AuthError::Malformed("invalid SCRAM client nonce"));
    }
    for ext in attrs {
        check_extension(ext)?;
    }
    Ok(ClientFirst {
        gs2_header,
        bare,
        client_nonce,
    })
}

/// The parts of a client-final-message the server needs.
struct ClientFinal<'a> {
    channel_binding: &'a str,
    nonce: &'a str,
    without_proof: &'a str,
    proof: Key,
}

/// Parses (RFC 5802 §7)
///
/// ```text
/// client-final-message-without-proof = channel-binding "," nonce ["," extensions]
/// client-final-message = client-final-message-without-proof "," proof
/// ```
fn parse_client_final(msg: &[u8]) -> Result<ClientFinal<'_>, AuthError> {
    let s = message_str(msg)?;
    let (without_proof, proof_attr) = s
        .rsplit_once(',')
        .ok_or(AuthError::Malformed("truncated SCRAM client-final-message"))?;
    let proof = proof_attr.strip_prefix("p=").ok_or(AuthError::Malformed(
        "SCRAM proof must be the last attribute",
    ))?;
    let proof = decode_key(proof, "invalid SCRAM client proof")?;

    let mut attrs = without_proof.split(',');
    let channel_binding =
        attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(AuthError::Malformed(
                "expected SCRAM channel-binding attribute",
            ))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(AuthError::Malformed("expected SCRAM nonce attribute"))?;
    for ext in attrs {
        if ext.starts_with("p=") {
            return Err(AuthError::Malformed(
                "SCRAM proof must be the last attribute",
            ));
        }
        check_extension(ext)?;
    }
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// Common checks on a client message: bounded size, no NUL, valid UTF-8.
pub(super) fn message_str(msg: &[u8]) -> Result<&str, AuthError> {
    if msg.len() > MAX_MESSAGE_LEN {
        return Err(AuthError::Malformed("SCRAM message too long"));
    }
    if msg.contains(&0) {
        return Err(AuthError::Malformed("NUL byte in SCRAM message"));
    }
    std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("SCRAM message is not UTF-8"))
}

/// An optional extension `attr-val = ALPHA "=" value` (ignored, as in
/// auth-scram.c, but it must at least be shaped like an attribute).
pub(super) fn check_extension(attr: &str) -> Result<(), AuthError> {
    match attr.as_bytes() {
        [name, b'=', ..] if name.is_ascii_alphabetic() => Ok(()),
        _ => Err(AuthError::Malformed("invalid SCRAM attribute")),
    }
}

/// RFC 5802 `printable = %x21-2B / %x2D-7E` (printable ASCII except ',').
pub(super) fn is_printable(c: u8) -> bool {
    matches!(c, 0x21..=0x2b | 0x2d..=0x7e)
}

pub(super) fn parse_iterations(s: &str) -> Result<u32, AuthError> {
    const ERR: AuthError = AuthError::Malformed("invalid iteration count in SCRAM verifier");
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(ERR);
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=MAX_ITERATIONS).contains(&n) => Ok(n),
        _ => Err(ERR),
    }
}

/// Decodes canonical, padded base64 of at most `max_len` decoded bytes.
pub(super) fn decode_base64(
    s: &str,
    max_len: usize,
    what: &'static str,
) -> Result<Vec<u8>, AuthError> {
    if s.len() > max_len.div_ceil(3) * 4 {
        return Err(AuthError::Malformed(what));
    }
    BASE64.decode(s).map_err(|_| AuthError::Malformed(what))
}

/// Decodes the base64 of a 32-byte key, proof or signature.
pub(super) fn decode_key(s: &str, what: &'static str) -> Result<Key, AuthError> {
    if s.len() != KEY_B64_LEN {
        return Err(AuthError::Malformed(what));
    }
    decode_base64(s, KEY_LEN, what)?
        .try_into()
        .map_err(|_| AuthError::Malformed(what))
}

fn process_mock_secret() -> &'static [u8] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret[..]);
        secret
    })
}

fn keyed_hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (RFC 2104 hashes long ones), so this
    // cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac = keyed_hmac(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(super) fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

/// `Hi(str, salt, i)` of RFC 5802 §2.2: PBKDF2 (RFC 8018) with HMAC-SHA-256
/// and a single 32-byte output block.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let keyed = keyed_hmac(password);
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: Key = mac.finalize().into_bytes().into();
    let mut result = u;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

#[cfg(test)]
#[path = "scram_tests.rs"]
mod tests;
