//! A cheap look at SQL text: which statements can leave session state behind on a server
//! connection (DESIGN.md section 8).
//!
//! Transaction mode runs every client's statements through [`scan`] before they reach the
//! server. It looks only at the first keywords of each statement (at the start of the text
//! and after each `;`) and searches the text once for the few function names that change
//! session state from inside another statement (`set_config`, the session-level advisory
//! lock functions). No parsing: a `;` or a function name inside a string literal can only make
//! tidepool more careful (an extra settings check, a needless pin), never less.
//!
//! The statements and their classes follow the Postgres 15 reference (SQL Commands:
//! SET, RESET, DISCARD, PREPARE, DEALLOCATE, LISTEN, UNLISTEN, DECLARE, CLOSE, CREATE TABLE,
//! "Advisory Lock Functions").

/// Kinds of state that pin a client to its server (bit flags).
pub mod pin {
    /// A temporary table, view or sequence (`CREATE TEMP ...`, `SELECT ... INTO TEMP`).
    pub const TEMP_TABLE: u8 = 1;
    /// An SQL-level prepared statement (`PREPARE name AS ...`).
    pub const PREPARE: u8 = 2;
    /// `LISTEN channel`.
    pub const LISTEN: u8 = 4;
    /// A session-level advisory lock (`pg_advisory_lock`, `pg_try_advisory_lock`, shared ones).
    pub const ADVISORY_LOCK: u8 = 8;
    /// A cursor that outlives its transaction (`DECLARE ... WITH HOLD`).
    pub const CURSOR: u8 = 16;
    /// Every kind.
    pub const ALL: u8 = 31;

    /// The metric label of one kind.
    pub fn name(kind: u8) -> &'static str {
        match kind {
            TEMP_TABLE => "temp_table",
            PREPARE => "prepare",
            LISTEN => "listen",
            ADVISORY_LOCK => "advisory_lock",
            CURSOR => "cursor",
            _ => "other",
        }
    }

    /// What a client is told when `session_state = "reject"` refuses the statement.
    pub fn refusal(kind: u8) -> &'static str {
        match kind {
            TEMP_TABLE => "tidepool: temporary tables are not allowed in transaction mode (pool.session_state = \"reject\"); use session mode, or ON COMMIT DROP inside one transaction",
            PREPARE => "tidepool: SQL PREPARE is not allowed in transaction mode (pool.session_state = \"reject\"); use protocol-level prepared statements",
            LISTEN => "tidepool: LISTEN is not allowed in transaction mode (pool.session_state = \"reject\"); use session mode",
            ADVISORY_LOCK => "tidepool: session-level advisory locks are not allowed in transaction mode (pool.session_state = \"reject\"); use pg_advisory_xact_lock",
            CURSOR => "tidepool: WITH HOLD cursors are not allowed in transaction mode (pool.session_state = \"reject\"); use session mode",
            _ => "tidepool: statement not allowed in transaction mode (pool.session_state = \"reject\")",
        }
    }

    /// Each kind set in `kinds`, lowest bit first.
    pub fn each(kinds: u8) -> impl Iterator<Item = u8> {
        (0..5).map(|i| 1u8 << i).filter(move |k| kinds & k != 0)
    }
}

/// What a piece of SQL text may do to the session it runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects {
    /// May change a setting at session level (`SET` without `LOCAL`, `RESET`, `set_config`,
    /// `SET ROLE`, `SET SESSION AUTHORIZATION`, `DISCARD ALL`): the session's settings must be
    /// read back after the transaction.
    pub settings: bool,
    /// State that pins the client to its server ([`pin`] flags).
    pub pins: u8,
    /// State the statement removes ([`pin`] flags): `DISCARD ALL` removes everything.
    pub unpins: u8,
    /// Drops every prepared statement of the session (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub drops_statements: bool,
    /// Schema change (`CREATE`/`ALTER`/`DROP` of a non-temporary object, `COMMENT` aside):
    /// prepared plans may refer to what changed.
    pub ddl: bool,
}

