//! The console's SHOW commands, with the columns of PgBouncer 1.25 in its order (src/admin.c
//! and src/stats.c at tag `pgbouncer_1_25_2`) and its units: times in STATS in microseconds,
//! `maxwait` in seconds plus `maxwait_us`. Where tidepool has no such concept a column still
//! appears, with the value PgBouncer gives in the equivalent case (0, an empty string or NULL).
//! Columns of tidepool's own come last.
//!
//! The console's own database, `pgbouncer`, has its rows as in PgBouncer (pool mode
//! `statement`, force_user `pgbouncer`), so the lists are never empty (pgbouncer_exporter
//! takes an empty SHOW STATS as a failed scrape).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use super::{CmdError, CmdResult, Session, PGBOUNCER_VERSION};
use crate::backend::ServerAddr;
use crate::cancel::ClientShared;
use crate::pool::{Pool, PoolStats, ServerRowState};
use crate::protocol;
use crate::protocol::oid::{INT4, INT8, NUMERIC, TEXT};
use crate::state::Shared;

/// `SHOW name` for these answers the console's fixed value, as PgBouncer's `fake_show`
/// (drivers ask for some of them).
pub(super) const FAKE_PARAMS: [(&str, &str); 5] = [
    ("client_encoding", "UTF-8"),
    ("default_transaction_isolation", "read committed"),
    ("standard_conforming_strings", "on"),
    ("datestyle", "ISO"),
    ("timezone", "GMT"),
];

/// Columns: name and type OID. PgBouncer sends its timestamps ('T') as text.
type Cols = &'static [(&'static str, u32)];

const POOLS: Cols = &[
    ("database", TEXT),
    ("user", TEXT),
    ("cl_active", INT4),
    ("cl_waiting", INT4),
    ("cl_active_cancel_req", INT4),
    ("cl_waiting_cancel_req", INT4),
    ("sv_active", INT4),
    ("sv_active_cancel", INT4),
    ("sv_being_canceled", INT4),
    ("sv_idle", INT4),
    ("sv_used", INT4),
    ("sv_tested", INT4),
    ("sv_login", INT4),
    ("maxwait", INT4),
    ("maxwait_us", INT4),
    ("pool_mode", TEXT),
    ("load_balance_hosts", TEXT),
    // tidepool's own: 1 while PAUSE (or KILL) holds the pool.
    ("paused", INT4),
];

const SOCKETS: Cols = &[
    ("type", TEXT),
    ("user", TEXT),
    ("database", TEXT),
    ("replication", TEXT),
    ("state", TEXT),
    ("addr", TEXT),
    ("port", INT4),
    ("local_addr", TEXT),
    ("local_port", INT4),
    ("connect_time", TEXT),
    ("request_time", TEXT),
    ("wait", INT4),
    ("wait_us", INT4),
    ("close_needed", INT4),
    ("ptr", TEXT),
    ("link", TEXT),
    ("remote_pid", INT4),
    ("tls", TEXT),
    ("application_name", TEXT),
    ("prepared_statements", INT4),
    ("id", INT8),
];

const DATABASES: Cols = &[
    ("name", TEXT),
    ("host", TEXT),
    ("port", INT4),
    ("database", TEXT),
    ("force_user", TEXT),
    ("pool_size", INT4),
    ("min_pool_size", INT4),
    ("reserve_pool_size", INT4),
    ("server_lifetime", INT4),
    ("pool_mode", TEXT),
    ("load_balance_hosts", TEXT),
    ("max_connections", INT4),
    ("current_connections", INT4),
    ("max_client_connections", INT4),
    ("current_client_connections", INT4),
    ("paused", INT4),
    ("disabled", INT4),
];

const USERS: Cols = &[
    ("name", TEXT),
    ("pool_size", TEXT),
    ("reserve_pool_size", TEXT),
    ("pool_mode", TEXT),
    ("max_user_connections", INT4),
    ("current_connections", INT4),
    ("max_user_client_connections", INT4),
    ("current_client_connections", INT4),
];

const STATS_NAMES: [&str; 11] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "received",
    "sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
];

