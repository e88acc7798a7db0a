#!/usr/bin/env python3
"""Write the seed corpora in fuzz/corpus/<target>/: a few valid (and nearly valid)
inputs per target, in the layout each target's body (src/harness.rs) expects.

Run from anywhere: python3 fuzz/seeds.py. It rewrites the seed files it owns (seed-*)
and leaves every other file alone.
"""
import base64
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def cstr(s):
    return (s.encode() if isinstance(s, str) else s) + b"\0"


def msg(tag, body):
    return tag + struct.pack(">I", len(body) + 4) + body


def startup_body(pairs):
    out = struct.pack(">i", 196608)
    for k, v in pairs:
        out += cstr(k) + cstr(v)
    return out + b"\0"


def packet(body):
    return struct.pack(">I", len(body) + 4) + body


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- startup_packet: a body, or a whole packet (length word first) ----
t = "startup_packet"
write(t, "user-db", startup_body([("user", "app"), ("database", "appdb")]))
write(t, "psql", startup_body([("user", "postgres"), ("database", "bench"),
                               ("application_name", "psql"), ("client_encoding", "UTF8")]))
write(t, "options", startup_body([("user", "app"), ("options",
      "-c statement_timeout=5s --search-path=a,b -cwork_mem=4MB -c application_name=a\\ b")]))
write(t, "replication", startup_body([("user", "app"), ("replication", "database")]))
write(t, "pq-ext", startup_body([("user", "app"), ("_pq_.command_set", "x")]))
write(t, "ssl", struct.pack(">i", 80877103))
write(t, "gssenc", struct.pack(">i", 80877104))
write(t, "cancel", struct.pack(">iii", 80877102, 4242, -17))
write(t, "packet", packet(startup_body([("user", "app"), ("options", "-c search_path=x")])))
write(t, "v2", struct.pack(">i", 0x00020000) + b"user\0x\0\0")
write(t, "options-only", b"-c a=b --c-d=e -cf=g\\ h")

# ---- client_framing: [limit scale, limit hi, limit lo, read size] + client stream ----
t = "client_framing"
q = msg(b"Q", cstr("SELECT 1"))
ext = (msg(b"P", cstr("s1") + cstr("SELECT $1::int") + struct.pack(">hi", 1, 23))
       + msg(b"B", cstr("") + cstr("s1") + struct.pack(">hhi", 0, 1, 1) + b"7"
             + struct.pack(">h", 0))
       + msg(b"D", b"S" + cstr("s1"))
       + msg(b"D", b"P" + cstr(""))
       + msg(b"E", cstr("") + struct.pack(">i", 0))
       + msg(b"C", b"S" + cstr("s1"))
       + msg(b"H", b"")
       + msg(b"S", b""))
write(t, "query", bytes([0, 0, 0, 7]) + q)
write(t, "extended", bytes([3, 0, 0, 3]) + ext)
write(t, "deallocate", bytes([2, 0, 1, 50]) + msg(b"Q", cstr("  deallocate prepare all;"))
      + msg(b"Q", cstr("DISCARD ALL")) + msg(b"Q", cstr("DEALLOCATE s1")))
write(t, "copy", bytes([0, 0, 0, 1]) + msg(b"Q", cstr("COPY t FROM STDIN"))
      + msg(b"d", b"1\t2\n") + msg(b"d", b"3\t4\n") + msg(b"c", b"")
      + msg(b"f", cstr("oops")))
write(t, "too-large", bytes([1, 0, 20, 10]) + msg(b"Q", cstr("SELECT '" + "x" * 60 + "'")))
write(t, "bad-length", bytes([0, 0, 0, 2]) + q + b"Q\0\0\0\x02")
write(t, "truncated", bytes([0, 0, 0, 5]) + q + b"Q\0\0\0\x40SELE")
write(t, "terminate", bytes([0, 0, 0, 96]) + q + msg(b"X", b""))
write(t, "function-password", bytes([0, 0, 0, 4]) + msg(b"F", struct.pack(">ihhih", 1, 0, 0, -1, 0))
      + msg(b"p", cstr("secret")))

# ---- scram_exchange: [mode] + mode data (see scram_exchange in src/harness.rs) ----
t = "scram_exchange"
proof = base64.b64encode(bytes(32))
write(t, "m0-libpq-shape", bytes([0]) + b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL\xff"
      + b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=" + proof)
write(t, "m0-y-flag-ext", bytes([0]) + b"y,,n=user,r=abc,x=ext\xffc=eSws,r=abcdef,z=1,p=" + proof)
write(t, "m0-mandatory-ext", bytes([0]) + b"n,,m=ext,n=,r=abc\xff")
write(t, "m0-channel-binding", bytes([0]) + b"p=tls-server-end-point,,n=,r=abc\xff")
write(t, "m0-authzid", bytes([0]) + b"n,a=bob,n=,r=abc\xff")
write(t, "m1-final", bytes([1]) + b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL,p=" + proof)
write(t, "m2-proof", bytes([2]) + b",p=" + proof)
write(t, "m2-ext-proof", bytes([2]) + b",x=1,p=" + proof)
write(t, "m3-genuine", bytes([3]))
write(t, "m3-flip", bytes([3]) + bytes(40) + b"\x01")
write(t, "m4-order", bytes([4]) + b"n,,n=,r=abc\xffc=biws,r=abc,p=" + proof)

# ---- server_messages: a body, or a stream of backend messages ----
t = "server_messages"
err = b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"x\"\0Fauth.c\0L335\0\0"
write(t, "error-body", err)
write(t, "parameter-status-body", cstr("TimeZone") + cstr("Etc/UTC"))
login = (msg(b"R", struct.pack(">i", 10) + cstr("SCRAM-SHA-256") + b"\0")
         + msg(b"R", struct.pack(">i", 11) + b"r=abc,s=c2FsdA==,i=4096")
         + msg(b"R", struct.pack(">i", 12) + b"v=" + proof)
         + msg(b"R", struct.pack(">i", 0))
         + msg(b"S", cstr("server_version") + cstr("15.8"))
         + msg(b"S", cstr("client_encoding") + cstr("UTF8"))
         + msg(b"K", struct.pack(">ii", 1234, 5678))
         + msg(b"Z", b"I"))
write(t, "login", login)
write(t, "query-reply", msg(b"T", struct.pack(">h", 1) + cstr("x") + struct.pack(">ihihih", 0, 0, 23, 4, -1, 0))
      + msg(b"D", struct.pack(">hi", 1, 1) + b"1") + msg(b"C", cstr("SELECT 1"))
      + msg(b"N", b"SWARNING\0C01000\0Mhello\0\0") + msg(b"A", struct.pack(">i", 7) + cstr("ch") + cstr("p"))
      + msg(b"E", err) + msg(b"Z", b"E"))
write(t, "extended-reply", msg(b"1", b"") + msg(b"2", b"") + msg(b"t", struct.pack(">hi", 1, 23))
      + msg(b"n", b"") + msg(b"s", b"") + msg(b"I", b"") + msg(b"3", b"") + msg(b"Z", b"T"))
write(t, "copy-reply", msg(b"G", struct.pack(">bh", 0, 0)) + msg(b"H", struct.pack(">bh", 0, 0))
      + msg(b"d", b"1\n") + msg(b"c", b"") + msg(b"Z", b"I"))
write(t, "bad-length", msg(b"Z", b"I") + b"E\0\0\0\x01")
