//! The bodies of tidepool's fuzz targets.
//!
//! One function per target in `fuzz/fuzz_targets/`. The same file is compiled into the main
//! crate's `tests/fuzz_corpus.rs` (with `#[path]`), which replays the seed corpora and any
//! crash reproducers under plain `cargo test`: so it may use only `tidepool`, its regular
//! dependencies (`bytes`, `postgres_protocol`) and `std`.
//!
//! Each body must never panic on any input: a panic (or a failed assertion below) is a bug
//! in tidepool. The assertions check properties that must hold for every input (round trips,
//! framing that does not depend on how the bytes were split into reads).

use std::sync::OnceLock;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tidepool::auth::{ScramClient, ScramKeys, ScramServer, ScramVerifier, Secret};
use tidepool::backend::{params, Params};
use tidepool::frontend::relay::{prepared, tracking};
use tidepool::protocol::{self, Severity, StartupPacket};

/// The backend framing cap `backend::read_message` uses.
const BACKEND_MAX: usize = 64 * 1024 * 1024;

/// Target `startup_packet`: the first packet a client sends, as `frontend::read_startup`
/// handles it, and the `options` / settings it carries.
pub fn startup_packet(data: &[u8]) {
    // The bytes as a packet body (what `read_startup` passes after the length word).
    startup_body(data);
    // The bytes as a whole packet, framed like `read_startup`.
    if data.len() >= 4 {
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if (8..=protocol::MAX_STARTUP_PACKET).contains(&len) && data.len() >= len {
            startup_body(&data[4..len]);
        }
    }
    // And as an `options` value on its own.
    let _ = protocol::parse_options(&String::from_utf8_lossy(data));
}

fn startup_body(body: &[u8]) {
    let Ok(packet) = protocol::parse_startup(body) else {
        return;
    };
    match packet {
        StartupPacket::Ssl | StartupPacket::GssEnc => assert_eq!(body.len(), 4),
        StartupPacket::Cancel { .. } => assert_eq!(body.len(), 12),
        StartupPacket::Startup { params } => {
            assert!(params.len() <= 65);
            // Re-encoding gives the same parameters back.
            let mut again = protocol::PROTOCOL_V3.to_be_bytes().to_vec();
            for (k, v) in &params {
                assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
                again.extend_from_slice(k.as_bytes());
                again.push(0);
                again.extend_from_slice(v.as_bytes());
                again.push(0);
            }
            again.push(0);
            assert_eq!(again, body);
            for (k, v) in &params {
                if k == "user" || k == "options" || k == "database" {
                    let _ = protocol::parse_options(v);
                }
            }
            // What login does with them.
            if let Ok(settings) = params::desired_settings(params) {
                for (k, v) in &settings {
                    let _ = protocol::quote_ident(k);
                    let _ = protocol::quote_literal(v);
                }
            }
        }
    }
}

/// One header seen while framing: (tag, total) or the error text.
type Frame = Result<(u8, usize), String>;

/// Target `client_framing`: client messages framed by `protocol::header` the way the relay's
/// `scan_client` does, over reads of a fuzzed size with a fuzzed `max_message_size`; the
/// bodies inspected as transaction-mode tracking does (`prepared::cstr`,
/// `prepared::drops_all_statements`).
///
/// Input: byte 0 picks the limit's scale, bytes 1-2 its value, byte 3 the read size; the rest
/// is the client's byte stream.
pub fn client_framing(data: &[u8]) {
    if data.len() < 4 {
        for at in 0..6 {
            let _ = prepared::cstr(data, at);
        }
        let _ = prepared::drops_all_statements(data);
        return;
    }
    let v = u16::from_be_bytes([data[1], data[2]]) as usize;
    let max = match data[0] % 4 {
        0 => usize::MAX,
        1 => 5 + v,
        2 => 1024 + v * 16,
        _ => 64 * 1024 * 1024,
    };
    let chunk = 1 + (data[3] as usize % 97);
    let stream = &data[4..];

    // All at once, and in `chunk`-sized reads: the same frames must come out.
    let whole = frame_stream(stream, max, stream.len().max(1));
    let pieces = frame_stream(stream, max, chunk);
    assert_eq!(whole, pieces, "framing depends on how the bytes arrived");

    let _ = prepared::drops_all_statements(stream);
    for at in [0, 1, 5, 6, stream.len(), stream.len() + 1, usize::MAX] {
        if let Some((s, next)) = prepared::cstr(stream, at) {
            assert!(next <= stream.len() && !s.contains(&0));
        }
    }
}

