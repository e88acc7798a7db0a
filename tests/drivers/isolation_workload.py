#!/usr/bin/env python3
"""Session isolation through tidepool's transaction mode, with real drivers (run by
tests/drivers.rs against a pool of ONE server, so every connection lands on the same server).

Usage: isolation_workload.py HOST PORT DBNAME [USER]

For each driver, connection A makes its session read-only (and sets a statement timeout and
a custom setting), then connection B, on the same server, must be able to write and must
see none of A's settings, while A keeps them for its whole session:
- psycopg 2: set_session(readonly=True, autocommit=True) (psycopg2 then SETs
  default_transaction_read_only for the session);
- psycopg 3: autocommit, SET default_transaction_read_only / statement_timeout;
- asyncpg: the same SETs through its own protocol handling.

Exits 0 when every check held, 1 (with the reason) otherwise.
"""

import asyncio
import sys
import traceback

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors


def log(*args):
    print(*args, flush=True)


def check(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def psycopg2_case(conninfo):
    a = psycopg2.connect(conninfo)
    a.set_session(readonly=True, autocommit=True)
    ca = a.cursor()
    ca.execute("SET statement_timeout = '1234ms'")
    ca.execute("SHOW default_transaction_read_only")
    check("psycopg2 A read-only", ca.fetchone()[0], "on")

    b = psycopg2.connect(conninfo)
    b.autocommit = True
    cb = b.cursor()
    cb.execute("CREATE TABLE p2_b (x int)")
    cb.execute("INSERT INTO p2_b VALUES (1)")
    cb.execute("SHOW default_transaction_read_only")
    check("psycopg2 B read-only", cb.fetchone()[0], "off")
    cb.execute("SHOW statement_timeout")
    check("psycopg2 B statement_timeout", cb.fetchone()[0], "0")

    ca.execute("SHOW statement_timeout")
    check("psycopg2 A statement_timeout", ca.fetchone()[0], "1234ms")
    try:
        ca.execute("INSERT INTO p2_b VALUES (2)")
        raise AssertionError("psycopg2 A wrote in a read-only session")
    except psycopg2.errors.ReadOnlySqlTransaction:
        pass
    a.close()
    cb.execute("SELECT count(*) FROM p2_b")
    check("psycopg2 rows", cb.fetchone()[0], 1)
    b.close()
    log("psycopg2: ok")


def psycopg3_case(conninfo):
    with psycopg.connect(conninfo, autocommit=True) as a, psycopg.connect(
        conninfo, autocommit=True
    ) as b:
        a.execute("SET default_transaction_read_only = on")
        a.execute("SET app.tenant = 'a'")
        b.execute("CREATE TABLE p3_b (x int)")
        b.execute("INSERT INTO p3_b VALUES (1)")
        check(
            "psycopg3 B tenant",
            b.execute("SELECT coalesce(current_setting('app.tenant', true), '')").fetchone()[0],
            "",
        )
        check(
            "psycopg3 B read-only",
            b.execute("SHOW default_transaction_read_only").fetchone()[0],
            "off",
        )
        check("psycopg3 A tenant", a.execute("SELECT current_setting('app.tenant')").fetchone()[0], "a")
        try:
            a.execute("INSERT INTO p3_b VALUES (2)")
            raise AssertionError("psycopg3 A wrote in a read-only session")
        except psycopg.errors.ReadOnlySqlTransaction:
            pass
        # A non-autocommit connection: psycopg's implicit BEGIN on the same server.
        with psycopg.connect(conninfo) as c:
            c.execute("INSERT INTO p3_b VALUES (3)")
            c.commit()
        check("psycopg3 rows", b.execute("SELECT count(*) FROM p3_b").fetchone()[0], 2)
    log("psycopg3: ok")


async def asyncpg_case(host, port, db, user):
    a = await asyncpg.connect(host=host, port=port, database=db, user=user)
    b = await asyncpg.connect(host=host, port=port, database=db, user=user)
    try:
        await a.execute("SET default_transaction_read_only = on")
        await a.execute("SET statement_timeout = '2s'")
        await b.execute("CREATE TABLE apg_b (x int)")
        await b.execute("INSERT INTO apg_b VALUES ($1)", 1)
        check("asyncpg B read-only", await b.fetchval("SHOW default_transaction_read_only"), "off")
        check("asyncpg B statement_timeout", await b.fetchval("SHOW statement_timeout"), "0")
        check("asyncpg A statement_timeout", await a.fetchval("SHOW statement_timeout"), "2s")
        try:
            await a.execute("INSERT INTO apg_b VALUES ($1)", 2)
            raise AssertionError("asyncpg A wrote in a read-only session")
        except asyncpg.exceptions.ReadOnlySQLTransactionError:
            pass
        check("asyncpg rows", await b.fetchval("SELECT count(*) FROM apg_b"), 1)
    finally:
        await a.close()
        await b.close()
    log("asyncpg: ok")


def main():
    host, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    user = sys.argv[4] if len(sys.argv) > 4 else "postgres"
    conninfo = f"host={host} port={port} dbname={db} user={user} connect_timeout=10"
    try:
        psycopg2_case(conninfo)
        psycopg3_case(conninfo)
        asyncio.run(asyncpg_case(host, port, db, user))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
