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

use super::{constant_time_eq, AuthError, Secret};

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
const KEY_LEN: usize = 32;
/// Base64 length of a [`KEY_LEN`]-byte value.
const KEY_B64_LEN: usize = 44;
/// Upper bound on a client SCRAM message. Real ones are ~100 bytes
/// (a user name of at most 63 bytes, escaped, plus nonces and the proof).
const MAX_MESSAGE_LEN: usize = 4096;
/// Upper bound on a verifier's decoded salt.
const MAX_SALT_LEN: usize = 1024;
/// Upper bound on the length of a verifier string.
const MAX_VERIFIER_LEN: usize = 4096;

type HmacSha256 = Hmac<Sha256>;
type Key = [u8; KEY_LEN];

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

        let server_signature = hmac(&self.verifier.server_key, &auth_message);
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
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
fn message_str(msg: &[u8]) -> Result<&str, AuthError> {
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
fn check_extension(attr: &str) -> Result<(), AuthError> {
    match attr.as_bytes() {
        [name, b'=', ..] if name.is_ascii_alphabetic() => Ok(()),
        _ => Err(AuthError::Malformed("invalid SCRAM attribute")),
    }
}

/// RFC 5802 `printable = %x21-2B / %x2D-7E` (printable ASCII except ',').
fn is_printable(c: u8) -> bool {
    matches!(c, 0x21..=0x2b | 0x2d..=0x7e)
}

fn parse_iterations(s: &str) -> Result<u32, AuthError> {
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
fn decode_base64(s: &str, max_len: usize, what: &'static str) -> Result<Vec<u8>, AuthError> {
    if s.len() > max_len.div_ceil(3) * 4 {
        return Err(AuthError::Malformed(what));
    }
    BASE64.decode(s).map_err(|_| AuthError::Malformed(what))
}

/// Decodes the base64 of a 32-byte key, proof or signature.
fn decode_key(s: &str, what: &'static str) -> Result<Key, AuthError> {
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

fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac = keyed_hmac(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> Key {
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
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange between `server` and the postgres-protocol client.
    fn exchange(
        mut server: ScramServer,
        password: &str,
        binding: ChannelBinding,
    ) -> Result<(), AuthError> {
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let server_first = server.client_first(client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first-message");
        let server_final = server.client_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client verifies the server signature");
        Ok(())
    }

    fn run(secret: &Secret, password: &str) -> Result<(), AuthError> {
        exchange(
            ScramServer::new(secret).expect("SCRAM possible"),
            password,
            ChannelBinding::unsupported(),
        )
    }

    const PASSWORD: &str = "pencil";

    #[test]
    fn plain_secret_exchange() {
        let secret = Secret::Plain(PASSWORD.to_owned());
        assert_eq!(run(&secret, PASSWORD), Ok(()));
        assert_eq!(run(&secret, "pencil2"), Err(AuthError::WrongPassword));
        assert_eq!(run(&secret, ""), Err(AuthError::WrongPassword));
    }

    #[test]
    fn plain_non_ascii_password_is_saslprepped() {
        // U+00A0 NO-BREAK SPACE is mapped to U+0020 by SASLprep; the client
        // normalises, so the server must too.
        let secret = Secret::Plain("pass\u{a0}word".to_owned());
        assert_eq!(run(&secret, "pass\u{a0}word"), Ok(()));
        assert_eq!(run(&secret, "pass word"), Ok(()));
        let secret = Secret::Plain("pässwörd".to_owned());
        assert_eq!(run(&secret, "pässwörd"), Ok(()));
        assert_eq!(run(&secret, "passwörd"), Err(AuthError::WrongPassword));
    }

    #[test]
    fn postgres_verifier_exchange() {
        let stored = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
        let secret = Secret::parse(&stored).unwrap();
        assert!(matches!(secret, Secret::Scram(_)));
        assert_eq!(run(&secret, PASSWORD), Ok(()));
        assert_eq!(run(&secret, "Pencil"), Err(AuthError::WrongPassword));
    }

    #[test]
    fn y_flag_is_accepted() {
        // "y,,": the client supports channel binding but believes the server
        // does not, which is true, so this must work (RFC 5802 §6).
        let secret = Secret::Plain(PASSWORD.to_owned());
        let server = ScramServer::new(&secret).unwrap();
        assert_eq!(
            exchange(server, PASSWORD, ChannelBinding::unrequested()),
            Ok(())
        );
    }

    #[test]
    fn from_password_matches_postgres() {
        let stored = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
        let parsed = ScramVerifier::parse(&stored).unwrap();
        let derived = ScramVerifier::from_password(PASSWORD, parsed.salt(), parsed.iterations());
        assert_eq!(derived.to_pg_string(), stored);
        assert_eq!(parsed.to_pg_string(), stored);
        assert_eq!(parsed.iterations(), DEFAULT_ITERATIONS);
        assert_eq!(parsed.salt().len(), DEFAULT_SALT_LEN);
        // And a derived verifier with a custom salt works end to end.
        let own = Secret::Scram(ScramVerifier::from_password(PASSWORD, b"some salt", 17));
        assert_eq!(run(&own, PASSWORD), Ok(()));
        assert_eq!(run(&own, "x"), Err(AuthError::WrongPassword));
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 §3: user "user", password "pencil", 4096 iterations.
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::from_password("pencil", &salt, 4096);
        let client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                            s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let without_proof = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&v.server_key, &[auth.as_bytes()]);
        assert_eq!(
            BASE64.encode(signature),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let client_signature = hmac(&v.stored_key, &[auth.as_bytes()]);
        let proof = BASE64
            .decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        assert_eq!(sha256(&client_key), v.stored_key);
    }

    #[test]
    fn md5_secret_cannot_do_scram() {
        let stored = postgres_protocol::password::md5(PASSWORD.as_bytes(), "alice");
        assert!(ScramServer::new(&Secret::parse(&stored).unwrap()).is_none());
    }

    #[test]
    fn mock_exchange_always_fails() {
        for password in [PASSWORD, "", "anything"] {
            assert_eq!(
                exchange(
                    ScramServer::mock("nobody"),
                    password,
                    ChannelBinding::unsupported()
                ),
                Err(AuthError::WrongPassword)
            );
        }
    }

    fn salt_and_iterations(server_first: &[u8]) -> (String, String) {
        let s = std::str::from_utf8(server_first).unwrap();
        let mut parts = s.split(',');
        let _nonce = parts.next().unwrap();
        let salt = parts.next().unwrap().strip_prefix("s=").unwrap().to_owned();
        let iter = parts.next().unwrap().strip_prefix("i=").unwrap().to_owned();
        assert!(parts.next().is_none());
        (salt, iter)
    }

    #[test]
    fn mock_looks_like_a_real_user() {
        let first = |mut server: ScramServer| server.client_first(b"n,,n=,r=abc").unwrap();
        let (salt_a, iter_a) = salt_and_iterations(&first(ScramServer::mock("ghost")));
        let (salt_a2, _) = salt_and_iterations(&first(ScramServer::mock("ghost")));
        let (salt_b, _) = salt_and_iterations(&first(ScramServer::mock("phantom")));
        assert_eq!(salt_a, salt_a2, "stable per user");
        assert_ne!(salt_a, salt_b, "different per user");
        assert_eq!(BASE64.decode(&salt_a).unwrap().len(), DEFAULT_SALT_LEN);
        assert_eq!(iter_a, DEFAULT_ITERATIONS.to_string());
        // Same shape as a real verifier's salt.
        let real = Secret::Plain(PASSWORD.to_owned());
        let (real_salt, real_iter) = salt_and_iterations(&first(ScramServer::new(&real).unwrap()));
        assert_eq!(real_salt.len(), salt_a.len());
        assert_eq!(real_iter, iter_a);
        // A caller-supplied secret gives salts that survive restarts.
        let (x, _) = salt_and_iterations(&first(ScramServer::mock_with_secret("ghost", b"k")));
        let (y, _) = salt_and_iterations(&first(ScramServer::mock_with_secret("ghost", b"k")));
        assert_eq!(x, y);
    }

    #[test]
    fn server_first_shape() {
        let mut server = ScramServer::new(&Secret::Plain(PASSWORD.to_owned())).unwrap();
        let reply = server.client_first(b"n,,n=,r=clientnonce").unwrap();
        let reply = String::from_utf8(reply).unwrap();
        let nonce = reply.split(',').next().unwrap().strip_prefix("r=").unwrap();
        let server_part = nonce.strip_prefix("clientnonce").unwrap();
        assert_eq!(server_part.len(), 24);
        assert_eq!(BASE64.decode(server_part).unwrap().len(), SERVER_NONCE_LEN);
    }

    /// A verifier for `PASSWORD` that is cheap to use in debug builds.
    fn cheap_secret() -> Secret {
        Secret::Scram(ScramVerifier::from_password(PASSWORD, b"salt", 2))
    }

    /// A server that has answered a fixed client-first-message, plus what a
    /// correct client-final-message for `PASSWORD` would be.
    fn after_first(gs2: &str) -> (ScramServer, String, String) {
        let mut server = ScramServer::new(&cheap_secret()).unwrap();
        let bare = "n=,r=fyko+d2lbbFgONRv9qkxdawL";
        let server_first = String::from_utf8(
            server
                .client_first(format!("{gs2}{bare}").as_bytes())
                .unwrap(),
        )
        .unwrap();
        let nonce = server_first
            .split(',')
            .next()
            .unwrap()
            .strip_prefix("r=")
            .unwrap()
            .to_owned();
        let without_proof = format!("c={},r={nonce}", BASE64.encode(gs2));
        let (salt, iterations) = salt_and_iterations(server_first.as_bytes());
        let salt = BASE64.decode(salt).unwrap();
        let salted = hi(PASSWORD.as_bytes(), &salt, iterations.parse().unwrap());
        let client_key = hmac(&salted, &[b"Client Key"]);
        let auth = format!("{bare},{server_first},{without_proof}");
        let signature = hmac(&sha256(&client_key), &[auth.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let good = format!("{without_proof},p={}", BASE64.encode(proof));
        (server, good, nonce)
    }

    #[test]
    fn hand_built_final_verifies() {
        let (mut server, good, _) = after_first("n,,");
        assert!(server
            .client_final(good.as_bytes())
            .unwrap()
            .starts_with(b"v="));
        // With an (ignored) extension before the proof, the proof no longer
        // matches (it covers the message), but parsing accepts it.
        let (mut server, good, _) = after_first("n,,");
        let (head, proof) = good.rsplit_once(',').unwrap();
        let with_ext = format!("{head},x=ext,{proof}");
        assert_eq!(
            server.client_final(with_ext.as_bytes()),
            Err(AuthError::WrongPassword)
        );
    }

    #[test]
    fn malformed_client_first() {
        let long = format!("n,,n=,r={}", "a".repeat(MAX_MESSAGE_LEN));
        let cases: &[(&[u8], Option<AuthError>)] = &[
            (b"", None),
            (b"n", None),
            (b"n,", None),
            (b"n,,", None),
            (b"n,,n=", None),
            (b"n,,n=,", None),
            (b"n,,n=,r=", None),
            (b"n,,n=,r", None),
            (b"n,,r=abc", None),
            (b"n,,n=,x=abc", None),
            (b",,n=,r=abc", None),
            (b"x,,n=,r=abc", None),
            (b"nn,,n=,r=abc", None),
            (b"N,,n=,r=abc", None),
            (b"n,x,n=,r=abc", None),
            (b"n,,n=,r=ab\x7fc", None),
            (b"n,,n=,r=ab c", None),
            (b"n,,n=,r=abc,", None),
            (b"n,,n=,r=abc,1=x", None),
            (b"n,,n=,r=abc,xx", None),
            (b"n,,n=,r=\xff\xfe", None),
            (b"\xc3\x28,,n=,r=abc", None),
            (b"n,,n=,r=abc\0", None),
            (b"\0", None),
            (b"garbage", None),
            (long.as_bytes(), None),
            (
                b"n,,m=ext,n=,r=abc",
                Some(AuthError::Malformed(
                    "mandatory SCRAM extensions are not supported",
                )),
            ),
            (
                b"p=tls-server-end-point,,n=,r=abc",
                Some(AuthError::Unsupported(
                    "SCRAM channel binding (SCRAM-SHA-256-PLUS) was not offered",
                )),
            ),
            (
                b"n,a=bob,n=,r=abc",
                Some(AuthError::Unsupported("SCRAM authorization identity")),
            ),
        ];
        for (msg, expected) in cases {
            let mut server = ScramServer::new(&cheap_secret()).unwrap();
            let err = server
                .client_first(msg)
                .expect_err(&String::from_utf8_lossy(msg));
            match expected {
                Some(e) => assert_eq!(&err, e, "{}", String::from_utf8_lossy(msg)),
                None => assert!(
                    matches!(err, AuthError::Malformed(_)),
                    "{}: {err:?}",
                    String::from_utf8_lossy(msg)
                ),
            }
            // The exchange is over after an error.
            assert!(server.client_final(b"c=biws,r=abc,p=").is_err());
        }
        // Accepted: a user name (ignored) and optional extensions.
        for msg in [
            &b"n,,n=bob,r=abc"[..],
            b"y,,n=,r=abc",
            b"n,,n=,r=abc,x=1,y==",
        ] {
            let mut server = ScramServer::mock("u");
            assert!(server.client_first(msg).is_ok(), "{msg:?}");
        }
    }

    #[test]
    fn malformed_client_final() {
        // Templates: <NONCE>, <PROOF>, <SHORT> (a truncated proof) and <WP>
        // (client-final-message-without-proof) are filled in from a fresh
        // exchange per case, so that each case fails for the reason it is
        // about ('<' cannot occur in base64, so the markers cannot collide).
        // The second element is the expected error detail ("" = any
        // Malformed).
        let long = "A".repeat(MAX_MESSAGE_LEN);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), ""),
            ("garbage".into(), ""),
            ("c=biws,r=<NONCE>".into(), ""),
            ("c=biws,r=<NONCE>,p=".into(), "invalid SCRAM client proof"),
            (
                "c=biws,r=<NONCE>,p=!!!!".into(),
                "invalid SCRAM client proof",
            ),
            (
                "c=biws,r=<NONCE>,p=<SHORT>".into(),
                "invalid SCRAM client proof",
            ),
            (
                format!("c=biws,r=<NONCE>,p={}", BASE64.encode([0u8; 31])),
                "invalid SCRAM client proof",
            ),
            (
                format!("c=biws,r=<NONCE>,p={}", BASE64.encode([0u8; 33])),
                "invalid SCRAM client proof",
            ),
            (
                "c=biws,r=<NONCE>,p=<PROOF>,x=1".into(),
                "SCRAM proof must be the last attribute",
            ),
            (
                "c=biws,r=<NONCE>,p=<PROOF>,p=<PROOF>".into(),
                "SCRAM proof must be the last attribute",
            ),
            (
                "c=biws,r=<NONCE>,p=<PROOF>,".into(),
                "SCRAM proof must be the last attribute",
            ),
            ("c=biws,r=<NONCE>x,p=<PROOF>".into(), "SCRAM nonce mismatch"),
            ("c=biws,r=x,p=<PROOF>".into(), "SCRAM nonce mismatch"),
            ("c=biws,r=,p=<PROOF>".into(), "SCRAM nonce mismatch"),
            (
                "c=biws,r=fyko+d2lbbFgONRv9qkxdawL,p=<PROOF>".into(),
                "SCRAM nonce mismatch",
            ),
            // "y,," although "n,," was sent:
            (
                "c=eSws,r=<NONCE>,p=<PROOF>".into(),
                "SCRAM channel-binding data mismatch",
            ),
            (
                "c=biws=,r=<NONCE>,p=<PROOF>".into(),
                "SCRAM channel-binding data mismatch",
            ),
            (
                "c=,r=<NONCE>,p=<PROOF>".into(),
                "SCRAM channel-binding data mismatch",
            ),
            // "p=tls-unique,,":
            (
                "c=cD10bHMtdW5pcXVlLCw=,r=<NONCE>,p=<PROOF>".into(),
                "SCRAM channel-binding data mismatch",
            ),
            (
                "r=<NONCE>,c=biws,p=<PROOF>".into(),
                "expected SCRAM channel-binding attribute",
            ),
            ("c=biws,p=<PROOF>".into(), "expected SCRAM nonce attribute"),
            (
                "r=<NONCE>,p=<PROOF>".into(),
                "expected SCRAM channel-binding attribute",
            ),
            (
                "c=biws,r=<NONCE>,1=x,p=<PROOF>".into(),
                "invalid SCRAM attribute",
            ),
            (
                "c=biws,r=<NONCE>,,p=<PROOF>".into(),
                "invalid SCRAM attribute",
            ),
            ("<WP>,p=<PROOF>\0".into(), "NUL byte in SCRAM message"),
            (format!("<WP>,p={long}"), "SCRAM message too long"),
        ];
        for (template, detail) in &cases {
            let (mut server, good, nonce) = after_first("n,,");
            let proof = good.rsplit_once(",p=").unwrap().1;
            let without_proof = good.rsplit_once(",p=").unwrap().0;
            let msg = template
                .replace("<NONCE>", &nonce)
                .replace("<PROOF>", proof)
                .replace("<SHORT>", &proof[..40])
                .replace("<WP>", without_proof);
            let err = server.client_final(msg.as_bytes()).expect_err(&msg);
            match err {
                AuthError::Malformed(d) if detail.is_empty() || d == *detail => {}
                other => panic!("{msg}: expected Malformed({detail:?}), got {other:?}"),
            }
        }
        // Every truncation of a good message fails without panicking.
        let len = after_first("n,,").1.len();
        for cut in 0..len {
            let (mut server, good, _) = after_first("n,,");
            assert!(
                server.client_final(&good.as_bytes()[..cut]).is_err(),
                "{cut}"
            );
        }
        // A flipped proof bit is a wrong password, not a parse error.
        let (mut server, good, _) = after_first("n,,");
        let (without_proof, proof) = good.rsplit_once(",p=").unwrap();
        let mut bad_proof = BASE64.decode(proof).unwrap();
        bad_proof[0] ^= 1;
        let msg = format!("{without_proof},p={}", BASE64.encode(bad_proof));
        assert_eq!(
            server.client_final(msg.as_bytes()),
            Err(AuthError::WrongPassword)
        );
        // Invalid UTF-8.
        let (mut server, _, _) = after_first("n,,");
        assert_eq!(
            server.client_final(b"c=biws,r=\xff,p=x"),
            Err(AuthError::Malformed("SCRAM message is not UTF-8"))
        );
        // "y,," must come back as "eSws", and "biws" is then wrong.
        let (mut server, good_y, _) = after_first("y,,");
        assert!(good_y.starts_with("c=eSws,"));
        let wrong = good_y.replacen("c=eSws", "c=biws", 1);
        assert_eq!(
            server.client_final(wrong.as_bytes()),
            Err(AuthError::Malformed("SCRAM channel-binding data mismatch"))
        );
        let (mut server, good_y, _) = after_first("y,,");
        assert!(server.client_final(good_y.as_bytes()).is_ok());
    }

    #[test]
    fn out_of_order_calls_fail() {
        let secret = Secret::Plain(PASSWORD.to_owned());
        let mut server = ScramServer::new(&secret).unwrap();
        assert!(server.client_final(b"c=biws,r=abc,p=").is_err());
        assert!(server.client_first(b"n,,n=,r=abc").is_err());

        let (mut server, good, _) = after_first("n,,");
        assert!(server.client_first(b"n,,n=,r=abc").is_err());
        assert!(server.client_final(good.as_bytes()).is_err());

        let (mut server, good, _) = after_first("n,,");
        assert!(server.client_final(good.as_bytes()).is_ok());
        assert!(server.client_final(good.as_bytes()).is_err());
        assert!(format!("{server:?}").contains("finished"));
    }

    /// Cheap deterministic fuzzing: mutate valid messages and feed them in.
    #[test]
    fn mutations_never_panic() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"nyp=ac,rmsx0+/\0\xff\xc3 biwsA";
        let (_, good_final, _) = after_first("n,,");
        let good_first = b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL".to_vec();
        for round in 0..600 {
            let base = if round % 2 == 0 {
                good_first.clone()
            } else {
                good_final.clone().into_bytes()
            };
            let mut msg = base;
            for _ in 0..(1 + next() % 4) {
                let pos = (next() as usize) % (msg.len() + 1);
                let c = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if pos < msg.len() => msg[pos] = c,
                    1 if pos < msg.len() => {
                        msg.remove(pos);
                    }
                    _ => msg.insert(pos, c),
                }
            }
            let mut server = ScramServer::mock("fuzz");
            let _ = server.client_first(&msg);
            let _ = server.client_final(&msg);
            let _ = ScramVerifier::parse(&String::from_utf8_lossy(&msg));
        }
    }

    #[test]
    fn verifier_parsing() {
        let good = postgres_protocol::password::scram_sha_256(PASSWORD.as_bytes());
        assert!(ScramVerifier::parse(&good).is_ok());
        let (head, keys) = good.rsplit_once('$').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        let salt = good.split(['$', ':']).nth(2).unwrap();
        let bad = vec![
            String::new(),
            "SCRAM-SHA-256$".into(),
            "SCRAM-SHA-256".into(),
            "SCRAM-SHA-1$4096:c2FsdA==$a:b".into(),
            good.to_lowercase(),
            head.to_owned(),
            format!("{head}$"),
            format!("{head}${stored}"),
            format!("{head}${stored}:"),
            format!("{head}${stored}:{server}:"),
            format!("{head}${stored}:{server}$"),
            format!("{head}${server}:{}", &stored[..43]),
            format!("{head}${stored}:{}B=", &server[..42]), // non-zero trailing bits
            format!("{head}${stored}:{}", BASE64.encode([1u8; 31])),
            format!("{head}${stored}:{}", BASE64.encode([1u8; 33])),
            format!("{head}$!{}:{server}", &stored[1..]),
            format!("SCRAM-SHA-256$0:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$10000001:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$99999999999:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$+4096:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$-1:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$ 4096:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$4096${stored}:{server}"),
            format!("SCRAM-SHA-256$4096:${stored}:{server}"),
            format!("SCRAM-SHA-256$4096:c2FsdA=${stored}:{server}"),
            format!(
                "SCRAM-SHA-256$4096:{}${stored}:{server}",
                "QUFB".repeat(400)
            ),
            format!(
                "SCRAM-SHA-256$4096:{salt}${stored}:{server}{}",
                "A".repeat(5000)
            ),
        ];
        for s in &bad {
            assert!(
                matches!(ScramVerifier::parse(s), Err(AuthError::Malformed(_))),
                "{s}"
            );
        }
        for ok in [
            format!("SCRAM-SHA-256$1:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$10000000:{salt}${stored}:{server}"),
            format!("SCRAM-SHA-256$4096:c2FsdA==${stored}:{server}"),
        ] {
            assert!(ScramVerifier::parse(&ok).is_ok(), "{ok}");
        }
        // Every truncation fails cleanly.
        for len in 0..good.len() {
            assert!(ScramVerifier::parse(&good[..len]).is_err(), "{len}");
        }
    }
}