impl Effects {
    /// Nothing that concerns session isolation (the common case).
    pub fn is_none(&self) -> bool {
        *self == Effects::default()
    }

    fn add(&mut self, o: Effects) {
        self.settings |= o.settings;
        self.pins |= o.pins;
        self.unpins |= o.unpins;
        self.drops_statements |= o.drops_statements;
        self.ddl |= o.ddl;
    }
}

/// What `text` (a simple Query's string or a Parse's query, with or without its NUL) may do to
/// the session. Allocation-free.
pub fn scan(text: &[u8]) -> Effects {
    // Runs on every simple Query and Parse in transaction mode. Most texts are short and do
    // nothing to the session: one plain pass proves that for them, and costs less than the
    // full scan's three vectorised searches do on a short text.
    if text.len() <= PLAIN_MAX && plain(text) {
        return Effects::default();
    }
    scan_full(text)
}

/// Texts up to this long are tried with [`plain`] first; on longer ones the full scan's
/// vectorised searches cost less than a byte-by-byte pass.
const PLAIN_MAX: usize = 512;

/// The bytes [`plain`] stops at: the end (NUL), `;`, `_`, and `i` (for `INTO`).
static STOPS: [bool; 256] = {
    let mut t = [false; 256];
    t[0] = true;
    t[b';' as usize] = true;
    t[b'_' as usize] = true;
    t[b'i' as usize] = true;
    t[b'I' as usize] = true;
    t
};

/// The first keywords that [`statement`] may find effects after (besides `SELECT`).
const KEYWORDS: [&[u8]; 12] = [
    b"SET",
    b"RESET",
    b"DISCARD",
    b"DEALLOCATE",
    b"PREPARE",
    b"LISTEN",
    b"UNLISTEN",
    b"DECLARE",
    b"CLOSE",
    b"CREATE",
    b"ALTER",
    b"DROP",
];

/// True only if [`scan_full`] would find no effects in `text`; false when it might (then the
/// full scan decides). In one pass: one statement (nothing but blanks after a `;`), whose
/// first keyword is none of those [`statement`] looks behind (`SELECT` only without `into`
/// anywhere), no comment before it, and no `_` after `set` or `advisory` (the function names
/// [`functions`] looks for). Each test is looser than the full scan's, so a text it passes
/// has no effects there either; the unit tests compare both on many texts.
fn plain(text: &[u8]) -> bool {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    let rest = &text[start..];
    if rest.starts_with(b"--") || rest.starts_with(b"/*") {
        return false;
    }
    let n = rest
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b'.')
        .count();
    let first = &rest[..n];
    let select = first.eq_ignore_ascii_case(b"SELECT");
    if !select && KEYWORDS.iter().any(|k| first.eq_ignore_ascii_case(k)) {
        return false;
    }
    let ends_with =
        |at: usize, p: &[u8]| at >= p.len() && text[at - p.len()..at].eq_ignore_ascii_case(p);
    for (i, &b) in text.iter().enumerate() {
        if !STOPS[b as usize] {
            continue;
        }
        match b {
            // The full scan stops at a NUL too.
            0 => return true,
            b';' => {
                return text[i + 1..]
                    .iter()
                    .take_while(|&&c| c != 0)
                    .all(|c| c.is_ascii_whitespace());
            }
            b'_' => {
                if ends_with(i, b"set") || ends_with(i, b"advisory") {
                    return false;
                }
            }
            _ => {
                if select && text.len() > i + 3 && text[i + 1..i + 4].eq_ignore_ascii_case(b"nto") {
                    return false;
                }
            }
        }
    }
    true
}

