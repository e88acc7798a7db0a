//! Unit tests of the SCRAM-SHA-256 exchange (`scram.rs`), against postgres-protocol's client.

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

use super::*;

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
