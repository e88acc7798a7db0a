//! Request/response accounting: framing both directions, the server's protocol state
//! (ReadyForQuery, COPY, ParameterStatus), and in transaction mode the queue of requests with
//! the reply that completes each, which decides when a transaction is over and the server can
//! go back to the pool.
//!
//! Replies come back in request order (protocol docs 55.2.3 "Extended Query"), and after an
//! ErrorResponse the server skips to the next Sync; synthesised replies are placed and replies
//! to tidepool's own requests hidden by this queue.

use super::buffers::splice;
use super::Session;
use crate::config::PoolMode;
use crate::protocol;
use crate::sql;

/// Largest server message tidepool inspects whole (ParameterStatus, ReadyForQuery).
const MAX_INSPECTED: usize = 64 * 1024;

/// What a queued request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Parse,
    Bind,
    /// Describe: completes on RowDescription or NoData (after ParameterDescription).
    Describe,
    Execute,
    Close,
    Sync,
    /// Simple Query or FunctionCall: everything up to ReadyForQuery.
    Query,
}

impl Kind {
    /// Does this server message complete the request?
    pub fn completed_by(self, tag: u8) -> bool {
        match self {
            Kind::Parse => tag == b'1',
            Kind::Bind => tag == b'2',
            Kind::Describe => tag == b'T' || tag == b'n',
            Kind::Execute => matches!(tag, b'C' | b'I' | b's'),
            Kind::Close => tag == b'3',
            Kind::Sync | Kind::Query => tag == b'Z',
        }
    }
}

/// What to do with a request's reply.
#[derive(Debug, Clone)]
pub enum Action {
    Forward,
    /// tidepool's own request: swallow its reply. For an injected Parse, the statement to
    /// forget on the server if it fails.
    Hide(Option<u64>),
    /// No request was sent: produce this reply for the client when its turn comes.
    Synth(u8),
    /// A statement refused by `session_state = "reject"` (a `sql::pin` kind), not sent:
    /// produce its ErrorResponse (and, for a simple Query, ReadyForQuery) when its turn comes.
    Reject(u8),
}

#[derive(Debug, Clone)]
pub struct Pending {
    pub kind: Kind,
    pub action: Action,
    /// A Parse that was sent: the statement to forget on the server if it fails.
    pub parsed: Option<u64>,
    /// A Bind/Execute of a tracked statement: forget it on the server if Postgres says its
    /// cached plan is stale (SQLSTATE 0A000), so the next use prepares it afresh.
    pub uses: Option<u64>,
}

impl Pending {
    pub fn forward(kind: Kind) -> Self {
        Pending {
            kind,
            action: Action::Forward,
            parsed: None,
            uses: None,
        }
    }
}

/// What tracking made of a message.
pub(super) enum Tracked {
    /// The whole message is needed and not there yet.
    NeedMore,
    /// Replaced by this many bytes (already accounted for).
    Rewritten(usize),
    /// A simple Query refused before it was sent: removed, its answer queued.
    Refused,
    /// Handle as usual.
    PassOn,
}

impl Session {
    pub(super) fn releasable(&self) -> bool {
        self.login.mode == PoolMode::Transaction
            && self.pending.is_empty()
            && self.server.as_ref().is_some_and(|s| s.is_clean())
            && self.c_ready == 0
            && self.c_rem == 0
            && self.s_rem == 0
            && self.sbuf.len() == self.s_ready
            && self.pins == 0
    }

