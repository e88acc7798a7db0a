//! A tiny raw-protocol client for tests that need what drivers hide (BackendKeyData, malformed
//! input, half-sent messages).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How a raw connection ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// An ErrorResponse: severity, SQLSTATE, message.
    Error(String, String, String),
    /// EOF without an error message.
    Closed,
    /// ECONNRESET and the like, without an error message.
    Reset,
    /// Nothing within the bound: a hang.
    Hang,
    /// Bytes that are not a message (e.g. a bad length).
    Garbage(String),
}

impl End {
    pub fn code(&self) -> Option<&str> {
        match self {
            End::Error(_, c, _) => Some(c),
            _ => None,
        }
    }
}

/// The `End` an I/O error means.
pub fn io_end(e: &std::io::Error) -> End {
    match e.kind() {
        ErrorKind::UnexpectedEof => End::Closed,
        ErrorKind::InvalidData => End::Garbage(e.to_string()),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => End::Hang,
        _ => End::Reset,
    }
}

/// The `End` an ErrorResponse body means: its severity (non-localized `V` if present, else
/// `S`), SQLSTATE and message.
pub fn error_end(body: &[u8]) -> End {
    let severity = body
        .split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"V").or_else(|| f.strip_prefix(b"S")))
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    let (code, msg) = error_fields(body);
    End::Error(severity, code, msg)
}

/// A logged-in raw connection.
pub struct Raw {
    pub sock: TcpStream,
    /// (pid, secret) from BackendKeyData.
    pub key: (i32, i32),
    pub params: Vec<(String, String)>,
}

pub fn startup_packet(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for (k, v) in pairs {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Read one message: (tag, body). None on EOF.
pub fn read_msg(sock: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    sock.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    sock.read_exact(&mut body).ok()?;
    Some((head[0], body))
}

pub fn query_msg(sql: &str) -> Vec<u8> {
    let mut out = vec![b'Q'];
    out.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
    out.extend_from_slice(sql.as_bytes());
    out.push(0);
    out
}

/// SQLSTATE and message of an ErrorResponse body.
pub fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut msg = String::new();
    for f in body.split(|&b| b == 0) {
        if let Some((&t, v)) = f.split_first() {
            let v = String::from_utf8_lossy(v).into_owned();
            match t {
                b'C' => code = v,
                b'M' => msg = v,
                _ => {}
            }
        }
    }
    (code, msg)
}

impl Raw {
    /// Log in with trust auth; panics on anything unexpected.
    pub fn login(port: u16, user: &str, db: &str) -> Raw {
        let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.write_all(&startup_packet(&[("user", user), ("database", db)]))
            .unwrap();
        let mut key = (0, 0);
        let mut params = Vec::new();
        loop {
            let (tag, body) = read_msg(&mut sock).expect("login reply");
            match tag {
                b'R' => assert_eq!(&body[..4], &[0, 0, 0, 0], "only trust is expected here"),
                b'S' => {
                    let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
                    params.push((
                        String::from_utf8_lossy(parts[0]).into_owned(),
                        String::from_utf8_lossy(parts[1]).into_owned(),
                    ));
                }
                b'K' => {
                    key = (
                        i32::from_be_bytes(body[0..4].try_into().unwrap()),
                        i32::from_be_bytes(body[4..8].try_into().unwrap()),
                    )
                }
                b'Z' => return Raw { sock, key, params },
                b'E' => panic!("login failed: {:?}", error_fields(&body)),
                _ => {}
            }
        }
    }

    /// Run a simple query; returns the first column of every row, or the error.
    pub fn query(&mut self, sql: &str) -> Result<Vec<String>, (String, String)> {
        self.sock.write_all(&query_msg(sql)).unwrap();
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let (tag, body) = read_msg(&mut self.sock).expect("query reply");
            match tag {
                b'D' => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    if len >= 0 {
                        rows.push(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
                    }
                }
                b'E' => err = Some(error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub fn terminate(mut self) {
        let _ = self.sock.write_all(&[b'X', 0, 0, 0, 4]);
    }
}
