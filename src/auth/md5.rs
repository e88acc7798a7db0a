//! MD5 password authentication, server side.
//!
//! PostgreSQL's legacy challenge-response scheme (protocol docs, "Message
//! Flow → Start-up", `AuthenticationMD5Password`; backend code in
//! `src/backend/libpq/crypt.c`, `md5_crypt_verify()`): the server sends a
//! random 4-byte salt, and the client answers with the `PasswordMessage`
//!
//! ```text
//! "md5" || hex(md5( hex(md5(password || username)) || salt ))
//! ```
//!
//! (lower-case hex). The server can check this either from the plaintext
//! password or from the stored `md5<hex(md5(password || username))>` hash.
//! A SCRAM verifier cannot be used: it does not contain that hash.
//!
//! MD5 is weak; prefer SCRAM ([`super::scram`]) wherever clients support it.

use ::md5::{Digest, Md5};

use super::{constant_time_eq, Secret};

/// Length of the lower-case hex form of an MD5 digest.
const HEX_LEN: usize = 32;

/// Checks a client's answer to an `AuthenticationMD5Password` challenge.
///
/// `client_response` is the payload of the client's `PasswordMessage`
/// (`md5` followed by 32 lower-case hex digits); a single trailing NUL
/// terminator is tolerated. The comparison is constant-time.
///
/// Returns `false` for a [`Secret::Scram`] secret, since MD5 authentication is
/// impossible with a SCRAM verifier (PostgreSQL behaves the same). An
/// [`Secret::Md5`] hash only verifies for the user name it was made with.
pub fn md5_verify(secret: &Secret, user: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    let inner: [u8; 16] = match secret {
        Secret::Plain(password) => md5(&[password.as_bytes(), user.as_bytes()]),
        Secret::Md5(hash) => *hash,
        Secret::Scram(_) => return false,
    };
    let outer = md5(&[&to_hex(&inner), &salt]);

    let mut expected = [0u8; 3 + HEX_LEN];
    expected[..3].copy_from_slice(b"md5");
    expected[3..].copy_from_slice(&to_hex(&outer));

    let response = client_response
        .strip_suffix(&[0])
        .unwrap_or(client_response);
    constant_time_eq(&expected, response)
}

/// The answer to a server's `AuthenticationMD5Password` challenge from the stored hash
/// `md5(password || user)` alone: `"md5" || hex(md5(hex(stored) || salt))` (the
/// "AuthenticationMD5Password" message in the protocol documentation). This is what lets
/// tidepool log in to the server as a looked-up md5 user without the password.
pub fn md5_answer_from_hash(stored: &[u8; 16], salt: [u8; 4]) -> String {
    let outer = md5(&[&to_hex(stored), &salt]);
    let mut out = String::with_capacity(3 + HEX_LEN);
    out.push_str("md5");
    out.extend(to_hex(&outer).iter().map(|&b| char::from(b)));
    out
}

/// Recognises PostgreSQL's stored MD5 format: `md5` followed by exactly 32
/// lower-case hex digits (the same test as `get_password_type()` in
/// `src/backend/libpq/crypt.c`). Returns the 16 digest bytes.
pub(super) fn parse_stored_hash(s: &str) -> Option<[u8; 16]> {
    let hex = s.strip_prefix("md5")?.as_bytes();
    if hex.len() != HEX_LEN {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (lower_hex_value(pair[0])? << 4) | lower_hex_value(pair[1])?;
    }
    Some(out)
}