/// [`scan`] without its shortcut: one vectorised pass (memchr3) finds the bytes the rest needs
/// (the end, `;` between statements, `_` in the function names), then each statement's first
/// keywords and the function names are looked at.
fn scan_full(text: &[u8]) -> Effects {
    let mut fx = Effects::default();
    let mut start = 0;
    let mut underscore = false;
    for i in memchr::memchr3_iter(0, b';', b'_', text) {
        match text[i] {
            b'_' => underscore = true,
            b';' => {
                fx.add(statement(&text[start..i]));
                start = i + 1;
            }
            _ => {
                fx.add(statement(&text[start..i]));
                let text = &text[..i];
                if underscore {
                    functions(text, &mut fx);
                }
                return fx;
            }
        }
    }
    fx.add(statement(&text[start..]));
    if underscore {
        functions(text, &mut fx);
    }
    fx
}

/// The last short text [`scan`]ned through it, with what the scan found. Drivers that send
/// the same statement unnamed at every execution (pgbench `-M extended`, psycopg 3 and JDBC
/// until their prepare thresholds, node-postgres) then have it scanned once and compared
/// after that: equal bytes, equal effects (`scan` is a function of the text alone), so the
/// answer is exact whatever the text. One slot for the process, taken with `try_lock`: a
/// text that differs, is too long or finds the slot busy is simply scanned.
pub struct Memo(std::sync::Mutex<MemoSlot>);

struct MemoSlot {
    len: usize,
    text: [u8; MEMO_MAX],
    fx: Effects,
}

/// Longest text the memo keeps (a Parse's query and parameter types).
const MEMO_MAX: usize = 256;

impl Default for Memo {
    fn default() -> Self {
        Memo(std::sync::Mutex::new(MemoSlot {
            len: 0,
            text: [0; MEMO_MAX],
            fx: scan(b""),
        }))
    }
}

impl Memo {
    /// [`scan`]`(text)`.
    pub fn scan(&self, text: &[u8]) -> Effects {
        if text.len() > MEMO_MAX {
            return scan(text);
        }
        let Ok(mut slot) = self.0.try_lock() else {
            return scan(text);
        };
        if slot.len == text.len() && slot.text[..text.len()] == *text {
            return slot.fx;
        }
        let fx = scan(text);
        slot.text[..text.len()].copy_from_slice(text);
        slot.len = text.len();
        slot.fx = fx;
        fx
    }
}

/// The words of one statement, comments and white space skipped.
struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Words<'a> {
    fn skip_blank(&mut self) {
        loop {
            let r = self.rest;
            let n = r.iter().take_while(|b| b.is_ascii_whitespace()).count();
            self.rest = &r[n..];
            if self.rest.starts_with(b"--") {
                let n = self
                    .rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(self.rest.len());
                self.rest = &self.rest[n..];
            } else if self.rest.starts_with(b"/*") {
                let n = self
                    .rest
                    .windows(2)
                    .position(|w| w == b"*/")
                    .map_or(self.rest.len(), |i| i + 2);
                self.rest = &self.rest[n..];
            } else {
                return;
            }
        }
    }

    /// The next keyword or identifier (letters, digits, `_`, `.`), or `None` at anything else.
    fn next(&mut self) -> Option<&'a [u8]> {
        self.skip_blank();
        let n = self
            .rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b'.')
            .count();
        if n == 0 {
            return None;
        }
        let (w, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(w)
    }

    /// Is `word` somewhere in the rest of the statement (up to `;`)?
    fn contains(&self, word: &[u8]) -> bool {
        let end = self
            .rest
            .iter()
            .position(|&b| b == b';')
            .unwrap_or(self.rest.len());
        find_ci(&self.rest[..end], word).is_some()
    }
}

fn is(w: Option<&[u8]>, keyword: &[u8]) -> bool {
    w.is_some_and(|w| w.eq_ignore_ascii_case(keyword))
}

