//! `floor`: the least a transaction pooler built on tokio does per login and per transaction.
//!
//! A measuring stick for `bench/instructions` and `bench/run` (their target `floor`), not a
//! pooler. It answers the question issue 21's login bar raises: how much of tidepool's CPU per
//! login is the runtime's, which any pooler on tokio pays, and how much is tidepool's own?
//!
//! What it does, the way tidepool does it (one current-thread runtime; a task per client; tokio's
//! `TcpStream`s with `TCP_NODELAY`; a semaphore and a list for the pool; a stack of spare 16 KiB
//! buffers): accept, spawn the client's task, answer an SSLRequest with `N`, read the startup
//! packet, answer it with a greeting built once from the first server login's (AuthenticationOk,
//! the server's ParameterStatus messages, a BackendKeyData, ReadyForQuery); then per round trip
//! borrow a server connection, write the client's complete messages to it, relay the server's
//! answer until its ReadyForQuery, and give the server back when that says idle.
//!
//! What it leaves out, all of which a real pooler needs: authentication (every client is let in,
//! under the server login's user and database), TLS, timeouts, metrics, logging, the drain,
//! session-state tracking, prepared statements, cancel requests, error replies to bad input
//! (it closes the connection instead), and an explicit close of its server connections (SIGINT
//! or SIGTERM ends the process at once). A client that leaves in a transaction takes its server
//! connection with it, and the pool is one smaller from then on.
//!
//! Usage: `floor LISTEN_ADDR SERVER_ADDR USER DATABASE POOL_SIZE`, for example
//! `floor 127.0.0.1:6433 127.0.0.1:5432 postgres bench 10`. The server must let USER in
//! without a password (the benchmarks' throwaway clusters use trust).

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Mutex;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Startup-packet codes (PostgreSQL protocol, "Message Formats": SSLRequest, GSSENCRequest,
/// CancelRequest).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// A startup packet longer than this is refused (tidepool's own limit is the same order).
const MAX_STARTUP: usize = 10_000;
const BUFFER: usize = 16 * 1024;

struct Pool {
    idle: Mutex<Vec<TcpStream>>,
    free: Semaphore,
    spare: Mutex<Vec<BytesMut>>,
}

impl Pool {
    fn buffer(&self) -> BytesMut {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        spare.unwrap_or_else(|| BytesMut::with_capacity(BUFFER))
    }

    fn give_back(&self, mut buf: BytesMut) {
        buf.clear();
        self.spare
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(buf);
    }

    async fn checkout(&self) -> io::Result<TcpStream> {
        let permit = self.free.acquire().await.map_err(io::Error::other)?;
        permit.forget();
        let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        conn.ok_or_else(|| io::Error::other("a permit without an idle server"))
    }

    fn checkin(&self, conn: TcpStream) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        self.free.add_permits(1);
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (|| -> Result<(SocketAddr, SocketAddr, String, String, usize), Error> {
        if args.len() != 6 {
            return Err("usage: floor LISTEN_ADDR SERVER_ADDR USER DATABASE POOL_SIZE".into());
        }
        Ok((
            args[1].parse()?,
            args[2].parse()?,
            args[3].clone(),
            args[4].clone(),
            args[5].parse()?,
        ))
    })();
    let (listen, server, user, database, size) = match parsed {
        Ok(p) if p.4 > 0 => p,
        Ok(_) => {
            eprintln!("floor: POOL_SIZE must be at least 1");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("floor: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("floor: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(listen, server, &user, &database, size)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(
    listen: SocketAddr,
    server: SocketAddr,
    user: &str,
    database: &str,
    size: usize,
) -> Result<(), Error> {
    let mut greeting = BytesMut::new();
    greeting.put_u8(b'R');
    greeting.put_i32(8);
    greeting.put_i32(0);
    let mut conns = Vec::with_capacity(size);
    for i in 0..size {
        let (conn, params) = server_login(server, user, database).await?;
        if i == 0 {
            greeting.extend_from_slice(&params);
        }
        conns.push(conn);
    }
    greeting.put_u8(b'K');
    greeting.put_i32(12);
    greeting.put_i32(1);
    greeting.put_i32(1);
    greeting.put_u8(b'Z');
    greeting.put_i32(5);
    greeting.put_u8(b'I');
    // Both live as long as the process; leaking them spares an Arc per client.
    let greeting: &'static [u8] = Vec::leak(greeting.to_vec());
    let pool: &'static Pool = Box::leak(Box::new(Pool {
        idle: Mutex::new(conns),
        free: Semaphore::new(size),
        spare: Mutex::new(Vec::new()),
    }));
    // SIGINT or SIGTERM: exit at once (through `exit`, so that valgrind's tools write their
    // files). A script's background job starts with SIGINT ignored; this undoes that too. (On
    // the runtime, as tidepool's own signals are: a thread for them would take glibc's malloc
    // off its single-thread path.)
    let mut signals = signal_hook_tokio::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])?;
    tokio::spawn(async move {
        if futures_util::StreamExt::next(&mut signals).await.is_some() {
            std::process::exit(0);
        }
    });
    let listener = TcpListener::bind(listen).await?;
    eprintln!("floor: listening on {listen}, {size} server connections to {server}");
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(async move {
                    let _ = client(sock, pool, greeting).await;
                });
            }
            Err(e) => {
                // EMFILE and such: say so, wait a little, go on (as tidepool's accept loop does).
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Logs in to the server; returns the connection and its ParameterStatus messages, as sent.
async fn server_login(
    addr: SocketAddr,
    user: &str,
    database: &str,
) -> Result<(TcpStream, Vec<u8>), Error> {
    let mut conn = TcpStream::connect(addr).await?;
    conn.set_nodelay(true)?;
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", user), ("database", database)],
        &mut buf,
    )?;
    conn.write_all(&buf).await?;
    buf.clear();
    let mut params = Vec::new();
    loop {
        while message_len(&buf).is_none_or(|n| buf.len() < n) {
            if conn.read_buf(&mut buf).await? == 0 {
                return Err("the server closed the connection during login".into());
            }
        }
        let len = message_len(&buf).unwrap_or(0);
        let msg = buf.split_to(len);
        match msg[0] {
            b'R' if msg[5..] != [0, 0, 0, 0] => {
                return Err("the server asks for a password; floor needs trust".into());
            }
            b'S' => params.extend_from_slice(&msg),
            b'E' => return Err(format!("the server refused the login: {:?}", &msg[5..]).into()),
            b'Z' => return Ok((conn, params)),
            _ => {}
        }
    }
}

