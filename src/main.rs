//! The `tidepool` binary: command line (DESIGN.md section 2), logging, signals, exit codes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tidepool::config::{Config, ConfigSource, LogFormat};
use tidepool::server::{ServeError, Server};

const EX_USAGE: u8 = 64;
const EX_SOFTWARE: u8 = 70;

/// tidepool: a PostgreSQL connection pooler for the sidecar.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Config file (default: $TIDEPOOL_CONFIG, else /etc/tidepool/tidepool.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Run without a config file: one pool in front of postgres://USER:PASS@HOST:PORT/DB;
    /// clients log in as USER with PASS (SCRAM-SHA-256).
    #[arg(long, value_name = "URL", conflicts_with = "config")]
    upstream: Option<String>,
    /// Client-facing address (overrides listen.addr).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// HTTP admin address (overrides admin.addr).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file and print the effective settings (secrets left out).
    Check {
        /// Config file (default: $TIDEPOOL_CONFIG, else /etc/tidepool/tidepool.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// GET the readiness URL; exit 0 if ready (for Docker HEALTHCHECK without curl).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9930/readyz")]
        url: String,
    },
}

/// `--config`, else `$TIDEPOOL_CONFIG`, else the default path. (Read by hand rather than with
/// clap's `env`, so that the variable does not conflict with `--upstream`.)
fn default_config_path(p: Option<PathBuf>) -> PathBuf {
    p.or_else(|| std::env::var_os("TIDEPOOL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/tidepool/tidepool.toml"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => EX_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Some(Command::Check { config }) => check(default_config_path(config)),
        Some(Command::Healthcheck { url }) => healthcheck(&url),
        None => daemon(cli),
    }
}

fn check(path: PathBuf) -> ExitCode {
    match Config::load(&path).and_then(|c| tidepool::state::Runtime::new(c).map(|r| r.config)) {
        Ok(c) => {
            println!("# {}: OK", path.display());
            print!("{}", c.effective_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tidepool: {e}");
            ExitCode::from(EX_USAGE)
        }
    }
}

/// A minimal HTTP/1.0 GET: enough for a health check, no HTTP client dependency.
fn healthcheck(url: &str) -> ExitCode {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("tidepool healthcheck: only http:// URLs are supported");
        return ExitCode::from(EX_USAGE);
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let timeout = std::time::Duration::from_secs(3);
    let addrs = match std::net::ToSocketAddrs::to_socket_addrs(hostport) {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("tidepool healthcheck: {hostport}: {e}");
            return ExitCode::from(1);
        }
    };
    let Some(stream) = addrs
        .iter()
        .find_map(|a| std::net::TcpStream::connect_timeout(a, timeout).ok())
    else {
        eprintln!("tidepool healthcheck: cannot connect to {hostport}");
        return ExitCode::from(1);
    };
    let mut stream = stream;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    let mut resp = String::new();
    if stream.write_all(req.as_bytes()).is_err() || stream.read_to_string(&mut resp).is_err() {
        eprintln!("tidepool healthcheck: request failed");
        return ExitCode::from(1);
    }
    let status_line = resp.lines().next().unwrap_or("");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    println!("{status_line} {body}");
    if status_line.split_whitespace().nth(1) == Some("200") {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn daemon(cli: Cli) -> ExitCode {
    let (config, source) = match &cli.upstream {
        Some(url) => (
            Config::from_upstream(url),
            ConfigSource::Upstream(url.clone()),
        ),
        None => {
            let path = default_config_path(cli.config.clone());
            (Config::load(&path), ConfigSource::File(path))
        }
    };
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidepool: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if let Some(a) = cli.listen {
        config.listen.addr = a;
    }
    if let Some(a) = cli.admin_listen {
        config.admin.addr = a;
    }
    init_logging(config.log.format);
    let workers = config.runtime.resolved_workers();
    // One worker: tokio's current-thread scheduler. It never wakes a second thread to steal
    // work, which on shared cores is where the multi-thread scheduler's extra context switches
    // and CPU go (bench/RESULTS.md, "Worker threads").
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidepool: cannot start the runtime: {e}");
            return ExitCode::from(EX_SOFTWARE);
        }
    };
    let code = runtime.block_on(async move {
        let server = match Server::bind(config, Some(source), true).await {
            Ok(s) => s,
            Err(ServeError::Config(e)) => {
                eprintln!("tidepool: {e}");
                return EX_USAGE;
            }
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("tidepool: {e}");
                return EX_SOFTWARE;
            }
        };
        tracing::info!(
            listen = %server.local_addr(),
            unix_socket = ?server.unix_socket_path(),
            admin = ?server.admin_addr(),
            version = env!("CARGO_PKG_VERSION"),
            workers,
            "tidepool starting"
        );
        let shared = server.shared.clone();
        shared.set_addr_overrides(cli.listen, cli.admin_listen);
        let reload_shared = shared.clone();
        let signals = tokio::spawn(tidepool::shutdown::signals::listen(
            shared.shutdown.clone(),
            move || {
                if let Err(e) = reload_shared.reload() {
                    tracing::error!("reload rejected, keeping the old configuration: {e}");
                }
            },
        ));
        let report = server.run().await;
        signals.abort();
        let code = report.exit_code();
        tracing::info!(
            report = %serde_json::to_string(&report).unwrap_or_default(),
            duration_ms = report.duration_ms,
            clients_at_start = report.clients_at_start,
            clients_left = report.clients_left,
            clients_closed_at_boundary = report.clients_closed_at_boundary,
            clients_forced = report.clients_forced,
            servers_closed_clean = report.servers_closed_clean,
            servers_closed_hard = report.servers_closed_hard,
            leaked = report.leaked,
            exit_code = code,
            "drain report"
        );
        drop(shared);
        code as u8
    });
    // Leftover tasks (none in a clean drain) are dropped here, after the report.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    ExitCode::from(code)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