/// One statement's leading keywords (`text` ends at the statement's `;`). A first keyword
/// added here must be added to [`KEYWORDS`] (or handled like `SELECT` in [`plain`]) too, or
/// the shortcut would pass statements that begin with it.
fn statement(text: &[u8]) -> Effects {
    let mut w = Words { rest: text };
    let Some(first) = w.next() else {
        return Effects::default();
    };
    let mut fx = Effects::default();
    let kw = |k: &[u8]| first.eq_ignore_ascii_case(k);
    if kw(b"SET") {
        // `SET LOCAL` and `SET TRANSACTION`/`SET CONSTRAINTS` last for the transaction only.
        let second = w.next();
        if !(is(second, b"LOCAL") || is(second, b"TRANSACTION") || is(second, b"CONSTRAINTS")) {
            fx.settings = true;
        }
    } else if kw(b"RESET") {
        fx.settings = true;
    } else if kw(b"DISCARD") {
        match w.next() {
            Some(x) if x.eq_ignore_ascii_case(b"ALL") => {
                fx.settings = true;
                fx.unpins = pin::ALL;
                fx.drops_statements = true;
            }
            Some(x) if x.eq_ignore_ascii_case(b"TEMP") || x.eq_ignore_ascii_case(b"TEMPORARY") => {
                fx.unpins = pin::TEMP_TABLE;
            }
            _ => {}
        }
    } else if kw(b"DEALLOCATE") {
        let mut second = w.next();
        if is(second, b"PREPARE") {
            second = w.next();
        }
        if is(second, b"ALL") {
            fx.unpins = pin::PREPARE;
            fx.drops_statements = true;
        }
    } else if kw(b"PREPARE") {
        // `PREPARE TRANSACTION` is two-phase commit, not a statement.
        if !is(w.next(), b"TRANSACTION") {
            fx.pins = pin::PREPARE;
        }
    } else if kw(b"LISTEN") {
        fx.pins = pin::LISTEN;
    } else if kw(b"UNLISTEN") {
        w.skip_blank();
        if w.rest.first() == Some(&b'*') {
            fx.unpins = pin::LISTEN;
        }
    } else if kw(b"DECLARE") {
        if w.contains(b"WITH HOLD") {
            fx.pins = pin::CURSOR;
        }
    } else if kw(b"CLOSE") {
        if is(w.next(), b"ALL") {
            fx.unpins = pin::CURSOR;
        }
    } else if kw(b"CREATE") {
        // CREATE [GLOBAL|LOCAL] {TEMP|TEMPORARY} {TABLE|VIEW|SEQUENCE} ...,
        // CREATE [OR REPLACE] {TEMP|TEMPORARY} VIEW ...
        let mut second = w.next();
        if is(second, b"OR") {
            w.next();
            second = w.next();
        }
        if is(second, b"GLOBAL") || is(second, b"LOCAL") {
            second = w.next();
        }
        if is(second, b"TEMP") || is(second, b"TEMPORARY") {
            fx.pins = pin::TEMP_TABLE;
        } else {
            fx.ddl = true;
        }
    } else if kw(b"ALTER") || kw(b"DROP") {
        fx.ddl = true;
    } else if kw(b"SELECT") && selects_into_temp(w.rest) {
        // SELECT ... INTO [TEMP|TEMPORARY] name creates a table.
        fx.pins = pin::TEMP_TABLE;
    }
    fx
}

/// The custom settings (`app.tenant`: a name with a dot) that `text` may set or reset at
/// session level, appended to `out` (lower-cased, as Postgres folds unquoted names). Custom
/// settings are not listed in `pg_settings`, so tidepool must ask for them by name. A cold
/// path: only for text that [`scan`] found to change settings.
pub fn custom_names(text: &[u8], out: &mut Vec<String>) {
    let text = match text.iter().position(|&b| b == 0) {
        Some(n) => &text[..n],
        None => text,
    };
    let mut push = |name: &[u8]| {
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        if name.contains('.') && !out.contains(&name) {
            out.push(name);
        }
    };
    for stmt in text.split(|&b| b == b';') {
        let mut w = Words { rest: stmt };
        let first = w.next();
        if is(first, b"SET") || is(first, b"RESET") {
            let mut name = w.next();
            if is(name, b"SESSION") {
                name = w.next();
            }
            if let Some(n) = name {
                push(n);
            }
        }
    }
    // set_config('name', ...): the first argument, when it is a literal.
    let mut at = 0;
    while let Some(i) = find_ci(&text[at..], b"set_config") {
        at += i + 10;
        let rest = &text[at..];
        let rest = rest.trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b"(") else {
            continue;
        };
        let Some(rest) = rest.trim_ascii_start().strip_prefix(b"'") else {
            continue;
        };
        if let Some(end) = rest.iter().position(|&b| b == b'\'') {
            push(&rest[..end]);
        }
    }
}

