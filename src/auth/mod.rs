//! Server-side PostgreSQL client authentication for tidepool's client-facing
//! listener.
//!
//! Towards its clients the pooler plays the part of the PostgreSQL server, so
//! it has to run the *server half* of the authentication exchanges described
//! in the "Message Flow → Start-up" and "SASL Authentication" sections of the
//! PostgreSQL frontend/backend protocol documentation:
//!
//! * [`md5_verify`] checks the answer to an `AuthenticationMD5Password`
//!   challenge (see [`md5`]);
//! * [`ScramServer`] runs a SCRAM-SHA-256 exchange (RFC 5802 / RFC 7677) the
//!   way PostgreSQL's `src/backend/libpq/auth-scram.c` does (see [`scram`]).
//!
//! For pass-through it also plays the *client* half towards a server without the password:
//! [`ScramClient`] answers with the keys a client's proof revealed ([`scram_client`]), and
//! [`md5_answer_from_hash`] with a stored md5 hash.
//!
//! Everything here is pure and synchronous: the caller reads and writes the
//! protocol messages, this module only computes and checks their payloads.
//! All parsers treat their input as hostile: anything unexpected yields
//! [`AuthError::Malformed`] (or [`AuthError::Unsupported`]) and never a panic.
//!
//! Secrets are configured per user as a [`Secret`], which is parsed from the
//! same three spellings PostgreSQL accepts in `pg_authid.rolpassword`:
//! plaintext, `md5<32 hex digits>` and `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.

pub mod md5;
pub mod scram;
pub mod scram_client;

use std::fmt;
use std::str::FromStr;

use subtle::ConstantTimeEq;

pub use self::md5::{md5_answer_from_hash, md5_verify};
pub use self::scram::{ScramServer, ScramVerifier, SCRAM_SHA_256};
pub use self::scram_client::{ScramClient, ScramKeys};

/// Why an authentication step failed.
///
/// The messages are meant for the server log. What is sent to the client
/// should stay generic (PostgreSQL answers every failure with
/// `password authentication failed for user "..."`), so that a client cannot
/// tell a wrong password from an unknown user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client (or a configured secret) sent something that does not
    /// follow the protocol grammar.
    #[error("malformed authentication data: {0}")]
    Malformed(&'static str),
    /// The exchange was well formed but the password does not match (or the
    /// user does not exist and a mock exchange was run).
    #[error("password authentication failed")]
    WrongPassword,
    /// The client asked for something this server does not implement, such
    /// as SCRAM channel binding or a SASL authorization identity.
    #[error("unsupported authentication feature: {0}")]
    Unsupported(&'static str),
    /// Pass-through: the server asked for a SCRAM salt or iteration count other than the
    /// verifier's whose keys tidepool holds, so its verifier changed (a new password).
    #[error(
        "the server's SCRAM verifier is not the one tidepool holds keys for (password changed?)"
    )]
    StaleSecret,
}

/// What tidepool answers a server's authentication request with, as a client.
///
/// A plaintext password answers every method; the others come from a client's login and
/// stand in for a password tidepool never learns (pass-through, DESIGN.md section 11):
/// the keys recovered from a SCRAM proof, or an md5 user's stored hash. `Debug` redacts.
#[derive(Clone, PartialEq, Eq)]
pub enum ServerCredential {
    Password(String),
    Scram(ScramKeys),
    /// `md5(password || user)`, as `pg_authid` stores it.
    Md5Hash([u8; 16]),
}

impl fmt::Debug for ServerCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerCredential::Password(_) => "Password(<redacted>)",
            ServerCredential::Scram(_) => "ScramKeys(<redacted>)",
            ServerCredential::Md5Hash(_) => "Md5Hash(<redacted>)",
        })
    }
}

/// A configured user's secret.
///
/// Parsed with [`Secret::parse`] following PostgreSQL's own classification of
/// a stored password (`get_password_type()` in `src/backend/libpq/crypt.c`):
///
/// * `md5` followed by exactly 32 lower-case hex digits is an MD5 hash of
///   `password || username` ([`Secret::Md5`]); note that it only verifies for
///   the user name it was computed with;
/// * `SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>` is a
///   SCRAM verifier ([`Secret::Scram`]);
/// * anything else is a plaintext password ([`Secret::Plain`]).
///
/// The `Debug` implementation never prints secret material.
#[derive(Clone)]
pub enum Secret {
    /// A plaintext password; allows both MD5 and SCRAM authentication.
    Plain(String),
    /// The 16-byte MD5 digest of `password || username`, as stored by
    /// PostgreSQL with `password_encryption = md5` (the `md5...` hex form).
    /// Allows MD5 authentication only.
    Md5([u8; 16]),
    /// A SCRAM-SHA-256 verifier. Allows SCRAM authentication only.
    Scram(ScramVerifier),
}

