#!/usr/bin/env python3
"""psycopg 3 workload for tidepool's transaction mode (run by tests/drivers.rs).

Usage: psycopg_workload.py HOST PORT DBNAME [USER]

Every connection uses prepare_threshold=0, so psycopg prepares every parametrised query
server-side under a named statement (`_pg3_N`) the first time it runs it and from then on
only binds that name, while tidepool moves the connection's transactions between servers.
Four threads, one connection each: two in autocommit mode (each statement its own
transaction, some grouped in `with conn.transaction():`), two in psycopg's default
non-autocommit mode (an implicit BEGIN, ended by commit()/rollback()).

Exits 0 when every result was right, 1 (with the reason) otherwise.
"""

import sys
import threading
import traceback

import psycopg

THREADS = 4
TXNS = 50


def log(*args):
    print(*args, flush=True)


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def worker(conninfo, tid, pids, errors):
    autocommit = tid % 2 == 0
    try:
        with psycopg.connect(conninfo, prepare_threshold=0, autocommit=autocommit) as conn:
            seen = set()
            for i in range(TXNS):
                key = tid * 1000 + i
                if autocommit and i % 2 == 0:
                    # Statements outside a transaction: each is its own transaction and may
                    # run on another server than the one that prepared it.
                    cur = conn.execute("SELECT %s::int + 1", (i,))
                    check("SELECT %s::int + 1", cur.fetchone()[0], i + 1)
                    conn.execute(
                        "INSERT INTO items (id, owner, val) VALUES (%s, %s, %s)",
                        (key, tid, f"v{key}"),
                    )
                    cur = conn.execute("SELECT val, owner FROM items WHERE id = %s", (key,))
                    check("select by key", cur.fetchone(), (f"v{key}", tid))
                    seen.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
                elif autocommit:
                    with conn.transaction():
                        cur = conn.cursor()
                        cur.execute("SELECT %s::int + 1", (i,))
                        check("SELECT %s::int + 1 (txn)", cur.fetchone()[0], i + 1)
                        cur.execute(
                            "INSERT INTO items (id, owner, val) VALUES (%s, %s, %s)",
                            (key, tid, f"v{key}"),
                        )
                        cur.execute("SELECT val, owner FROM items WHERE id = %s", (key,))
                        check("select by key (txn)", cur.fetchone(), (f"v{key}", tid))
                        cur.execute("SELECT pg_backend_pid()")
                        seen.add(cur.fetchone()[0])
                        cur.execute(
                            "SELECT count(*) FROM items WHERE owner = %s AND id <= %s",
                            (tid, key),
                        )
                        check("count (txn)", cur.fetchone()[0], i + 1)
                else:
                    # Non-autocommit: psycopg opens the transaction itself.
                    cur = conn.cursor()
                    cur.execute("SELECT %s::int + 1", (i,))
                    check("SELECT %s::int + 1 (implicit txn)", cur.fetchone()[0], i + 1)
                    cur.execute(
                        "INSERT INTO items (id, owner, val) VALUES (%s, %s, %s)",
                        (key, tid, f"v{key}"),
                    )
                    cur.execute("SELECT val, owner FROM items WHERE id = %s", (key,))
                    check("select by key (implicit txn)", cur.fetchone(), (f"v{key}", tid))
                    cur.execute("SELECT pg_backend_pid()")
                    seen.add(cur.fetchone()[0])
                    if i % 10 == 9:
                        # A rolled-back insert must not be there afterwards.
                        cur.execute(
                            "INSERT INTO items (id, owner, val) VALUES (%s, %s, %s)",
                            (key + 500, tid, "rolled back"),
                        )
                        conn.rollback()
                        # The rollback also undid this transaction's first insert: redo it.
                        cur.execute(
                            "INSERT INTO items (id, owner, val) VALUES (%s, %s, %s)",
                            (key, tid, f"v{key}"),
                        )
                    conn.commit()
                    # A nested block: a savepoint inside psycopg's implicit transaction.
                    if i % 7 == 0:
                        with conn.transaction():
                            cur.execute("SELECT %s::int + 1", (-i,))
                            check("SELECT %s::int + 1 (block)", cur.fetchone()[0], 1 - i)
                        conn.commit()
            # Everything this thread wrote, read back through prepared statements.
            cur = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE val = 'v' || id) "
                "FROM items WHERE owner = %s",
                (tid,),
            )
            check(f"rows of thread {tid}", tuple(cur.fetchone()), (TXNS, TXNS))
            if not autocommit:
                conn.commit()
            pids[tid] = seen
            log(f"thread {tid}: autocommit={autocommit}, {TXNS} transactions ok, "
                f"backend pids {sorted(seen)}")
    except Exception as e:  # noqa: BLE001 - report whatever the driver raised
        errors.append(f"thread {tid}: {type(e).__module__}.{type(e).__name__}: {e}\n"
                      + traceback.format_exc())


