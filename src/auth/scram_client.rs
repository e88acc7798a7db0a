//! SCRAM-SHA-256, client side, with keys instead of a password: how tidepool logs in to a
//! server as a user whose password it never learns (pass-through, DESIGN.md section 11).
//!
//! A SCRAM client needs the password only to derive `ClientKey` (to sign) and `ServerKey` (to
//! check the server). When a client logs in to tidepool against the server's own verifier,
//! tidepool recovers `ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage)` from the
//! client's proof, and the verifier holds `ServerKey`: the two keys answer any later exchange
//! with a server that stores the same verifier (RFC 5802 §3; PgBouncer and Odyssey do the
//! same). The exchange, with `n,,` (no channel binding, as libpq over plain TCP):
//!
//! ```text
//! C: client-first-message  "n,,n=,r=<client nonce>"
//! S: server-first-message  "r=<client nonce><server nonce>,s=<salt>,i=<iterations>"
//! C: client-final-message  "c=biws,r=<nonce>,p=<ClientKey XOR HMAC(H(ClientKey), AuthMessage)>"
//! S: server-final-message  "v=<HMAC(ServerKey, AuthMessage)>"  (or "e=<error>")
//! ```

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::constant_time_eq;
use super::scram::{
    check_extension, decode_base64, decode_key, hmac, is_printable, message_str, parse_iterations,
    sha256, Key, MAX_SALT_LEN,
};
use super::AuthError;

/// Raw length of the client nonce (libpq's `SCRAM_RAW_NONCE_LEN`).
const CLIENT_NONCE_LEN: usize = 18;

/// The keys that stand in for a password towards servers storing one verifier.
///
/// Sensitive like a password for as long as the verifier is valid, so `Debug` redacts them
/// and they are never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    client_key: Key,
    server_key: Key,
    /// The verifier's salt and iteration count: a server that sends others stores another
    /// verifier (the password changed), and the keys cannot answer it.
    salt: Vec<u8>,
    iterations: u32,
}

impl ScramKeys {
    pub(super) fn new(client_key: Key, server_key: Key, salt: &[u8], iterations: u32) -> Self {
        ScramKeys {
            client_key,
            server_key,
            salt: salt.to_vec(),
            iterations,
        }
    }
}

impl fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ScramKeys(<redacted>)")
    }
}

/// One client-side exchange with a server, answered with [`ScramKeys`].
pub struct ScramClient {
    keys: ScramKeys,
    state: ClientState,
}

enum ClientState {
    /// The client-first-message was made; waiting for the server's first.
    AwaitingServerFirst {
        client_first_bare: String,
    },
    /// The proof was sent; the server's signature must be this.
    AwaitingServerFinal {
        server_signature: Key,
    },
    Finished,
}

impl ScramClient {
    /// Starts an exchange; returns the client and its client-first-message (the data of the
    /// `SASLInitialResponse`).
    pub fn start(keys: ScramKeys) -> (ScramClient, Vec<u8>) {
        let mut raw = [0u8; CLIENT_NONCE_LEN];
        rand::fill(&mut raw[..]);
        Self::start_with_nonce(keys, &BASE64.encode(raw))
    }

    /// [`start`](Self::start) with a given nonce (tests and fuzzing: reproducible runs).
    pub fn start_with_nonce(keys: ScramKeys, nonce: &str) -> (ScramClient, Vec<u8>) {
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        let client = ScramClient {
            keys,
            state: ClientState::AwaitingServerFirst { client_first_bare },
        };
        (client, first)
    }

    /// Handles the server-first-message (the data of `AuthenticationSASLContinue`); returns
    /// the client-final-message (the data of the `SASLResponse`).
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let ClientState::AwaitingServerFirst { client_first_bare } =
            std::mem::replace(&mut self.state, ClientState::Finished)
        else {
            return Err(AuthError::Malformed(
                "unexpected SCRAM server-first-message",
            ));
        };
        let server_first = message_str(msg)?;
        let mut attrs = server_first.split(',');
        let first_attr = attrs.next().unwrap_or_default();
        if first_attr.starts_with("m=") {
            return Err(AuthError::Malformed(
                "mandatory SCRAM extensions are not supported",
            ));
        }
        let nonce = first_attr
            .strip_prefix("r=")
            .ok_or(AuthError::Malformed("expected SCRAM nonce attribute"))?;
        let client_nonce = &client_first_bare["n=,r=".len()..];
        // The server's nonce must extend ours (RFC 5802 §5.1).
        if nonce.len() <= client_nonce.len()
            || !nonce.starts_with(client_nonce)
            || !nonce.bytes().all(is_printable)
        {
            return Err(AuthError::Malformed("invalid SCRAM server nonce"));
        }
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .ok_or(AuthError::Malformed("expected SCRAM salt attribute"))?;
        let salt = decode_base64(salt, MAX_SALT_LEN, "invalid SCRAM salt")?;
        let iterations = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .ok_or(AuthError::Malformed("expected SCRAM iteration attribute"))?;
        let iterations = parse_iterations(iterations)?;
        for ext in attrs {
            check_extension(ext)?;
        }
        if salt != self.keys.salt || iterations != self.keys.iterations {
            return Err(AuthError::StaleSecret);
        }

        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = [
            client_first_bare.as_bytes(),
            b",",
            server_first.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let stored_key = sha256(&self.keys.client_key);
        let mut proof = hmac(&stored_key, &auth_message);
        for (p, k) in proof.iter_mut().zip(self.keys.client_key) {
            *p ^= k;
        }
        self.state = ClientState::AwaitingServerFinal {
            server_signature: hmac(&self.keys.server_key, &auth_message),
        };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Handles the server-final-message (the data of `AuthenticationSASLFinal`): the server
    /// must prove that it knows the verifier too.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), AuthError> {
        let ClientState::AwaitingServerFinal { server_signature } =
            std::mem::replace(&mut self.state, ClientState::Finished)
        else {
            return Err(AuthError::Malformed(
                "unexpected SCRAM server-final-message",
            ));
        };
        let s = message_str(msg)?;
        if s.starts_with("e=") {
            return Err(AuthError::WrongPassword);
        }
        let v = s
            .split(',')
            .next()
            .and_then(|a| a.strip_prefix("v="))
            .ok_or(AuthError::Malformed("expected SCRAM server signature"))?;
        let v = decode_key(v, "invalid SCRAM server signature")?;
        if !constant_time_eq(&v, &server_signature) {
            return Err(AuthError::Malformed("SCRAM server signature mismatch"));
        }
        Ok(())
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ClientState::AwaitingServerFirst { .. } => "awaiting server-first-message",
            ClientState::AwaitingServerFinal { .. } => "awaiting server-final-message",
            ClientState::Finished => "finished",
        };
        f.debug_struct("ScramClient")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{ScramServer, Secret};