/// The length of the regular message at the start of `buf` (its tag, and a length that counts
/// itself), once its header is there.
fn message_len(buf: &[u8]) -> Option<usize> {
    let header: [u8; 4] = buf.get(1..5)?.try_into().ok()?;
    Some(1 + i32::from_be_bytes(header).max(4) as usize)
}

/// Complete messages at the start of `buf`: their length, and the tag of the last one.
fn complete(buf: &[u8]) -> (usize, u8) {
    let (mut at, mut last) = (0, 0);
    while let Some(n) = message_len(&buf[at..]) {
        if buf.len() - at < n {
            break;
        }
        last = buf[at];
        at += n;
    }
    (at, last)
}

async fn client(mut sock: TcpStream, pool: &'static Pool, greeting: &[u8]) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let mut buf = pool.buffer();
    let mut reply = pool.buffer();
    let mut server = None;
    let r = session(&mut sock, pool, greeting, &mut buf, &mut reply, &mut server).await;
    if let Some(conn) = server {
        // Left in a transaction (or failed): the server connection goes with the client.
        drop(conn);
    }
    pool.give_back(buf);
    pool.give_back(reply);
    r
}

async fn session(
    sock: &mut TcpStream,
    pool: &Pool,
    greeting: &[u8],
    buf: &mut BytesMut,
    reply: &mut BytesMut,
    server: &mut Option<TcpStream>,
) -> io::Result<()> {
    // The startup packet: Int32 length (counting itself), Int32 code.
    loop {
        while buf.len() < 8 || buf.len() < startup_len(buf) {
            if sock.read_buf(buf).await? == 0 {
                return Ok(());
            }
        }
        let len = startup_len(buf);
        if !(8..=MAX_STARTUP).contains(&len) {
            return Ok(());
        }
        let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        buf.advance(len);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => sock.write_all(b"N").await?,
            CANCEL_REQUEST => return Ok(()),
            _ => {
                sock.write_all(greeting).await?;
                break;
            }
        }
    }
    loop {
        let (mut n, mut last) = complete(buf);
        if n == 0 {
            if sock.read_buf(buf).await? == 0 {
                return Ok(());
            }
            continue;
        }
        // Terminate: forward nothing after it.
        if let Some(x) = first_terminate(&buf[..n]) {
            if x == 0 {
                return Ok(());
            }
            n = x;
            last = 0;
        }
        if server.is_none() {
            *server = Some(pool.checkout().await?);
        }
        let conn = server
            .as_mut()
            .ok_or_else(|| io::Error::other("no server"))?;
        conn.write_all(&buf[..n]).await?;
        buf.advance(n);
        // Query and Sync are answered with ReadyForQuery: relay up to it.
        if last == b'Q' || last == b'S' {
            let status = relay(conn, sock, reply).await?;
            if status == b'I' {
                if let Some(conn) = server.take() {
                    pool.checkin(conn);
                }
            }
        }
    }
}

fn startup_len(buf: &[u8]) -> usize {
    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// The offset of the first Terminate among the complete messages `buf` holds.
fn first_terminate(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < buf.len() {
        if buf[at] == b'X' {
            return Some(at);
        }
        at += message_len(&buf[at..])?;
    }
    None
}

/// Relays the server's answer to the client, up to and with its ReadyForQuery; returns that
/// message's transaction status.
async fn relay(conn: &mut TcpStream, sock: &mut TcpStream, reply: &mut BytesMut) -> io::Result<u8> {
    loop {
        if conn.read_buf(reply).await? == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let (n, last) = complete(reply);
        if n == 0 {
            continue;
        }
        let status = (last == b'Z').then(|| reply[n - 1]);
        sock.write_all(&reply[..n]).await?;
        reply.advance(n);
        if let Some(status) = status {
            return Ok(status);
        }
    }
}