/// Does the rest of a SELECT have `INTO TEMP`/`INTO TEMPORARY`?
fn selects_into_temp(body: &[u8]) -> bool {
    memchr::memchr2_iter(b'i', b'I', body).any(|i| {
        let word_start = i == 0 || !body[i - 1].is_ascii_alphanumeric();
        let into = body[i..].len() > 4 && body[i..i + 4].eq_ignore_ascii_case(b"INTO");
        if !(word_start && into && body[i + 4].is_ascii_whitespace()) {
            return false;
        }
        let next = Words {
            rest: &body[i + 4..],
        }
        .next();
        is(next, b"TEMP") || is(next, b"TEMPORARY")
    })
}

/// Functions that change session state from inside any statement: `set_config` and the
/// session-level advisory-lock functions. Both names have a `_`; an ordinary query with an
/// underscore or two (`pgbench_accounts`) costs a look at each.
fn functions(text: &[u8], fx: &mut Effects) {
    let ends_with =
        |at: usize, p: &[u8]| at >= p.len() && text[at - p.len()..at].eq_ignore_ascii_case(p);
    let starts_at = |at: usize, p: &[u8]| {
        text.len() >= at + p.len() && text[at..at + p.len()].eq_ignore_ascii_case(p)
    };
    for i in memchr::memchr_iter(b'_', text) {
        if ends_with(i, b"set") && starts_at(i + 1, b"config") {
            fx.settings = true;
        } else if ends_with(i, b"advisory") {
            let before = i - b"advisory".len();
            if !(ends_with(before, b"pg_") || ends_with(before, b"pg_try_")) {
                continue;
            }
            if starts_at(i + 1, b"unlock_all") {
                fx.unpins |= pin::ADVISORY_LOCK;
            } else if starts_at(i + 1, b"lock") {
                // pg_advisory_lock(, pg_advisory_lock_shared(, pg_try_advisory_lock...; the
                // transaction-level ones are pg_advisory_xact_lock and do not match.
                fx.pins |= pin::ADVISORY_LOCK;
            }
        }
    }
}