/// SHOW STATS: `database`, then `total_*` and `avg_*` of each counter (stats.c,
/// admin_database_stats; note `total_received`/`avg_recv`).
fn stats_cols() -> Vec<(String, u32)> {
    let mut v = vec![("database".to_string(), TEXT)];
    for n in STATS_NAMES {
        v.push((format!("total_{n}"), NUMERIC));
    }
    for n in STATS_NAMES {
        let n = if n == "received" { "recv" } else { n };
        v.push((format!("avg_{n}"), NUMERIC));
    }
    v
}

/// SHOW STATS_TOTALS and STATS_AVERAGES (the latter's last three are `avg_*`).
fn stats_short_cols(averages: bool) -> Vec<(String, u32)> {
    let mut v = vec![("database".to_string(), TEXT)];
    for n in STATS_NAMES {
        let n = match n {
            "received" => "bytes_received".to_string(),
            "sent" => "bytes_sent".to_string(),
            "client_parse_count" | "server_parse_count" | "bind_count" if averages => {
                format!("avg_{n}")
            }
            n => n.to_string(),
        };
        v.push((n, NUMERIC));
    }
    v
}

fn stats_values(s: &PoolStats) -> [u64; 11] {
    [
        s.server_assignment_count,
        s.xact_count,
        s.query_count,
        s.bytes_received,
        s.bytes_sent,
        s.xact_time,
        s.query_time,
        s.wait_time,
        s.client_parse_count,
        s.server_parse_count,
        s.bind_count,
    ]
}

/// A result set being written.
pub(super) struct Rows<'a> {
    out: &'a mut BytesMut,
}

impl<'a> Rows<'a> {
    pub(super) fn new<S: AsRef<str>>(out: &'a mut BytesMut, cols: &[(S, u32)]) -> Rows<'a> {
        let cols: Vec<(&str, u32)> = cols.iter().map(|(n, t)| (n.as_ref(), *t)).collect();
        protocol::row_description(out, &cols);
        Rows { out }
    }

    pub(super) fn row(&mut self, values: &[Option<String>]) {
        protocol::data_row(self.out, values);
    }

    pub(super) fn done(self) {
        protocol::command_complete(self.out, "SHOW");
    }
}

fn v(x: impl ToString) -> Option<String> {
    Some(x.to_string())
}

/// PgBouncer's timestamp text (`format_time_s`: local time and zone name); here in UTC.
pub(super) fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What every SHOW needs: the pools with their names, and the clients of each.
struct Snapshot {
    pools: Vec<(String, String, Pool)>,
    clients: Vec<Arc<ClientShared>>,
    /// Pool (by address) → indexes into `clients`.
    by_pool: HashMap<usize, Vec<usize>>,
    /// Console sessions (indexes into `clients`).
    console: Vec<usize>,
    /// Time since the process started (the clients' wait clock).
    now: Duration,
}

fn pool_key(p: &Pool) -> usize {
    Arc::as_ptr(&p.inner) as usize
}

impl Snapshot {
    fn take(shared: &Shared) -> Snapshot {
        let pools = shared.pool_entries();
        let clients = shared.cancels.clients();
        let mut by_pool: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut console = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            match &c.info.pool {
                Some(p) => by_pool.entry(pool_key(p)).or_default().push(i),
                None => console.push(i),
            }
        }
        Snapshot {
            pools,
            clients,
            by_pool,
            console,
            now: shared.started.elapsed(),
        }
    }

    fn clients_of(&self, p: &Pool) -> impl Iterator<Item = &Arc<ClientShared>> {
        self.by_pool
            .get(&pool_key(p))
            .into_iter()
            .flatten()
            .map(|&i| &self.clients[i])
    }

    /// (database, user) of a client.
    fn names_of<'s>(&'s self, c: &'s ClientShared) -> (&'s str, &'s str) {
        if let Some(p) = &c.info.pool {
            if let Some((d, u, _)) = self
                .pools
                .iter()
                .find(|(_, _, q)| pool_key(q) == pool_key(p))
            {
                return (d, u);
            }
        }
        match &c.info.console {
            Some(b) => (&b.1, &b.0),
            None => ("(nodb)", "(nouser)"),
        }
    }
}

