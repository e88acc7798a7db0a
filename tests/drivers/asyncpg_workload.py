#!/usr/bin/env python3
"""asyncpg workload for tidepool's transaction mode (run by tests/drivers.rs).

Usage: asyncpg_workload.py HOST PORT DBNAME [USER]

A pool of 4 connections with asyncpg's statement cache (statement_cache_size=100): asyncpg
prepares every query under a named statement (`__asyncpg_stmt_N__`) on the connection that
first runs it and reuses the name afterwards, while tidepool moves the connection's
transactions between servers. ~200 operations run concurrently, inside and outside
transactions. An enum column makes asyncpg run its type introspection query (itself a
prepared statement) through tidepool. Every result is checked.

Exits 0 when every result was right, 1 (with the reason) otherwise.
"""

import asyncio
import sys
import traceback

import asyncpg

OPS = 200
POOL = 4
MOODS = ["sad", "ok", "happy"]


def log(*args):
    print(*args, flush=True)


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


async def op(pool, i, pids):
    """One operation; records, per pool connection, the backends its transactions ran on."""
    key = 10_000 + i
    kind = i % 5
    async with pool.acquire() as conn:
        seen = pids.setdefault(id(getattr(conn, "_con", conn)), set())
        if kind == 0:
            # Outside a transaction: every statement is its own transaction.
            check("fetchval $1::int + 1", await conn.fetchval("SELECT $1::int + 1", i), i + 1)
            await conn.execute(
                "INSERT INTO kv (k, v, mood) VALUES ($1, $2, $3)", key, f"v{key}", MOODS[i % 3]
            )
            row = await conn.fetchrow("SELECT v, mood FROM kv WHERE k = $1", key)
            check("fetchrow by key", (row["v"], row["mood"]), (f"v{key}", MOODS[i % 3]))
            seen.add(await conn.fetchval("SELECT pg_backend_pid()"))
        elif kind == 1:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO kv (k, v, mood) VALUES ($1, $2, $3)",
                    key,
                    f"v{key}",
                    MOODS[i % 3],
                )
                rows = await conn.fetch("SELECT k, v FROM kv WHERE k = ANY($1::int[])", [key, -1])
                check("fetch ANY (txn)", [tuple(r) for r in rows], [(key, f"v{key}")])
                check("fetchval (txn)", await conn.fetchval("SELECT $1::int + 1", i), i + 1)
                seen.add(await conn.fetchval("SELECT pg_backend_pid()"))
        elif kind == 2:
            # A transaction that is rolled back: its insert must be gone afterwards.
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO kv (k, v, mood) VALUES ($1, $2, $3)", key, "rolled back", "ok"
                    )
                    raise _Rollback()
            except _Rollback:
                pass
            check("after rollback", await conn.fetchval("SELECT v FROM kv WHERE k = $1", key), None)
            await conn.execute(
                "INSERT INTO kv (k, v, mood) VALUES ($1, $2, $3)", key, f"v{key}", MOODS[i % 3]
            )
        elif kind == 3:
            # A prepared statement object, executed several times (also within a transaction).
            stmt = await conn.prepare("SELECT $1::text || '-' || $2::int")
            check("prepared fetchval", await stmt.fetchval("a", i), f"a-{i}")
            async with conn.transaction():
                check("prepared fetchval (txn)", await stmt.fetchval("b", i), f"b-{i}")
                await conn.execute(
                    "INSERT INTO kv (k, v, mood) VALUES ($1, $2, $3)",
                    key,
                    f"v{key}",
                    MOODS[i % 3],
                )
            check("prepared fetchval (after)", await stmt.fetchval("c", i), f"c-{i}")
        else:
            # executemany: one statement bound many times in one transaction.
            await conn.executemany(
                "INSERT INTO kv (k, v, mood) VALUES ($1, $2, $3)",
                [(key, f"v{key}", MOODS[i % 3])],
            )
            n = await conn.fetchval("SELECT count(*) FROM kv WHERE k <= $1 AND k >= $2", key, key)
            check("count after executemany", n, 1)
            seen.add(await conn.fetchval("SELECT pg_backend_pid()"))
    # Through the pool's own helpers (acquire + run + release).
    check("pool.fetchval", await pool.fetchval("SELECT $1::int * 2", i), i * 2)