/// Position of `needle` (ASCII, any case) in `hay`.
fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0].to_ascii_lowercase();
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        if hay[i].to_ascii_lowercase() == first
            && hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
        {
            return Some(i);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fx(s: &str) -> Effects {
        scan(s.as_bytes())
    }

    #[test]
    fn ordinary_statements_have_no_effect() {
        for s in [
            "SELECT 1",
            "select abalance from pgbench_accounts where aid = 42;",
            "BEGIN",
            "UPDATE t SET x = 1",
            "INSERT INTO t VALUES (1)",
            "SET LOCAL statement_timeout = '1s'",
            "set transaction isolation level serializable",
            "SELECT pg_advisory_xact_lock(1)",
            "",
            "  ;  ",
            "COMMIT; SELECT 2",
        ] {
            assert!(fx(s).is_none(), "{s}: {:?}", fx(s));
        }
    }

    #[test]
    fn settings() {
        for s in [
            "SET statement_timeout = '5ms'",
            "set search_path to a, b",
            "  /* hi */ -- there\n SET SESSION work_mem = '1MB'",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION u",
            "RESET ALL",
            "reset role",
            "SELECT 1; SET x.y = 2",
            "SELECT pg_catalog.set_config('a.b', 'c', false)",
            "SET TIME ZONE 'UTC'",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        ] {
            assert!(fx(s).settings, "{s}");
        }
    }

    #[test]
    fn pins_and_unpins() {
        assert_eq!(fx("CREATE TEMP TABLE t (x int)").pins, pin::TEMP_TABLE);
        assert_eq!(
            fx("create global temporary table t (x int)").pins,
            pin::TEMP_TABLE
        );
        assert_eq!(
            fx("CREATE OR REPLACE TEMP VIEW v AS SELECT 1").pins,
            pin::TEMP_TABLE
        );
        assert_eq!(fx("SELECT 1 INTO TEMP t").pins, pin::TEMP_TABLE);
        assert_eq!(fx("PREPARE p AS SELECT 1").pins, pin::PREPARE);
        assert_eq!(fx("PREPARE TRANSACTION 'x'").pins, 0);
        assert_eq!(fx("LISTEN chan").pins, pin::LISTEN);
        assert_eq!(
            fx("DECLARE c CURSOR WITH HOLD FOR SELECT 1").pins,
            pin::CURSOR
        );
        assert_eq!(fx("DECLARE c CURSOR FOR SELECT 1").pins, 0);
        assert_eq!(fx("SELECT pg_advisory_lock(1)").pins, pin::ADVISORY_LOCK);
        assert_eq!(
            fx("select PG_TRY_ADVISORY_LOCK_SHARED(1, 2)").pins,
            pin::ADVISORY_LOCK
        );
        assert_eq!(
            fx("SELECT pg_advisory_unlock_all()").unpins,
            pin::ADVISORY_LOCK
        );
        assert_eq!(fx("UNLISTEN *").unpins, pin::LISTEN);
        assert_eq!(fx("UNLISTEN chan").unpins, 0);
        assert_eq!(fx("CLOSE ALL").unpins, pin::CURSOR);
        assert_eq!(fx("DISCARD TEMP").unpins, pin::TEMP_TABLE);
        let all = fx("DISCARD ALL");
        assert_eq!(all.unpins, pin::ALL);
        assert!(all.settings && all.drops_statements);
        let d = fx("DEALLOCATE PREPARE ALL");
        assert_eq!(d.unpins, pin::PREPARE);
        assert!(d.drops_statements);
    }

    #[test]
    fn names_at_the_edges_of_the_text() {
        assert!(fx("set_config('a.b','c',false)").settings);
        assert!(!fx("_").settings);
        assert!(!fx("x_config").settings);
        assert_eq!(fx("pg_advisory_").pins, 0);
        assert_eq!(fx("advisory_lock(1)").pins, 0);
        assert_eq!(fx("SELECT 1 INTO temporary t2").pins, pin::TEMP_TABLE);
        assert_eq!(fx("SELECT x FROM t WHERE mint = 1").pins, 0);
        assert_eq!(fx("SELECT 1 INTO").pins, 0);
    }

    #[test]
    fn ddl() {
        assert!(fx("DROP TYPE mood").ddl);
        assert!(fx("alter table t add column y int").ddl);
        assert!(fx("CREATE TYPE mood AS ENUM ('a')").ddl);
        assert!(!fx("CREATE TEMP TABLE t (x int)").ddl);
        assert!(!fx("SELECT 1").ddl);
    }

    #[test]
    fn custom_setting_names() {
        let mut v = Vec::new();
        custom_names(
            b"SET app.Tenant = 'x'; SET statement_timeout = 1; RESET my.other;\
              SELECT set_config( 'third.one', 'v', false), set_config(x, 'y', false)\0",
            &mut v,
        );
        assert_eq!(v, ["app.tenant", "my.other", "third.one"]);
    }

    #[test]
    fn the_memo_answers_as_scan_does() {
        let memo = Memo::default();
        let long = format!("SELECT 1; SET a.b = 1; {}", " ".repeat(MEMO_MAX));
        for s in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "SET search_path TO x",
            "SET search_path TO x",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "",
            "SET LOCAL search_path TO x",
            "SET LOCAL search_path TO y",
            long.as_str(),
            long.as_str(),
            "CREATE TEMP TABLE t (x int)",
        ] {
            assert_eq!(memo.scan(s.as_bytes()), scan(s.as_bytes()), "{s:?}");
        }
        // Same length, different text: scanned, not taken from the slot.
        assert!(memo.scan(b"SELECT 1 + 1").is_none());
        assert!(memo.scan(b"SET a.b TO 1").settings);
        assert!(memo.scan(b"SET a.b TO 1").settings);
        assert!(memo.scan(b"SELECT 1 + 1").is_none());
        // A text equal to the slot's first bytes, or longer than it, is not taken for it.
        assert!(memo.scan(b"CREATE TEMP TABLE t (x int)").pins != 0);
        assert_eq!(memo.scan(b"CREATE TEMP"), scan(b"CREATE TEMP"));
        assert!(
            memo.scan(b"CREATE TEMP TABLE t (x int); SET x.y = 1")
                .settings
        );
    }

    #[test]
    fn the_shortcut_takes_ordinary_statements() {
        for s in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7;\0",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now())",
            "BEGIN",
            "COMMIT;  ",
            "select 1\0",
            "",
        ] {
            assert!(plain(s.as_bytes()), "{s:?}");
        }
        for s in [
            "SELECT x INTO TEMP t FROM u",
            "SET x = 1",
            "SELECT 1; SET x = 1",
            "-- c\nSET x = 1",
            "SELECT set_config('a', 'b', false)",
            "SELECT pg_advisory_lock(1)",
        ] {
            assert!(!plain(s.as_bytes()), "{s:?}");
        }
    }

    /// The shortcut never hides an effect: on many texts built from the pieces the full scan
    /// looks at, whatever it passes has none there, and `scan` always equals the full scan.
    #[test]
    fn the_shortcut_agrees_with_the_full_scan() {
        const PIECES: [&str; 40] = [
            "SELECT",
            "select",
            "SeLeCt",
            "INTO",
            "into",
            "Into",
            "TEMP",
            "temporary",
            "SET",
            "set",
            "LOCAL",
            "RESET",
            "DISCARD",
            "ALL",
            "CREATE",
            "create",
            "TABLE",
            "ALTER",
            "DROP",
            "PREPARE",
            "DEALLOCATE",
            "LISTEN",
            "UNLISTEN",
            "*",
            "DECLARE",
            "WITH HOLD",
            "CLOSE",
            "set_config(",
            "pg_advisory_lock(",
            "pg_try_advisory_lock_shared(",
            "config",
            "_",
            "advisory",
            ";",
            "\0",
            " ",
            "\n",
            "--",
            "/*",
            "*/",
        ];
        const GLUE: [&str; 4] = ["", " ", "x", "\t"];
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut text = String::new();
        let mut passed = 0;
        for _ in 0..200_000 {
            text.clear();
            for _ in 0..1 + next() % 7 {
                text.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
                text.push_str(GLUE[(next() % GLUE.len() as u64) as usize]);
            }
            let t = text.as_bytes();
            if plain(t) {
                passed += 1;
                assert!(scan_full(t).is_none(), "{text:?}: {:?}", scan_full(t));
            }
            assert_eq!(scan(t), scan_full(t), "{text:?}");
        }
        // Enough of the texts take the shortcut for the comparison to mean something.
        assert!(passed > 10_000, "{passed}");
    }

    #[test]
    fn pin_names_cover_every_kind() {
        let kinds: Vec<u8> = pin::each(pin::ALL).collect();
        assert_eq!(kinds.len(), 5);
        for k in kinds {
            assert_ne!(pin::name(k), "other");
            assert!(pin::refusal(k).contains("session_state"));
        }
    }
}