    /// A client logs in to a "server" (our ScramServer with the verifier) with a password;
    /// the keys recovered from that exchange then log in to the same verifier again.
    fn keys_for(verifier: &Secret, password: &str) -> ScramKeys {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let mut server = ScramServer::new(verifier).unwrap();
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        let last = server.client_final(client.message()).unwrap();
        client.finish(&last).unwrap();
        server.pass_through_keys().expect("keys after success")
    }

    fn exchange(verifier: &Secret, keys: ScramKeys) -> Result<(), AuthError> {
        let mut server = ScramServer::new(verifier).unwrap();
        let (mut client, first) = ScramClient::start(keys);
        let server_first = server.client_first(&first)?;
        let fin = client.server_first(&server_first)?;
        let server_final = server.client_final(&fin)?;
        client.server_final(&server_final)
    }

    #[test]
    fn recovered_keys_log_in_again() {
        let verifier = Secret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
        let keys = keys_for(&verifier, "pw");
        for _ in 0..3 {
            exchange(&verifier, keys.clone()).unwrap();
        }
    }

    #[test]
    fn keys_do_not_answer_another_verifier() {
        let old = Secret::parse(&postgres_protocol::password::scram_sha_256(b"old")).unwrap();
        let new = Secret::parse(&postgres_protocol::password::scram_sha_256(b"new")).unwrap();
        let keys = keys_for(&old, "old");
        assert_eq!(exchange(&new, keys), Err(AuthError::StaleSecret));
    }

    #[test]
    fn wrong_password_recovers_no_keys() {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let verifier = Secret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
        let mut server = ScramServer::new(&verifier).unwrap();
        let mut client = ScramSha256::new(b"nope", ChannelBinding::unsupported());
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        assert!(server.client_final(client.message()).is_err());
        assert!(server.pass_through_keys().is_none());
        let mut mock = ScramServer::mock("nobody");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let first = mock.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        assert!(mock.client_final(client.message()).is_err());
        assert!(mock.pass_through_keys().is_none());
    }

    #[test]
    fn a_forged_server_signature_is_refused() {
        let verifier = Secret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
        let keys = keys_for(&verifier, "pw");
        let mut server = ScramServer::new(&verifier).unwrap();
        let (mut client, first) = ScramClient::start(keys);
        let server_first = server.client_first(&first).unwrap();
        let fin = client.server_first(&server_first).unwrap();
        server.client_final(&fin).unwrap();
        let forged = format!("v={}", BASE64.encode([7u8; 32]));
        assert!(client.server_final(forged.as_bytes()).is_err());
    }

    #[test]
    fn hostile_server_messages_are_errors() {
        let verifier = Secret::parse(&postgres_protocol::password::scram_sha_256(b"pw")).unwrap();
        let keys = keys_for(&verifier, "pw");
        for bad in [
            &b""[..],
            b"r=",
            b"r=abc,s=c2FsdA==,i=4096",
            b"r=NONCEx,s=***,i=4096",
            b"r=NONCEx,s=c2FsdA==,i=0",
            b"r=NONCEx,s=c2FsdA==",
            b"m=ext,r=NONCEx,s=c2FsdA==,i=4096",
            b"r=NONCEx,s=c2FsdA==,i=4096,\0",
        ] {
            let (mut client, _) = ScramClient::start_with_nonce(keys.clone(), "NONCE");
            assert!(client.server_first(bad).is_err(), "{bad:?}");
            // A finished exchange refuses further messages.
            assert!(client.server_final(b"v=").is_err());
        }
        let (mut client, _) = ScramClient::start_with_nonce(keys, "NONCE");
        assert!(client.server_final(b"v=").is_err());
        assert!(format!("{client:?}").contains("finished"));
    }
}
