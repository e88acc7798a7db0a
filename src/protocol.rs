//! Postgres wire protocol v3: startup packets, message framing for the relay, and the few
//! backend messages tidepool writes itself.
//!
//! Reference: PostgreSQL 15 documentation, chapter 55 "Frontend/Backend Protocol"
//! (55.2 Message Flow, 55.7 Message Formats). The relay parses only message headers
//! (1-byte tag + 4-byte length); bodies are inspected only for the handful of messages whose
//! content changes tidepool's state (ReadyForQuery, ParameterStatus, ...).

use bytes::{BufMut, BytesMut};

/// StartupMessage protocol version 3.0.
pub const PROTOCOL_V3: i32 = 196_608;
/// SSLRequest code (55.7).
pub const SSL_REQUEST: i32 = 80_877_103;
/// GSSENCRequest code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// CancelRequest code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Postgres's own cap on a startup packet (`MAX_STARTUP_PACKET_LENGTH` in pqcomm.h).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// A parsed first packet from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup { params: Vec<(String, String)> },
}

/// Why a packet was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid startup packet length {0}")]
    StartupLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    Version { major: i32, minor: i32 },
    #[error("invalid startup packet layout: {0}")]
    StartupLayout(&'static str),
    #[error("invalid message length {0}")]
    MessageLength(u32),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("invalid frontend message type {0}")]
    UnknownType(u8),
}

/// Parse a startup packet body (everything after the 4-byte length word).
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, ProtocolError> {
    if body.len() < 4 {
        return Err(ProtocolError::StartupLength(body.len() + 4));
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    match code {
        SSL_REQUEST if body.len() == 4 => Ok(StartupPacket::Ssl),
        GSSENC_REQUEST if body.len() == 4 => Ok(StartupPacket::GssEnc),
        CANCEL_REQUEST if body.len() == 12 => Ok(StartupPacket::Cancel {
            pid: i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
            secret: i32::from_be_bytes([body[8], body[9], body[10], body[11]]),
        }),
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(ProtocolError::StartupLayout(
            "wrong length for request code",
        )),
        PROTOCOL_V3 => {
            // libpq sends four to six parameters: one allocation, not a growing vector.
            let mut params = Vec::with_capacity(8);
            let mut rest = &body[4..];
            loop {
                let Some(nul) = memchr::memchr(0, rest) else {
                    return Err(ProtocolError::StartupLayout("missing terminator"));
                };
                if nul == 0 {
                    // The list ends with an empty name; nothing may follow it.
                    if rest.len() != 1 {
                        return Err(ProtocolError::StartupLayout("data after terminator"));
                    }
                    break;
                }
                let name = std::str::from_utf8(&rest[..nul])
                    .map_err(|_| ProtocolError::StartupLayout("parameter name is not UTF-8"))?;
                rest = &rest[nul + 1..];
                let Some(vnul) = memchr::memchr(0, rest) else {
                    return Err(ProtocolError::StartupLayout("missing value"));
                };
                let value = std::str::from_utf8(&rest[..vnul])
                    .map_err(|_| ProtocolError::StartupLayout("parameter value is not UTF-8"))?;
                rest = &rest[vnul + 1..];
                params.push((name.to_string(), value.to_string()));
                if params.len() > 64 {
                    return Err(ProtocolError::StartupLayout("too many parameters"));
                }
            }
            Ok(StartupPacket::Startup { params })
        }
        v => Err(ProtocolError::Version {
            major: v >> 16,
            minor: v & 0xffff,
        }),
    }
}

/// A message header: tag and total length including the tag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// 1 + the length word: the bytes this message occupies on the wire.
    pub total: usize,
}

/// Read a header from the front of `buf` if 5 bytes are there.
#[inline]
pub fn header(buf: &[u8], max: usize) -> Result<Option<Header>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::MessageLength(len));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(ProtocolError::TooLarge(total));
    }
    Ok(Some(Header { tag: buf[0], total }))
}

/// Frontend message tags a client may send after startup (55.7).
pub fn is_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'P'
            | b'B'
            | b'E'
            | b'D'
            | b'C'
            | b'H'
            | b'S'
            | b'F'
            | b'd'
            | b'c'
            | b'f'
            | b'X'
            | b'p'
    )
}

// ---- messages tidepool writes ----

fn begin(buf: &mut BytesMut, tag: u8) -> usize {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    at
}