class _Rollback(Exception):
    pass


async def forced_switches(pool, rounds=20):
    """Deterministic server switches (tidepool has 2 servers, nothing else runs now).

    `a` runs a statement outside a transaction, so its server goes back to the idle list;
    `b` opens a transaction and takes that server; `a`'s next statements (from its statement
    cache, prepared on whichever server it had) must then run on the other server. Returns the
    backends `a` ran on.
    """
    seen = set()
    async with pool.acquire() as a, pool.acquire() as b:
        for i in range(rounds):
            first = await a.fetchval("SELECT pg_backend_pid()")
            async with b.transaction():
                held = await b.fetchval("SELECT pg_backend_pid()")
                check("fetchval (switched)", await a.fetchval("SELECT $1::int + 1", i), i + 1)
                row = await a.fetchrow("SELECT v, mood FROM kv WHERE k = $1", 10_000 + i)
                check("fetchrow (switched)", (row["v"], row["mood"]), (f"v{10_000 + i}", MOODS[i % 3]))
                now = await a.fetchval("SELECT pg_backend_pid()")
                if now == held:
                    raise AssertionError(f"a ran on {now}, the server b holds in a transaction")
            seen.update((first, now))
    return seen


async def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    host, port, dbname = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    user = sys.argv[4] if len(sys.argv) > 4 else "postgres"
    log(f"asyncpg {asyncpg.__version__}, pool of {POOL}, {OPS} operations via {host}:{port}")

    conn = await asyncpg.connect(host=host, port=port, user=user, database=dbname, ssl=False)
    try:
        await conn.execute(
            """
            DO $$ BEGIN
                CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
            EXCEPTION WHEN duplicate_object THEN NULL;
            END $$;
            CREATE TABLE IF NOT EXISTS kv (k int PRIMARY KEY, v text, mood mood);
            TRUNCATE kv;
            """
        )
    finally:
        await conn.close()

    pool = await asyncpg.create_pool(
        host=host,
        port=port,
        user=user,
        database=dbname,
        ssl=False,
        min_size=POOL,
        max_size=POOL,
        statement_cache_size=100,
    )
    pids = {}
    try:
        results = await asyncio.gather(
            *(op(pool, i, pids) for i in range(OPS)), return_exceptions=True
        )
        failures = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
        for i, e in failures[:10]:
            log(f"FAILED op {i}: {type(e).__module__}.{type(e).__name__}: {e}")
            log("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        if failures:
            log(f"FAILED: {len(failures)} of {OPS} operations")
            return 1

        async with pool.acquire() as conn:
            total = await conn.fetchval("SELECT count(*) FROM kv")
            check("total rows", total, OPS)
            bad = await conn.fetchval("SELECT count(*) FROM kv WHERE v <> 'v' || k")
            check("rows with a wrong value", bad, 0)
            moods = await conn.fetch("SELECT mood, count(*) AS n FROM kv GROUP BY mood ORDER BY mood")
            check(
                "moods",
                [(r["mood"], r["n"]) for r in moods],
                [(m, sum(1 for i in range(OPS) if MOODS[i % 3] == m)) for m in MOODS],
            )
        moved = sum(1 for s in pids.values() if len(s) > 1)
        log(
            f"backends per pool connection: {[sorted(s) for s in pids.values()]}; "
            f"{moved} of {len(pids)} connections ran transactions on more than one server"
        )

        try:
            seen = await forced_switches(pool)
        except Exception as e:  # noqa: BLE001
            log(f"FAILED forced switches: {type(e).__module__}.{type(e).__name__}: {e}")
            log(traceback.format_exc())
            return 1
        log(f"forced switches: ok, the switching connection ran on {sorted(seen)}")
        if len(seen) < 2:
            log("FAILED: the switching connection stayed on one server; the test proves nothing")
            return 1
    finally:
        await asyncio.wait_for(pool.close(), 30)

    log("OK")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