fn lower_hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn to_hex(bytes: &[u8; 16]) -> [u8; HEX_LEN] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; HEX_LEN];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    out
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    const USER: &str = "alice";
    const PASSWORD: &str = "s3cret!";
    const SALT: [u8; 4] = [0x01, 0xfe, 0x7f, 0x80];

    fn client_answer(user: &str, password: &str, salt: [u8; 4]) -> String {
        md5_hash(user.as_bytes(), password.as_bytes(), salt)
    }

    #[test]
    fn answer_from_the_stored_hash_is_libpqs() {
        let stored = md5(&[PASSWORD.as_bytes(), USER.as_bytes()]);
        assert_eq!(
            md5_answer_from_hash(&stored, SALT),
            md5_hash(USER.as_bytes(), PASSWORD.as_bytes(), SALT)
        );
    }

    #[test]
    fn plain_secret() {
        let secret = Secret::Plain(PASSWORD.to_owned());
        let answer = client_answer(USER, PASSWORD, SALT);
        assert!(md5_verify(&secret, USER, SALT, answer.as_bytes()));
        // A NUL-terminated payload is accepted too.
        let mut with_nul = answer.clone().into_bytes();
        with_nul.push(0);
        assert!(md5_verify(&secret, USER, SALT, &with_nul));
    }

    #[test]
    fn stored_md5_secret() {
        let stored = postgres_protocol::password::md5(PASSWORD.as_bytes(), USER);
        let secret = Secret::parse(&stored).unwrap();
        assert!(matches!(secret, Secret::Md5(_)));
        let answer = client_answer(USER, PASSWORD, SALT);
        assert!(md5_verify(&secret, USER, SALT, answer.as_bytes()));
        // The stored hash is bound to the user name it was computed with.
        let other = client_answer("bob", PASSWORD, SALT);
        assert!(!md5_verify(&secret, "bob", SALT, other.as_bytes()));
    }

    #[test]
    fn wrong_answers_fail() {
        let plain = Secret::Plain(PASSWORD.to_owned());
        let stored =
            Secret::parse(&postgres_protocol::password::md5(PASSWORD.as_bytes(), USER)).unwrap();
        for secret in [&plain, &stored] {
            let wrong_pw = client_answer(USER, "s3cret?", SALT);
            assert!(!md5_verify(secret, USER, SALT, wrong_pw.as_bytes()));
            let wrong_salt = client_answer(USER, PASSWORD, [0, 0, 0, 0]);
            assert!(!md5_verify(secret, USER, SALT, wrong_salt.as_bytes()));
            let wrong_user = client_answer("bob", PASSWORD, SALT);
            assert!(!md5_verify(secret, USER, SALT, wrong_user.as_bytes()));

            let good = client_answer(USER, PASSWORD, SALT);
            let upper = good.to_uppercase();
            let bad: Vec<&[u8]> = vec![
                b"",
                b"\0",
                b"md5",
                &good.as_bytes()[..34],
                &good.as_bytes()[3..],
                upper.as_bytes(),
                &[0xff; 35],
                PASSWORD.as_bytes(),
            ];
            for response in bad {
                assert!(!md5_verify(secret, USER, SALT, response), "{response:?}");
            }
            let mut long = good.into_bytes();
            long.extend_from_slice(b"\0\0");
            assert!(!md5_verify(secret, USER, SALT, &long));
        }
    }

    #[test]
    fn scram_secret_cannot_do_md5() {
        let secret = Secret::parse(&postgres_protocol::password::scram_sha_256(
            PASSWORD.as_bytes(),
        ))
        .unwrap();
        let answer = client_answer(USER, PASSWORD, SALT);
        assert!(!md5_verify(&secret, USER, SALT, answer.as_bytes()));
    }

    #[test]
    fn stored_hash_parsing() {
        let stored = postgres_protocol::password::md5(PASSWORD.as_bytes(), USER);
        let hash = parse_stored_hash(&stored).unwrap();
        assert_eq!(
            format!("md5{}", std::str::from_utf8(&to_hex(&hash)).unwrap()),
            stored
        );
        assert_eq!(parse_stored_hash("md5"), None);
        assert_eq!(
            parse_stored_hash("MD5a3556571e93b0d20722ba62be61e8c2d"),
            None
        );
        assert_eq!(
            parse_stored_hash("md5a3556571e93b0d20722ba62be61e8c2é"),
            None
        );
    }
}