def forced_switches(conninfo, rounds=20):
    """Deterministic server switches (the pool has 2 servers, nothing else runs now).

    `a` runs a statement outside a transaction, so its server goes back to the idle list;
    `b` opens a transaction and takes that server; `a`'s next statements must then run on the
    other server, with the named statements psycopg prepared for `a` on whichever server it
    had. Returns the backends `a` ran on.
    """
    seen = set()
    with psycopg.connect(conninfo, prepare_threshold=0, autocommit=True) as a, psycopg.connect(
        conninfo, prepare_threshold=0, autocommit=True
    ) as b:
        for i in range(rounds):
            first = a.execute("SELECT pg_backend_pid()").fetchone()[0]
            with b.transaction():
                held = b.execute("SELECT pg_backend_pid()").fetchone()[0]
                check("SELECT %s::int + 1 (switched)",
                      a.execute("SELECT %s::int + 1", (i,)).fetchone()[0], i + 1)
                row = a.execute("SELECT val FROM items WHERE id = %s", (i,)).fetchone()
                check("select by key (switched)", row, (f"v{i}",))
                now = a.execute("SELECT pg_backend_pid()").fetchone()[0]
                if now == held:
                    raise AssertionError(f"a ran on {now}, the server b holds in a transaction")
            seen.update((first, now))
    return seen


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, dbname = sys.argv[1], sys.argv[2], sys.argv[3]
    user = sys.argv[4] if len(sys.argv) > 4 else "postgres"
    conninfo = f"host={host} port={port} dbname={dbname} user={user} connect_timeout=10"
    log(f"psycopg {psycopg.__version__} (impl {psycopg.pq.__impl__}, libpq "
        f"{psycopg.pq.version()}), {THREADS} threads x {TXNS} transactions via {host}:{port}")

    with psycopg.connect(conninfo, prepare_threshold=0, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, owner int, val text)")
        conn.execute("TRUNCATE items")

    pids = {}
    errors = []
    threads = [
        threading.Thread(target=worker, args=(conninfo, t, pids, errors)) for t in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for e in errors:
            log("FAILED", e)
        return 1

    with psycopg.connect(conninfo, prepare_threshold=0, autocommit=True) as conn:
        total = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        check("total rows", total, THREADS * TXNS)
        stray = conn.execute("SELECT count(*) FROM items WHERE val = %s", ("rolled back",))
        check("rolled-back rows", stray.fetchone()[0], 0)

    all_pids = set().union(*pids.values())
    moved = [t for t, s in pids.items() if len(s) > 1]
    log(f"distinct backends {sorted(all_pids)}; threads that ran on more than one: {moved}")

    try:
        seen = forced_switches(conninfo)
    except Exception as e:  # noqa: BLE001
        log(f"FAILED forced switches: {type(e).__module__}.{type(e).__name__}: {e}")
        log(traceback.format_exc())
        return 1
    log(f"forced switches: ok, the switching connection ran on {sorted(seen)}")
    if len(seen) < 2:
        log("FAILED: the switching connection stayed on one server; the test proves nothing")
        return 1
    log("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