    /// Frame client bytes from `c_ready` on; update the server's protocol state. Returns
    /// Ok(false) on Terminate.
    pub(super) fn scan_client(&mut self) -> Result<bool, String> {
        if self.server.is_none() {
            return Ok(true);
        }
        loop {
            let avail = self.cbuf.len() - self.c_ready;
            if self.c_rem > 0 {
                let n = self.c_rem.min(avail);
                self.c_ready += n;
                self.c_rem -= n;
                if self.c_rem > 0 {
                    return Ok(true);
                }
                continue;
            }
            let h = match protocol::header(&self.cbuf[self.c_ready..], self.max_msg) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(true),
                Err(e) => return Err(e.to_string()),
            };
            if self.iso & super::iso::TRACK != 0 {
                match self.track_client(h, avail)? {
                    Tracked::NeedMore => return Ok(true),
                    Tracked::Rewritten(len) => {
                        self.c_tag = h.tag;
                        self.c_ready += len;
                        if self.txn_started.is_none() {
                            self.txn_started = Some(std::time::Instant::now());
                        }
                        if let Some(server) = self.server.as_mut() {
                            server.state.in_extended = true;
                        }
                        self.emit_synths();
                        continue;
                    }
                    Tracked::Refused => {
                        self.emit_synths();
                        continue;
                    }
                    Tracked::PassOn => {}
                }
            }
            let Some(server) = self.server.as_mut() else {
                return Ok(true);
            };
            let st = &mut server.state;
            match h.tag {
                b'Q' => {
                    st.expected_rfq += 1;
                    self.pool_metrics().queries.inc();
                    if self.txn_started.is_none() {
                        self.txn_started = Some(std::time::Instant::now());
                    }
                }
                b'S' => {
                    st.expected_rfq += 1;
                    st.in_extended = false;
                    self.pool_metrics().queries.inc();
                }
                b'F' => {
                    st.expected_rfq += 1;
                    self.pool_metrics().queries.inc();
                }
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => {
                    st.in_extended = true;
                    if self.txn_started.is_none() {
                        self.txn_started = Some(std::time::Instant::now());
                    }
                }
                b'd' => {}
                b'c' | b'f' => st.copy_in = false,
                b'X' => {
                    // Terminate is never forwarded: the server stays ours to reuse or close.
                    self.cbuf.truncate(self.c_ready);
                    return Ok(false);
                }
                b'p' => {}
                t => return Err(format!("invalid frontend message type {t}")),
            }
            self.c_tag = h.tag;
            let n = h.total.min(avail);
            self.c_ready += n;
            self.c_rem = h.total - n;
            if self.c_rem > 0 {
                return Ok(true);
            }
        }
    }

    /// Frame server bytes from `s_ready` on, tracking ReadyForQuery, COPY and ParameterStatus.
    pub(super) fn scan_server(&mut self) -> Result<(), String> {
        if self.server.is_none() {
            return Ok(());
        }
        loop {
            let avail = self.sbuf.len() - self.s_ready;
            if self.s_rem > 0 {
                let n = self.s_rem.min(avail);
                self.s_ready += n;
                self.s_rem -= n;
                if self.s_rem > 0 {
                    return Ok(());
                }
                continue;
            }
            let h = match protocol::header(&self.sbuf[self.s_ready..], usize::MAX) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            if self.iso & super::iso::TRACK != 0 && !matches!(h.tag, b'N' | b'S' | b'A') {
                match self.track_server(h, avail)? {
                    Tracked::NeedMore => return Ok(()),
                    // Synthesised replies were inserted, or a hidden one removed: look again.
                    Tracked::Rewritten(_) | Tracked::Refused => continue,
                    Tracked::PassOn => {}
                }
            }
            let Some(server) = self.server.as_mut() else {
                return Ok(());
            };
            let st = &mut server.state;
            match h.tag {
                b'Z' | b'S' => {
                    if h.total > MAX_INSPECTED {
                        return Err(format!("oversized message '{}'", h.tag as char));
                    }
                    if avail < h.total {
                        self.sbuf.reserve(h.total - avail);
                        return Ok(());
                    }
                    let body = &self.sbuf[self.s_ready + 5..self.s_ready + h.total];
                    if h.tag == b'Z' {
                        st.expected_rfq = st.expected_rfq.saturating_sub(1);
                        st.txn_status = body.first().copied().unwrap_or(b'I');
                        st.copy_in = false;
                        st.copy_out = false;
                        // Session mode: a transaction ends whenever the server is idle again
                        // (transaction mode counts at release instead).
                        if self.login.mode == PoolMode::Session
                            && st.expected_rfq == 0
                            && st.txn_status == b'I'
                        {
                            if let Some(t0) = self.txn_started.take() {
                                self.count_transaction(t0.elapsed());
                            }
                        }
                    } else if let Some((k, v)) = protocol::parse_parameter_status(body) {
                        server.params.set(k, v);
                        server.synced_fp = None;
                        self.login.params.observe(k, v);
                    }
                }
                b'G' => st.copy_in = true,
                b'H' => st.copy_out = true,
                b'W' => {
                    st.copy_in = true;
                    st.copy_out = true;
                }
                b'c' => st.copy_out = false,
                b'E' => {
                    st.copy_out = false;
                    // Remember whether the server said goodbye itself (FATAL/PANIC), so a
                    // following disconnect needs no FATAL of ours.
                    let whole = avail >= h.total;
                    let body = &self.sbuf[self.s_ready + 5..self.s_ready + h.total.min(avail)];
                    self.s_last_fatal = whole && error_is_fatal(body);
                    // A write refused by a read-only server: after a failover (DESIGN.md
                    // section 9) the pool moves to the writable host.
                    if whole && body.windows(7).any(|w| w == b"C25006\0") {
                        let id = server.id;
                        self.login.pool.server_read_only(id);
                    }
                }
                _ => {}
            }
            self.s_last_tag = h.tag;
            let n = h.total.min(avail);
            self.s_ready += n;
            self.s_rem = h.total - n;
            if self.s_rem > 0 {
                return Ok(());
            }
        }
    }

    /// Transaction mode: queue every request with the reply that completes it, and handle
    /// named statements (see `prepared`). Parse/Bind/Describe/Close are rewritten in place.
    pub(super) fn track_client(
        &mut self,
        h: protocol::Header,
        avail: usize,
    ) -> Result<Tracked, String> {
        let at = self.c_ready;
        if self.iso & super::iso::REJECTING != 0 {
            // After a refused Parse the rest of the batch is dropped, as a server skips to
            // Sync after an error (protocol docs 55.2.3).
            if matches!(h.tag, b'S' | b'Q' | b'X') {
                self.iso &= !super::iso::REJECTING;
            } else {
                if avail < h.total {
                    self.cbuf.reserve(h.total - avail);
                    self.c_need = at + h.total;
                    return Ok(Tracked::NeedMore);
                }
                self.c_need = 0;
                splice(&mut self.cbuf, at, h.total, &[]);
                return Ok(Tracked::Rewritten(0));
            }
        }
        let kind = match h.tag {
            b'Q' | b'F' => {
                if h.tag == b'Q' {
                    // The whole text: a session-level SET may follow any `;`.
                    if avail < h.total {
                        self.cbuf.reserve(h.total - avail);
                        self.c_need = at + h.total;
                        return Ok(Tracked::NeedMore);
                    }
                    self.c_need = 0;
                    let fx = sql::scan(&self.cbuf[at + 5..at + h.total]);
                    if !fx.is_none() {
                        if let Some(refused) = self.note_effects(fx, at + 5..at + h.total) {
                            self.refuse(refused, Kind::Query, at, h.total);
                            return Ok(Tracked::Refused);
                        }
                    }
                }
                Kind::Query
            }
            b'S' => Kind::Sync,
            b'E' => Kind::Execute,
            b'P' | b'B' | b'D' | b'C' => {
                if avail < h.total {
                    self.cbuf.reserve(h.total - avail);
                    self.c_need = at + h.total;
                    return Ok(Tracked::NeedMore);
                }
                self.c_need = 0;
                let len = self.rewrite_named(h)?;
                return Ok(Tracked::Rewritten(len));
            }
            _ => return Ok(Tracked::PassOn),
        };
        self.pending.push_back(Pending::forward(kind));
        Ok(Tracked::PassOn)
    }

    /// Transaction mode, one server message at `s_ready` (not an asynchronous one): place
    /// synthesised replies before it, hide replies to tidepool's own requests, and keep the
    /// request queue in step, including the skip-to-Sync after an error.
    pub(super) fn track_server(
        &mut self,
        h: protocol::Header,
        avail: usize,
    ) -> Result<Tracked, String> {
        if self.emit_synths() {
            return Ok(Tracked::Rewritten(0));
        }
        let Some(head) = self.pending.front() else {
            return Ok(Tracked::PassOn);
        };
        if h.tag == b'E' {
            if head.kind == Kind::Query {
                return Ok(Tracked::PassOn);
            }
            if avail < h.total {
                self.sbuf.reserve(h.total - avail);
                return Ok(Tracked::NeedMore);
            }
            let (code, _) =
                protocol::parse_error_fields(&self.sbuf[self.s_ready + 5..self.s_ready + h.total]);
            let server = self.server.as_mut().ok_or("no server")?;
            // The server now skips everything up to the next Sync (55.2.3).
            while let Some(p) = self.pending.front() {
                if p.kind == Kind::Sync {
                    break;
                }
                let p = self.pending.pop_front().expect("front exists");
                if let Some(id) = p.parsed {
                    server.stmts.remove(id);
                }
                if let Action::Hide(Some(id)) = p.action {
                    server.stmts.remove(id);
                }
                // A stale plan (0A000), a statement the server lost (26000), or one whose
                // types are gone from the catalog (XX000 "cache lookup failed", after DDL run
                // past tidepool): prepare it afresh next time.
                if let (Some(id), "0A000" | "26000" | "XX000") = (p.uses, code.as_str()) {
                    server.stmts.remove(id);
                }
            }
            return Ok(Tracked::PassOn);
        }
        if !head.kind.completed_by(h.tag) {
            return Ok(Tracked::PassOn);
        }
        let head = self.pending.pop_front().expect("front exists");
        if let Action::Hide(_) = head.action {
            if avail < h.total {
                // Put it back and wait for the whole (5-byte) reply.
                self.pending.push_front(head);
                self.sbuf.reserve(h.total - avail);
                return Ok(Tracked::NeedMore);
            }
            splice(&mut self.sbuf, self.s_ready, h.total, &[]);
            return Ok(Tracked::Rewritten(0));
        }
        Ok(Tracked::PassOn)
    }

    /// Emit the synthesised replies at the head of the queue (their turn has come: every
    /// earlier reply has been framed). Returns true if any was emitted.
    ///
    /// Called for every message either way (nine times per extended-protocol transaction);
    /// the head of the queue is nearly always a request that was forwarded, with nothing to
    /// emit, so that test is inlined into the callers and the rest is not.
    #[inline]
    pub(super) fn emit_synths(&mut self) -> bool {
        matches!(
            self.pending.front(),
            Some(Pending {
                action: Action::Synth(_) | Action::Reject(_),
                ..
            })
        ) && self.emit_due_synths()
    }

    #[inline(never)]
    fn emit_due_synths(&mut self) -> bool {
        let mut emitted = false;
        loop {
            let mut out = [0u8; 5 * 8];
            let mut n = 0;
            while n < 8 {
                match self.pending.front() {
                    Some(Pending {
                        action: Action::Synth(tag),
                        ..
                    }) => {
                        out[n * 5..n * 5 + 5].copy_from_slice(&[*tag, 0, 0, 0, 4]);
                        n += 1;
                        self.pending.pop_front();
                    }
                    _ => break,
                }
            }
            if n > 0 {
                splice(&mut self.sbuf, self.s_ready, 0, &out[..n * 5]);
                self.s_ready += n * 5;
                emitted = true;
                continue;
            }
            // A refused statement (a cold path): its error, and for a Query its
            // ReadyForQuery; a refused Parse drops the rest of its batch up to Sync.
            let Some(&Pending {
                action: Action::Reject(kind),
                kind: request,
                ..
            }) = self.pending.front()
            else {
                return emitted;
            };
            self.pending.pop_front();
            let bytes = self.refusal(kind, request == Kind::Query);
            splice(&mut self.sbuf, self.s_ready, 0, &bytes);
            self.s_ready += bytes.len();
            emitted = true;
        }
    }
}

/// Does an ErrorResponse body carry severity FATAL or PANIC?
fn error_is_fatal(body: &[u8]) -> bool {
    body.split(|&b| b == 0)
        .filter_map(|f| f.split_first())
        .any(|(&t, v)| (t == b'S' || t == b'V') && (v == b"FATAL" || v == b"PANIC"))
}