pub(super) fn show(s: &mut Session, what: &str, out: &mut BytesMut) -> CmdResult {
    if let Some((name, value)) = FAKE_PARAMS
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(what))
    {
        let mut rows = Rows::new(out, &[(*name, TEXT)]);
        rows.row(&[v(value)]);
        rows.done();
        return Ok(());
    }
    let shared = s.shared.clone();
    match what.to_ascii_lowercase().as_str() {
        "pools" => pools(&shared, out),
        "clients" => sockets(&shared, out, false),
        "servers" => sockets(&shared, out, true),
        "stats" => stats(&shared, out, StatsKind::Full),
        "stats_totals" => stats(&shared, out, StatsKind::Totals),
        "stats_averages" => stats(&shared, out, StatsKind::Averages),
        "totals" => stats(&shared, out, StatsKind::Summary),
        "databases" => databases(&shared, out),
        "users" => users(&shared, out),
        "config" => super::commands::config(&shared, out),
        "lists" => lists(&shared, out),
        "version" => {
            let mut rows = Rows::new(out, &[("version", TEXT)]);
            rows.row(&[v(format!(
                "tidepool {} (PgBouncer {PGBOUNCER_VERSION} console)",
                env!("CARGO_PKG_VERSION")
            ))]);
            rows.done();
        }
        "state" => {
            let paused = shared.pauses.all();
            let mut rows = Rows::new(out, &[("key", TEXT), ("value", TEXT)]);
            let yes = |b: bool| v(if b { "yes" } else { "no" });
            rows.row(&[v("active"), yes(!paused)]);
            rows.row(&[v("paused"), yes(paused)]);
            rows.row(&[v("suspended"), yes(false)]);
            rows.done();
        }
        "help" => {
            protocol::notice_response(out, "00000", HELP);
            protocol::command_complete(out, "SHOW");
        }
        "fds" | "sockets" | "active_sockets" | "mem" | "dns_hosts" | "dns_zones" | "peers"
        | "peer_pools" => {
            return Err(CmdError::new(
                "0A000",
                format!("SHOW {what} is not supported by tidepool's console"),
            ))
        }
        _ => return Err(CmdError::syntax(&s.query)),
    }
    Ok(())
}

const HELP: &str = "Console usage:
\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION|LISTS|STATE
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS
\tPAUSE [<db>]
\tRESUME [<db>]
\tRECONNECT [<db>]
\tKILL [<db>]
\tKILL_CLIENT <client_id>
\tWAIT_CLOSE [<db>]
\tRELOAD
\tSHUTDOWN
\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS";

fn pools(shared: &Shared, out: &mut BytesMut) {
    let snap = Snapshot::take(shared);
    let mut rows = Rows::new(out, POOLS);
    let console = snap.console.len();
    let mut lines: Vec<(String, String, Vec<Option<String>>)> = Vec::new();
    lines.push((
        "pgbouncer".into(),
        "pgbouncer".into(),
        vec![
            v("pgbouncer"),
            v("pgbouncer"),
            v(console),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v(0),
            v("statement"),
            None,
            v(0),
        ],
    ));
    for (db, user, pool) in &snap.pools {
        let st = pool.status();
        let mut active = 0;
        let mut waiting = 0;
        let mut maxwait = Duration::ZERO;
        for c in snap.clients_of(pool) {
            match c.waited(snap.now) {
                Some(w) => {
                    waiting += 1;
                    maxwait = maxwait.max(w);
                }
                None => active += 1,
            }
        }
        let used = pool.inner.metrics.closing.get().max(0);
        lines.push((
            db.clone(),
            user.clone(),
            vec![
                v(db),
                v(user),
                v(active),
                v(waiting),
                v(0),
                v(0),
                v(st.active),
                v(0),
                v(0),
                v(st.idle),
                v(used),
                v(0),
                v(pool.connecting()),
                v(maxwait.as_secs()),
                v(maxwait.subsec_micros()),
                v(st.mode),
                None,
                v(u8::from(st.paused)),
            ],
        ));
    }
    lines.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    for (_, _, l) in lines {
        rows.row(&l);
    }
    rows.done();
}

