#!/usr/bin/env python3
"""idle_clients.py - hold N idle, logged-in PostgreSQL client connections open.

Used by bench/run to measure a pooler's memory per idle client.

    idle_clients.py --port PORT [--host 127.0.0.1] [--user postgres] [--db DBNAME]
                    --count N [--concurrency 200] [--timeout 120]

Opens N TCP connections to HOST:PORT, sends a StartupMessage (protocol 3.0 = 196608,
user, database) on each and reads until ReadyForQuery ('Z'). At most --concurrency
logins are in flight at once (so the pooler's listen backlog and login timeout are not
the thing being measured). Only trust authentication is supported (AuthenticationOk);
any other authentication request or an ErrorResponse counts as a failed login.

When every login has finished it prints one line to stdout:

    ready ok=N failed=F

and then keeps the connections open, idle, until stdin reaches EOF (or SIGTERM/SIGINT).
Then it sends Terminate on each connection still open, closes them and prints

    done closed_by_peer=K

where K is how many connections the server closed while they were idle.
Exit status: 0 if every login succeeded, 1 otherwise. Standard library only.
"""

import argparse
import asyncio
import resource
import signal
import struct
import sys
import threading


def raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(max(need, soft), hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            print(f"idle_clients: cannot raise fd limit to {want}: {e}", file=sys.stderr)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        print(f"idle_clients: fd limit {soft} < {need} needed; logins will fail", file=sys.stderr)


def startup_message(user, database):
    body = struct.pack("!I", 196608)
    for k, v in (("user", user), ("database", database), ("application_name", "idle_clients")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


async def login(host, port, startup, timeout):
    """Return (reader, writer) of a logged-in connection, or raise."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(startup)
        await writer.drain()
        while True:
            head = await asyncio.wait_for(reader.readexactly(5), timeout)
            kind, length = head[0:1], struct.unpack("!I", head[1:5])[0]
            body = await asyncio.wait_for(reader.readexactly(length - 4), timeout)
            if kind == b"R":
                code = struct.unpack("!I", body[:4])[0]
                if code != 0:
                    raise RuntimeError(f"server asks for authentication (code {code}); only trust is supported")
            elif kind == b"E":
                fields = dict((f[0:1], f[1:].decode(errors="replace")) for f in body.split(b"\0") if f)
                raise RuntimeError(f"ErrorResponse {fields.get(b'C', '?')}: {fields.get(b'M', '?')}")
            elif kind == b"Z":
                return reader, writer
            # 'S' ParameterStatus, 'K' BackendKeyData, 'N' NoticeResponse: ignore
    except BaseException:
        writer.close()
        raise


async def watch(reader, state):
    """Wait until the server closes an idle connection (or we are cancelled)."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                state["closed_by_peer"] += 1
                return
    except (ConnectionError, OSError):
        state["closed_by_peer"] += 1


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--db", default="postgres")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=120.0, help="per connect/read, seconds")
    args = ap.parse_args()

    raise_fd_limit(args.count + 64)
    startup = startup_message(args.user, args.db)
    sem = asyncio.Semaphore(args.concurrency)
    conns = []
    errors = {}

    async def one():
        async with sem:
            try:
                conns.append(await login(args.host, args.port, startup, args.timeout))
            except Exception as e:  # noqa: BLE001 - every failure is just counted
                msg = f"{type(e).__name__}: {e}"
                errors[msg] = errors.get(msg, 0) + 1

    await asyncio.gather(*(one() for _ in range(args.count)))
    failed = args.count - len(conns)
    for msg, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]:
        print(f"idle_clients: {n} logins failed: {msg}", file=sys.stderr)
    print(f"ready ok={len(conns)} failed={failed}", flush=True)

    state = {"closed_by_peer": 0}
    watchers = [asyncio.ensure_future(watch(r, state)) for r, _ in conns]

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def stdin_eof():
        try:
            sys.stdin.buffer.read()  # blocks until EOF
        except Exception:  # noqa: BLE001
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=stdin_eof, daemon=True).start()
    await stop.wait()

    closed = state["closed_by_peer"]
    for w in watchers:
        w.cancel()
    terminate = b"X\0\0\0\4"
    for _, writer in conns:
        try:
            if not writer.is_closing():
                writer.write(terminate)
            writer.close()
        except Exception:  # noqa: BLE001
            pass
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    print(f"done closed_by_peer={closed}", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    try:
        rc = asyncio.run(main())
    except KeyboardInterrupt:
        rc = 130
    sys.exit(rc)