fn finish(buf: &mut BytesMut, at: usize) {
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// ErrorResponse with severity, SQLSTATE and message (55.8 "Error and Notice Message Fields").
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let at = begin(buf, b'E');
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    for (field, value) in [(b'S', sev), (b'V', sev), (b'C', code), (b'M', message)] {
        buf.put_u8(field);
        put_cstr(buf, value);
    }
    buf.put_u8(0);
    finish(buf, at);
}

/// NoticeResponse with a WARNING-level message.
pub fn notice_response(buf: &mut BytesMut, code: &str, message: &str) {
    let at = begin(buf, b'N');
    for (field, value) in [
        (b'S', "WARNING"),
        (b'V', "WARNING"),
        (b'C', code),
        (b'M', message),
    ] {
        buf.put_u8(field);
        put_cstr(buf, value);
    }
    buf.put_u8(0);
    finish(buf, at);
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; Postgres never sends one, neither do we.
    for b in s.bytes() {
        buf.put_u8(if b == 0 { b'?' } else { b });
    }
    buf.put_u8(0);
}

pub fn auth_ok(buf: &mut BytesMut) {
    buf.put_u8(b'R');
    buf.put_i32(8);
    buf.put_i32(0);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    buf.put_u8(b'R');
    buf.put_i32(12);
    buf.put_i32(5);
    buf.put_slice(&salt);
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    buf.put_u8(b'R');
    buf.put_i32(8);
    buf.put_i32(3);
}

/// AuthenticationSASL listing SCRAM-SHA-256 only (no -PLUS: we do not offer channel binding).
pub fn auth_sasl(buf: &mut BytesMut) {
    let at = begin(buf, b'R');
    buf.put_i32(10);
    put_cstr(buf, "SCRAM-SHA-256");
    buf.put_u8(0);
    finish(buf, at);
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(11);
    buf.put_slice(data);
    finish(buf, at);
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    let at = begin(buf, b'R');
    buf.put_i32(12);
    buf.put_slice(data);
    finish(buf, at);
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    let at = begin(buf, b'S');
    put_cstr(buf, name);
    put_cstr(buf, value);
    finish(buf, at);
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    buf.put_u8(b'K');
    buf.put_i32(12);
    buf.put_i32(pid);
    buf.put_i32(secret);
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    buf.put_u8(b'Z');
    buf.put_i32(5);
    buf.put_u8(status);
}

/// A simple Query message.
pub fn query(buf: &mut BytesMut, sql: &str) {
    let at = begin(buf, b'Q');
    put_cstr(buf, sql);
    finish(buf, at);
}

/// Type OIDs of the result columns tidepool writes itself (the console).
pub mod oid {
    pub const INT8: u32 = 20;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const TIMESTAMP: u32 = 1114;
    pub const NUMERIC: u32 = 1700;
}

/// RowDescription ('T'): each column's name and type OID, in text format.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    let at = begin(buf, b'T');
    buf.put_i16(columns.len() as i16);
    for (name, oid) in columns {
        put_cstr(buf, name);
        buf.put_i32(0); // table OID
        buf.put_i16(0); // column number
        buf.put_u32(*oid);
        let size: i16 = match *oid {
            oid::INT8 | oid::TIMESTAMP => 8,
            oid::INT4 => 4,
            _ => -1,
        };
        buf.put_i16(size);
        buf.put_i32(-1); // type modifier
        buf.put_i16(0); // text format
    }
    finish(buf, at);
}

/// DataRow ('D'): each value as text, `None` for NULL.
pub fn data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[Option<S>]) {
    let at = begin(buf, b'D');
    buf.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(v) => {
                buf.put_i32(v.as_ref().len() as i32);
                buf.put_slice(v.as_ref().as_bytes());
            }
            None => buf.put_i32(-1),
        }
    }
    finish(buf, at);
}

/// CommandComplete ('C') with its tag (`SHOW`, `PAUSE`, ...).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    let at = begin(buf, b'C');
    put_cstr(buf, tag);
    finish(buf, at);
}

/// EmptyQueryResponse ('I'): the answer to a query string with no statement in it.
pub fn empty_query_response(buf: &mut BytesMut) {
    buf.put_u8(b'I');
    buf.put_i32(4);
}

/// Terminate ('X'): the 5 bytes that end a session politely.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Sync ('S').
pub const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];

/// CopyFail ('f') with a reason.
pub fn copy_fail(buf: &mut BytesMut, reason: &str) {
    let at = begin(buf, b'f');
    put_cstr(buf, reason);
    finish(buf, at);
}