impl Secret {
    /// Parses a secret as written in the configuration.
    ///
    /// Unlike PostgreSQL, which silently treats anything it cannot parse as a
    /// plaintext password, a string starting with `SCRAM-SHA-256$` that is not
    /// a valid verifier is rejected: it is almost certainly a truncated or
    /// mistyped verifier rather than a password. An empty string is rejected
    /// too (PostgreSQL refuses empty passwords as well).
    pub fn parse(s: &str) -> Result<Secret, AuthError> {
        if s.starts_with(scram::VERIFIER_PREFIX) {
            return ScramVerifier::parse(s).map(Secret::Scram);
        }
        if let Some(hash) = md5::parse_stored_hash(s) {
            return Ok(Secret::Md5(hash));
        }
        if s.is_empty() {
            return Err(AuthError::Malformed("empty password"));
        }
        Ok(Secret::Plain(s.to_owned()))
    }

    /// The plaintext password, if this secret is one.
    pub fn plaintext(&self) -> Option<&str> {
        match self {
            Secret::Plain(p) => Some(p),
            Secret::Md5(_) | Secret::Scram(_) => None,
        }
    }
}

impl FromStr for Secret {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Secret::parse(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Secret::Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Secret::Md5(<redacted>)"),
            // ScramVerifier's own Debug redacts the salt and keys.
            Secret::Scram(v) => f.debug_tuple("Secret::Scram").field(v).finish(),
        }
    }
}

/// Compares two byte strings in time independent of their contents.
///
/// The lengths are not treated as secret: strings of different lengths
/// compare unequal immediately.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_classifies_like_postgres() {
        assert_eq!(
            Secret::parse("hunter2").unwrap().plaintext(),
            Some("hunter2")
        );
        // "md5" + 32 lower-case hex digits is an MD5 hash ...
        let md5 = Secret::parse("md5a3556571e93b0d20722ba62be61e8c2d").unwrap();
        assert!(matches!(md5, Secret::Md5(_)));
        assert_eq!(md5.plaintext(), None);
        // ... anything else starting with md5 is just a password.
        for plain in [
            "md5",
            "md5password",
            "md5a3556571e93b0d20722ba62be61e8c2",   // 31 digits
            "md5a3556571e93b0d20722ba62be61e8c2d0", // 33 digits
            "md5A3556571E93B0D20722BA62BE61E8C2D",  // upper case, as in Postgres
            "md5g3556571e93b0d20722ba62be61e8c2d",
        ] {
            assert_eq!(Secret::parse(plain).unwrap().plaintext(), Some(plain));
        }
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(Secret::parse(&v).unwrap(), Secret::Scram(_)));
        assert!(matches!(v.parse::<Secret>(), Ok(Secret::Scram(_))));
    }

    #[test]
    fn parse_rejects_broken_verifiers_and_empty() {
        assert!(matches!(
            Secret::parse("SCRAM-SHA-256$4096:c2FsdA==$"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(Secret::parse(""), Err(AuthError::Malformed(_))));
    }

    #[test]
    fn debug_never_shows_secret_material() {
        let password = "correct horse battery staple";
        let plain = Secret::Plain(password.to_owned());
        let dbg = format!("{plain:?} {plain:#?}");
        assert!(!dbg.contains(password), "{dbg}");
        assert!(!dbg.contains("correct"), "{dbg}");
        assert!(dbg.contains("<redacted>"));

        let hex = "a3556571e93b0d20722ba62be61e8c2d";
        let md5 = Secret::parse(&format!("md5{hex}")).unwrap();
        let dbg = format!("{md5:?} {md5:#?}");
        assert!(!dbg.contains(hex) && !dbg.contains("a3556571"), "{dbg}");

        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let scram = Secret::parse(&verifier).unwrap();
        let dbg = format!("{scram:?} {scram:#?}");
        let (_, keys) = verifier.rsplit_once('$').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        let salt = verifier.split(['$', ':']).nth(2).unwrap();
        for material in [stored, server, salt] {
            assert!(!dbg.contains(material), "{dbg} contains {material}");
        }
        // The decoded key bytes must not leak either (e.g. as a byte list).
        assert!(!dbg.contains('['), "{dbg}");

        let server = ScramServer::new(&plain).unwrap();
        let dbg = format!("{server:?}");
        assert!(!dbg.contains(password) && !dbg.contains('['), "{dbg}");
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            AuthError::WrongPassword.to_string(),
            "password authentication failed"
        );
        assert!(AuthError::Malformed("x").to_string().contains('x'));
        assert!(AuthError::Unsupported("y").to_string().contains('y'));
    }
}