/// Frame `stream` delivered in reads of `chunk` bytes, as `Session::scan_client` does with
/// `c_ready` / `c_rem`. Returns the headers seen and how it ended.
fn frame_stream(stream: &[u8], max: usize, chunk: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut ready = 0usize; // bytes framed (forwardable)
    let mut rem = 0usize; // bytes of the current message still to come
    let mut fed = 0usize;
    'reads: while fed < stream.len() {
        let n = chunk.min(stream.len() - fed);
        buf.extend_from_slice(&stream[fed..fed + n]);
        fed += n;
        loop {
            let avail = buf.len() - ready;
            if rem > 0 {
                let n = rem.min(avail);
                ready += n;
                rem -= n;
                if rem > 0 {
                    continue 'reads;
                }
                continue;
            }
            match protocol::header(&buf[ready..], max) {
                Ok(Some(h)) => {
                    assert!(h.total >= 5 && h.total <= max);
                    frames.push(Ok((h.tag, h.total)));
                    inspect_client_message(h, &buf[ready..ready + h.total.min(avail)]);
                    let n = h.total.min(avail);
                    ready += n;
                    rem = h.total - n;
                    assert!(ready <= buf.len());
                    if rem > 0 {
                        continue 'reads;
                    }
                }
                Ok(None) => continue 'reads,
                Err(e) => {
                    frames.push(Err(e.to_string()));
                    break 'reads;
                }
            }
        }
    }
    frames
}

/// What the relay reads from a client message (`msg` may be cut short: what has arrived).
fn inspect_client_message(h: protocol::Header, msg: &[u8]) {
    let _ = protocol::is_frontend_tag(h.tag);
    let whole = msg.len() == h.total;
    match h.tag {
        b'Q' => {
            let want = h.total.min(5 + 64);
            if msg.len() >= want {
                let _ = prepared::drops_all_statements(&msg[5..want]);
            }
        }
        b'P' if whole => {
            if let Some((name, after)) = prepared::cstr(msg, 5) {
                assert!(after <= msg.len() && after == 5 + name.len() + 1);
            }
        }
        b'B' if whole => {
            if let Some((_, after_portal)) = prepared::cstr(msg, 5) {
                if let Some((name, end)) = prepared::cstr(msg, after_portal) {
                    assert!(end <= msg.len() && end == after_portal + name.len() + 1);
                }
            }
        }
        b'D' | b'C' if whole && msg.get(5) == Some(&b'S') => {
            if let Some((_, end)) = prepared::cstr(msg, 6) {
                assert!(end <= msg.len());
            }
        }
        _ => {}
    }
}

/// The password behind the fixed plaintext secret.
const PASSWORD: &str = "pencil";

/// The verifier a `ScramServer` derives from `Secret::Plain(PASSWORD)`. `ScramServer::new`
/// with a plaintext secret runs PBKDF2 (4096 iterations) on every call; the derivation does
/// not depend on the client's input, so it is done once and each exchange starts from it.
fn plain_secret() -> &'static Secret {
    static SECRET: OnceLock<Secret> = OnceLock::new();
    SECRET.get_or_init(|| {
        // Exercise the plaintext path once (it must offer SCRAM) ...
        let plain = Secret::Plain(PASSWORD.to_owned());
        assert!(ScramServer::new(&plain).is_some());
        // ... and keep the verifier it would derive.
        Secret::Scram(ScramVerifier::generate(PASSWORD))
    })
}

/// A verifier with one PBKDF2 iteration, so that full exchanges with a real client (which
/// derives the key from the password each time) stay cheap.
fn cheap_secret() -> &'static Secret {
    static SECRET: OnceLock<Secret> = OnceLock::new();
    SECRET.get_or_init(|| Secret::Scram(ScramVerifier::from_password(PASSWORD, b"fuzz salt", 1)))
}

/// The pass-through keys of `cheap_secret`: recovered from one exchange with
/// `postgres_protocol`'s client, as tidepool recovers them from a client's login.
fn cheap_keys() -> &'static ScramKeys {
    static KEYS: OnceLock<ScramKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut server = ScramServer::new(cheap_secret()).expect("SCRAM possible");
        let mut client = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
        let first = server.client_first(client.message()).expect("client-first");
        client.update(&first).expect("server-first");
        server
            .client_final(client.message())
            .expect("proof verifies");
        server.pass_through_keys().expect("keys after success")
    })
}