/// A CancelRequest packet (16 bytes).
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Split a ParameterStatus body into name and value.
pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let nul = body.iter().position(|&b| b == 0)?;
    let name = std::str::from_utf8(&body[..nul]).ok()?;
    let rest = &body[nul + 1..];
    let vnul = rest.iter().position(|&b| b == 0)?;
    let value = std::str::from_utf8(&rest[..vnul]).ok()?;
    Some((name, value))
}

/// Fields of an ErrorResponse/NoticeResponse body: (SQLSTATE, message).
pub fn parse_error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some(nul) = tail.iter().position(|&b| b == 0) else {
            break;
        };
        let value = String::from_utf8_lossy(&tail[..nul]);
        match field {
            b'C' => code = value.into_owned(),
            b'M' => message = value.into_owned(),
            _ => {}
        }
        rest = &tail[nul + 1..];
    }
    (code, message)
}

/// Quote a string as a SQL literal that is correct whatever `standard_conforming_strings` is.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quote an identifier.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\"\""),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Split a startup `options` value into `name=value` settings. Accepts `-c name=value`,
/// `-cname=value` and `--name=value`, with backslash escaping spaces, as Postgres's
/// `pg_split_opts` does. Anything else is returned as an error string.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    // Split on unescaped whitespace.
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    let mut have = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    have = true;
                }
            }
            c if c.is_whitespace() => {
                if have {
                    words.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        let setting = if w == "-c" {
            i += 1;
            words
                .get(i)
                .cloned()
                .ok_or_else(|| "-c needs name=value".to_string())?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_string()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_string()
        } else {
            return Err(format!(
                "unsupported option \"{w}\": only -c name=value is supported"
            ));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(format!("option \"{setting}\" needs name=value"));
        };
        out.push((name.replace('-', "_"), value.to_string()));
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_body(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut v = PROTOCOL_V3.to_be_bytes().to_vec();
        for (k, val) in pairs {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn startup_parses() {
        let b = startup_body(&[("user", "app"), ("database", "db")]);
        assert_eq!(
            parse_startup(&b).unwrap(),
            StartupPacket::Startup {
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            }
        );
        assert_eq!(
            parse_startup(&SSL_REQUEST.to_be_bytes()).unwrap(),
            StartupPacket::Ssl
        );
    }

    #[test]
    fn startup_rejects_garbage() {
        assert!(parse_startup(&[]).is_err());
        assert!(parse_startup(&[0, 2, 0, 0]).is_err());
        let mut b = startup_body(&[("user", "app")]);
        b.pop();
        assert!(parse_startup(&b).is_err());
        let mut b = startup_body(&[("user", "app")]);
        b.push(b'x');
        assert!(parse_startup(&b).is_err());
        let mut b = CANCEL_REQUEST.to_be_bytes().to_vec();
        b.extend_from_slice(&[1, 2, 3]);
        assert!(parse_startup(&b).is_err());
    }

    #[test]
    fn headers() {
        assert_eq!(header(b"Q\0\0", 100).unwrap(), None);
        assert_eq!(
            header(b"Q\0\0\0\x09x", 100).unwrap(),
            Some(Header {
                tag: b'Q',
                total: 10
            })
        );
        assert!(header(b"Q\0\0\0\x03", 100).is_err());
        assert!(header(b"Q\0\0\x10\x00", 100).is_err());
    }

    #[test]
    fn error_response_layout() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Fatal,
            "3D000",
            "database \"x\" does not exist",
        );
        assert_eq!(b[0], b'E');
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let (code, msg) = parse_error_fields(&b[5..]);
        assert_eq!(code, "3D000");
        assert_eq!(msg, "database \"x\" does not exist");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_ident("Time\"Zone"), "\"Time\"\"Zone\"");
    }

    #[test]
    fn options() {
        assert_eq!(
            parse_options("-c statement_timeout=5s --search-path=a,b -cwork_mem=4MB").unwrap(),
            vec![
                ("statement_timeout".into(), "5s".into()),
                ("search_path".into(), "a,b".into()),
                ("work_mem".into(), "4MB".into())
            ]
        );
        assert_eq!(
            parse_options("-c application_name=a\\ b").unwrap(),
            vec![("application_name".into(), "a b".into())]
        );
        assert!(parse_options("-x").is_err());
    }
}