fn ptr(id: u64) -> String {
    format!("{id:#x}")
}

/// SHOW CLIENTS (`servers` false) or SHOW SERVERS.
fn sockets(shared: &Shared, out: &mut BytesMut, servers: bool) {
    let snap = Snapshot::take(shared);
    let rt = shared.runtime();
    let listen = rt.config.listen.addr;
    let mut rows = Rows::new(out, SOCKETS);
    // Which client holds which server: the cancel registry knows each client's server.
    let mut holder: HashMap<(ServerAddr, i32), u64> = HashMap::new();
    for c in &snap.clients {
        if let Some((addr, key)) = c.held() {
            holder.insert((addr, key.pid), c.info.id);
        }
    }
    if !servers {
        let mut server_of: HashMap<(ServerAddr, i32), u64> = HashMap::new();
        for (_, _, pool) in &snap.pools {
            for r in pool.server_rows() {
                server_of.insert((r.info.addr.clone(), r.info.pid), r.id);
            }
        }
        for c in &snap.clients {
            let (db, user) = snap.names_of(c);
            let held = c.held();
            let wait = c.waited(snap.now);
            let state = match (wait, &held) {
                (Some(_), _) => "waiting",
                (None, Some(_)) => "active",
                (None, None) => "idle",
            };
            let link = held
                .as_ref()
                .and_then(|(a, k)| server_of.get(&(a.clone(), k.pid)))
                .map(|id| ptr(*id))
                .unwrap_or_default();
            let wait = wait.unwrap_or_default();
            let app = c
                .info
                .params
                .as_ref()
                .and_then(|p| p.get("application_name").map(str::to_string))
                .unwrap_or_default();
            let connected = timestamp(c.info.connected);
            rows.row(&[
                v("C"),
                v(user),
                v(db),
                v("none"),
                v(state),
                v(c.info.addr.ip()),
                v(c.info.addr.port()),
                v(listen.ip()),
                v(c.info.local_port),
                v(&connected),
                v(&connected),
                v(wait.as_secs()),
                v(wait.subsec_micros()),
                v(0),
                v(ptr(c.info.id)),
                v(link),
                v(0),
                v(if c.info.tls { "TLS" } else { "" }),
                v(app),
                v(0),
                v(c.info.id),
            ]);
        }
    } else {
        for (db, _, pool) in &snap.pools {
            let login_user = pool.target().user.clone();
            for r in pool.server_rows() {
                let client = holder.get(&(r.info.addr.clone(), r.info.pid));
                let state = match (r.state, client) {
                    (ServerRowState::Idle, _) => "idle",
                    (ServerRowState::Out, Some(_)) => "active",
                    (ServerRowState::Out, None) => "used",
                };
                let connected = timestamp(r.info.connected);
                let request = r.idle_since.map(timestamp).unwrap_or(connected.clone());
                let (laddr, lport) = match r.info.local {
                    Some(a) => (v(a.ip()), v(a.port())),
                    None => (v(""), v(0)),
                };
                rows.row(&[
                    v("S"),
                    v(&login_user),
                    v(db),
                    v("none"),
                    v(state),
                    v(r.info.addr.ip_text()),
                    v(r.info.addr.port()),
                    laddr,
                    lport,
                    v(&connected),
                    v(&request),
                    v(0),
                    v(0),
                    v(u8::from(r.close_needed)),
                    v(ptr(r.id)),
                    v(client.map(|id| ptr(*id)).unwrap_or_default()),
                    v(r.info.pid),
                    v(if r.info.tls { "TLS" } else { "" }),
                    v(r.application_name.unwrap_or_default()),
                    v(r.prepared),
                    v(r.id),
                ]);
            }
        }
    }
    rows.done();
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StatsKind {
    Full,
    Totals,
    Averages,
    /// SHOW TOTALS: name/value pairs over every database.
    Summary,
}

/// SHOW STATS, STATS_TOTALS, STATS_AVERAGES, TOTALS: per database (its pools summed), with
/// the averages over PgBouncer's stats period (see `StatsWindow`).
fn stats(shared: &Shared, out: &mut BytesMut, kind: StatsKind) {
    let pools = shared.pool_entries();
    let now = Instant::now();
    let current: HashMap<String, PoolStats> = pools
        .iter()
        .map(|(_, _, p)| (p.name().to_string(), p.stats()))
        .collect();
    let mut window = shared
        .stats_window
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (since, old) = window.baseline(now, &current);
    let dur = now.saturating_duration_since(since);
    // database → (current, older)
    let mut dbs: BTreeMap<String, (PoolStats, PoolStats)> = BTreeMap::new();
    dbs.insert("pgbouncer".into(), Default::default());
    for (db, _, p) in &pools {
        let e = dbs.entry(db.clone()).or_default();
        if let Some(c) = current.get(p.name()) {
            e.0.add(c);
        }
        if let Some(o) = old.get(p.name()) {
            e.1.add(o);
        }
    }
    drop(window);
    if kind == StatsKind::Summary {
        let mut total = PoolStats::default();
        let mut older = PoolStats::default();
        for (c, o) in dbs.values() {
            total.add(c);
            older.add(o);
        }
        let avg = total.average(&older, dur);
        let names = [
            "server_assignment_count",
            "xact_count",
            "query_count",
            "client_bytes",
            "server_bytes",
            "xact_time",
            "query_time",
            "wait_time",
            "ps_client_parse_count",
            "ps_server_parse_count",
            "ps_bind_count",
        ];
        let mut rows = Rows::new(out, &[("name", TEXT), ("value", NUMERIC)]);
        for (prefix, vals) in [("total", stats_values(&total)), ("avg", stats_values(&avg))] {
            for (n, x) in names.iter().zip(vals) {
                rows.row(&[v(format!("{prefix}_{n}")), v(x)]);
            }
        }
        rows.done();
        return;
    }
    let cols = match kind {
        StatsKind::Full => stats_cols(),
        StatsKind::Totals => stats_short_cols(false),
        _ => stats_short_cols(true),
    };
    let mut rows = Rows::new(out, &cols);
    for (db, (cur, old)) in &dbs {
        let avg = cur.average(old, dur);
        let mut line = vec![v(db)];
        if kind != StatsKind::Averages {
            line.extend(stats_values(cur).map(v));
        }
        if kind != StatsKind::Totals {
            line.extend(stats_values(&avg).map(v));
        }
        rows.row(&line);
    }
    rows.done();
}

fn databases(shared: &Shared, out: &mut BytesMut) {
    let snap = Snapshot::take(shared);
    let rt = shared.runtime();
    let cfg = &rt.config;
    let mut rows = Rows::new(out, DATABASES);
    // Configured databases, and those the "*" entry serves that have pools.
    let mut names: BTreeSet<String> = cfg
        .databases
        .keys()
        .filter(|k| *k != "*")
        .cloned()
        .collect();
    names.extend(snap.pools.iter().map(|(d, _, _)| d.clone()));
    names.insert("pgbouncer".into());
    for name in names {
        if name == "pgbouncer" && !cfg.databases.contains_key("pgbouncer") {
            let console = snap.console.len();
            rows.row(&[
                v("pgbouncer"),
                None,
                v(cfg.listen.addr.port()),
                v("pgbouncer"),
                v("pgbouncer"),
                v(2),
                v(0),
                v(0),
                v(cfg.pool.server_lifetime.as_secs()),
                v("statement"),
                None,
                v(0),
                v(0),
                v(0),
                v(console),
                v(0),
                v(0),
            ]);
            continue;
        }
        let Some((entry_name, entry)) = cfg.database_entry(&name) else {
            continue;
        };
        let settings = cfg.pool_settings(entry_name);
        let pools: Vec<&Pool> = snap
            .pools
            .iter()
            .filter(|(d, _, _)| *d == name)
            .map(|(_, _, p)| p)
            .collect();
        let servers: usize = pools.iter().map(|p| p.server_count()).sum();
        let clients: usize = pools.iter().map(|p| snap.clients_of(p).count()).sum();
        let dbname = match (&entry.dbname, entry_name) {
            (Some(d), _) => d.clone(),
            (None, _) => name.clone(),
        };
        rows.row(&[
            v(&name),
            v(&entry.host),
            v(&entry.port),
            v(dbname),
            entry.user.clone(),
            v(settings.size),
            v(settings.min_idle),
            v(0),
            v(settings.server_lifetime.as_secs()),
            // PgBouncer shows a database's own pool_mode, NULL when it inherits the default.
            entry.mode.map(|m| m.as_str().to_string()),
            None,
            v(0),
            v(servers),
            v(0),
            v(clients),
            v(u8::from(shared.pauses.covers(&name))),
            v(0),
        ]);
    }
    rows.done();
}

fn users(shared: &Shared, out: &mut BytesMut) {
    let snap = Snapshot::take(shared);
    let rt = shared.runtime();
    let mut names: BTreeSet<String> = rt
        .config
        .auth
        .users
        .iter()
        .map(|u| u.name.clone())
        .collect();
    names.extend(snap.pools.iter().map(|(_, u, _)| u.clone()));
    names.insert("pgbouncer".into());
    let mut rows = Rows::new(out, USERS);
    for name in names {
        let pools: Vec<&Pool> = snap
            .pools
            .iter()
            .filter(|(_, u, _)| *u == name)
            .map(|(_, _, p)| p)
            .collect();
        let servers: usize = pools.iter().map(|p| p.server_count()).sum();
        let mut clients: usize = pools.iter().map(|p| snap.clients_of(p).count()).sum();
        clients += snap
            .console
            .iter()
            .filter(|&&i| {
                snap.clients[i]
                    .info
                    .console
                    .as_ref()
                    .is_some_and(|b| b.0 == name)
            })
            .count();
        // No per-user pool size or mode: PgBouncer's empty string and NULL.
        rows.row(&[
            v(&name),
            v(""),
            v(""),
            None,
            v(0),
            v(servers),
            v(0),
            v(clients),
        ]);
    }
    rows.done();
}

fn lists(shared: &Shared, out: &mut BytesMut) {
    let snap = Snapshot::take(shared);
    let rt = shared.runtime();
    let mut dbs: BTreeSet<&str> = rt
        .config
        .databases
        .keys()
        .filter(|k| *k != "*")
        .map(String::as_str)
        .collect();
    dbs.extend(snap.pools.iter().map(|(d, _, _)| d.as_str()));
    dbs.insert("pgbouncer");
    let mut users: BTreeSet<&str> = rt
        .config
        .auth
        .users
        .iter()
        .map(|u| u.name.as_str())
        .collect();
    users.extend(snap.pools.iter().map(|(_, u, _)| u.as_str()));
    users.insert("pgbouncer");
    let servers: usize = snap.pools.iter().map(|(_, _, p)| p.server_count()).sum();
    let logged_in = snap.clients.len();
    let login = shared.client_count().saturating_sub(logged_in);
    let mut rows = Rows::new(out, &[("list", TEXT), ("items", INT4)]);
    for (name, n) in [
        ("databases", dbs.len()),
        ("users", users.len()),
        ("peers", 0),
        ("pools", snap.pools.len() + 1),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", logged_in),
        ("login_clients", login),
        ("free_servers", 0),
        ("used_servers", servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        rows.row(&[v(name), v(n)]);
    }
    rows.done();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_226_058_606);
        assert_eq!(timestamp(t), "2008-11-07 11:50:06 UTC");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(timestamp(t), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn stats_columns_follow_pgbouncer() {
        let full: Vec<String> = stats_cols().into_iter().map(|c| c.0).collect();
        assert_eq!(full.len(), 23);
        assert_eq!(full[4], "total_received");
        assert_eq!(full[15], "avg_recv");
        let avg: Vec<String> = stats_short_cols(true).into_iter().map(|c| c.0).collect();
        assert_eq!(avg[4], "bytes_received");
        assert_eq!(avg[11], "avg_bind_count");
    }
}