/// XOR `mask` into the front of `buf`; true if that changed anything.
fn xor_into(buf: &mut [u8], mask: &[u8]) -> bool {
    let mut changed = false;
    for (b, x) in buf.iter_mut().zip(mask) {
        changed |= *x != 0;
        *b ^= x;
    }
    changed
}

/// Split `data` at the first `sep` byte (or at the end).
fn split2(data: &[u8], sep: u8) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == sep) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// The combined nonce `r=` of a server-first-message.
fn nonce_of(server_first: &[u8]) -> String {
    let s = std::str::from_utf8(server_first).expect("server-first is UTF-8");
    let r = s.split(',').next().expect("has a nonce");
    r.strip_prefix("r=").expect("starts with r=").to_owned()
}

/// Target `scram_exchange`: the server half of SCRAM-SHA-256 against hostile clients.
///
/// Byte 0 picks the mode:
/// - 0: arbitrary client-first, then arbitrary client-final (split at the first 0xff);
/// - 1: a valid client-first from `postgres_protocol`'s client, then an arbitrary final;
/// - 2: a valid client-first, then `c=biws,r=<the right nonce>` + arbitrary bytes (so the
///   fuzzer gets past the nonce check);
/// - 3: a complete exchange with `postgres_protocol`'s client, whose client-final is XORed
///   with the input: it must succeed exactly when nothing was changed;
/// - 4: calls out of order (final before first, first twice, final twice);
///
/// and the client half tidepool plays towards servers with pass-through keys
/// (`ScramClient`), against hostile servers:
/// - 5: arbitrary server-first (with the client's nonce put in front of it half the time, so
///   the fuzzer gets past the nonce check), then an arbitrary server-final;
/// - 6: a complete exchange with `ScramServer`, whose server-first and client-final are
///   XORed with the input: it must succeed exactly when nothing was changed.
pub fn scram_exchange(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let secret = plain_secret();
    match mode % 7 {
        0 => {
            let (first, fin) = split2(rest, 0xff);
            let mut server = ScramServer::new(secret).expect("SCRAM possible");
            if let Ok(server_first) = server.client_first(first) {
                let nonce = nonce_of(&server_first);
                assert!(nonce.len() > 24);
                // The client's nonce comes back in front of the server's 24 characters.
                let client_nonce = &nonce[..nonce.len() - 24];
                assert!(std::str::from_utf8(first)
                    .expect("accepted client-first is UTF-8")
                    .contains(&format!("r={client_nonce}")));
                let _ = server.client_final(fin);
            }
            // The mock exchange for unknown users parses the same input.
            let mut mock = ScramServer::mock_with_secret("nobody", b"fuzz");
            if mock.client_first(first).is_ok() {
                assert!(mock.client_final(fin).is_err(), "a mock exchange succeeded");
            }
        }
        1 => {
            let client = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
            let mut server = ScramServer::new(secret).expect("SCRAM possible");
            server
                .client_first(client.message())
                .expect("libpq-style client-first accepted");
            let _ = server.client_final(rest);
        }
        2 => {
            let client = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
            let mut server = ScramServer::new(secret).expect("SCRAM possible");
            let server_first = server
                .client_first(client.message())
                .expect("libpq-style client-first accepted");
            let mut fin = format!("c=biws,r={}", nonce_of(&server_first)).into_bytes();
            fin.extend_from_slice(rest);
            let _ = server.client_final(&fin);
        }
        3 => {
            let mut client = ScramSha256::new(PASSWORD.as_bytes(), ChannelBinding::unsupported());
            let mut server = ScramServer::new(cheap_secret()).expect("SCRAM possible");
            let server_first = server
                .client_first(client.message())
                .expect("libpq-style client-first accepted");
            client
                .update(&server_first)
                .expect("client accepts server-first");
            let mut fin = client.message().to_vec();
            let mut changed = false;
            for (b, x) in fin.iter_mut().zip(rest) {
                changed |= *x != 0;
                *b ^= x;
            }
            match server.client_final(&fin) {
                Ok(server_final) => {
                    assert!(!changed, "a modified client-final verified");
                    client
                        .finish(&server_final)
                        .expect("client verifies the server signature");
                }
                Err(e) => assert!(changed, "the genuine client-final failed: {e}"),
            }
        }
        5 => {
            let (first, fin) = split2(rest, 0xff);
            let (mut client, _) = ScramClient::start_with_nonce(cheap_keys().clone(), "fuzznonce");
            let mut server_first = Vec::new();
            if mode & 0x80 != 0 {
                server_first.extend_from_slice(b"r=fuzznonce");
            }
            server_first.extend_from_slice(first);
            if client.server_first(&server_first).is_ok() {
                let _ = client.server_final(fin);
            }
            assert!(client.server_final(fin).is_err(), "final twice");
        }
        6 => {
            let (a, b) = split2(rest, 0xff);
            let mut server = ScramServer::new(cheap_secret()).expect("SCRAM possible");
            let (mut client, first) = ScramClient::start(cheap_keys().clone());
            let mut server_first = server.client_first(&first).expect("our client-first");
            let mut changed = xor_into(&mut server_first, a);
            let Ok(mut fin) = client.server_first(&server_first) else {
                assert!(changed, "the genuine server-first was refused");
                return;
            };
            changed |= xor_into(&mut fin, b);
            match server.client_final(&fin) {
                Ok(server_final) => {
                    assert!(!changed, "a modified exchange verified");
                    client
                        .server_final(&server_final)
                        .expect("the client verifies the server's signature");
                }
                Err(e) => assert!(changed, "the genuine pass-through exchange failed: {e}"),
            }
        }
        _ => {
            let (first, fin) = split2(rest, 0xff);
            let mut server = ScramServer::new(secret).expect("SCRAM possible");
            assert!(server.client_final(fin).is_err());
            assert!(server.client_first(first).is_err(), "first after final");
            let mut server = ScramServer::new(secret).expect("SCRAM possible");
            let _ = server.client_first(first);
            assert!(server.client_first(first).is_err(), "first twice");
            let _ = server.client_final(fin);
            assert!(server.client_final(fin).is_err(), "final twice");
        }
    }
}

/// Target `server_messages`: what tidepool reads from servers. The whole input as an
/// ErrorResponse / NoticeResponse / ParameterStatus body, then as a stream of backend
/// messages framed like `backend::read_message` with each body inspected as the relay and
/// the login path do.
pub fn server_messages(data: &[u8]) {
    server_body(b'E', data);
    server_body(b'S', data);

    let mut buf = BytesMut::from(data);
    loop {
        match protocol::header(&buf, BACKEND_MAX) {
            Ok(Some(h)) if buf.len() >= h.total => {
                let mut msg = buf.split_to(h.total);
                msg.advance(5);
                assert_eq!(msg.len(), h.total - 5);
                server_body(h.tag, &msg);
            }
            Ok(_) | Err(_) => break,
        }
    }

    // What tidepool writes parses back to what it meant.
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_at(
        text.char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i),
    );
    let mut out = BytesMut::new();
    protocol::error_response(&mut out, Severity::Fatal, a, b);
    let (code, message) = protocol::parse_error_fields(&out[5..]);
    assert_eq!(
        (code.as_str(), message.as_str()),
        (&*a.replace('\0', "?"), &*b.replace('\0', "?"))
    );
    out.clear();
    protocol::parameter_status(&mut out, a, b);
    let len = u32::from_be_bytes([out[1], out[2], out[3], out[4]]) as usize;
    assert_eq!(len + 1, out.len());
    let (k, v) = protocol::parse_parameter_status(&out[5..]).expect("own ParameterStatus parses");
    assert_eq!((k, v), (&*a.replace('\0', "?"), &*b.replace('\0', "?")));
}

/// Inspect one backend message body as tidepool does.
fn server_body(tag: u8, body: &[u8]) {
    use tracking::Kind;
    for kind in [
        Kind::Parse,
        Kind::Bind,
        Kind::Describe,
        Kind::Execute,
        Kind::Close,
        Kind::Sync,
        Kind::Query,
    ] {
        let _ = kind.completed_by(tag);
    }
    match tag {
        b'E' | b'N' => {
            let (code, message) = protocol::parse_error_fields(body);
            assert!(!code.contains('\0') && !message.contains('\0'));
        }
        b'S' => {
            if let Some((k, v)) = protocol::parse_parameter_status(body) {
                assert!(!k.contains('\0') && !v.contains('\0'));
                let mut p = Params::default();
                p.set(k, v);
                p.set(k, v);
                assert_eq!(p.get(k), Some(v));
                assert_eq!(p.iter().count(), 1);
            }
        }
        b'Z' => {
            let _ = body.first().copied().unwrap_or(b'I');
        }
        b'R' | b'K' if body.len() >= 4 => {
            let _ = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        }
        _ => {}
    }
}
