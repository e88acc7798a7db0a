#!/usr/bin/env python3
"""report.py - turn a bench/run TSV into Markdown tables (stdout).

    report.py RESULTS.tsv

Sections: one per pgbench workload (per target: median TPS with min and max, mean latency,
failed transactions, pooler CPU µs per transaction, ratios to PgBouncer and to direct, and
to the baseline / to tidepool when the run had the `baseline` (TP_BASELINE) or `tp_timeouts`
(TP_TIMEOUTS=1) targets; for a workload whose rows carry lat_avg_us / lat_p50_us /
lat_p99_us, i.e. L1, a second table with the medians over the rounds of each round's average,
p50 and p99 latency and their ratios to PgBouncer), then, with those targets, a table of tidepool ÷ baseline and
tp_timeouts ÷ tidepool (and tp_defer ÷ tidepool) per workload; the idle-client memory table, the /metrics scrape cost,
and the bars of issue 21 with met/missed (for the workloads the run had: -S 16 and 200
clients at parity, TPS ≥ 0.97× and CPU ≤ 1.03× PgBouncer's; -C -S 16 clients CPU ≤ 0.95× and
TPS ≥ 1.0×; TPC-B TPS ≥ 1.0×; Unix sockets CPU ≤ 1.0× PgBouncer's and ≤ 0.9× tidepool's
over TCP; L1 average latency ≤ 1.0×, p99 shown; RSS per idle client). A pinned run (PIN_CPUS / PIN_SWEEP)
writes `meta pin` rows (clients = number of CPUs, note = cpus=LIST;workers=N): they label
the targets with their CPUs and add a "Pooler cores" table, TPS of each pinned tidepool
÷ PgBouncer's on one core, per workload. Targets other than direct, pgbouncer
and tidepool are shown after those three, in the order they first appear in the TSV.
Standard library only.
"""

import csv
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "pgbouncer", "tidepool"]  # always first, in this order
LABEL = {
    "direct": "direct Postgres",
    "pgbouncer": "PgBouncer",
    "tidepool": "tidepool",
    "baseline": "tidepool baseline (TP_BASELINE)",
    "tp_timeouts": "tidepool, 3 timeouts on",
    "tp_defer": "tidepool, tcp_defer_accept on",
    "floor": "floor (examples/floor.rs: tokio, no pooler logic)",
}
WORKLOADS = {
    "S16": "-S -c 16",
    "S200": "-S -c 200",
    "TPCB16": "TPC-B (default script) -c 16",
    "CS16": "-C -S -c 16 (new connection per transaction)",
    "SL16": "-f set_local.sql -c 16 (BEGIN; SET LOCAL statement_timeout; SELECT; END)",
    "US16": "-S -c 16 over each target's Unix socket",
    "L1": "-S -c 1 -j 1 (one client: latency)",
}
# (numerator, denominator) of the extra ratio columns, shown when the run has the target.
PAIRS = [("tidepool", "baseline"), ("tp_timeouts", "tidepool"), ("tp_defer", "tidepool"),
         ("tidepool", "floor")]


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=0):
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fr(x):
    return "n/a" if x is None else f"{x:.2f}×"


def paired_ratio(num_rows, den_rows, key):
    """Per-round ratios num/den of column key (rounds run back to back): 'median (min … max)'."""
    den = {r["round"]: num(r.get(key)) for r in den_rows}
    rs = [ratio(num(r.get(key)), den.get(r["round"])) for r in num_rows]
    rs = [x for x in rs if x is not None]
    if not rs:
        return "n/a"
    return f"{fr(statistics.median(rs))} ({fr(min(rs))} … {fr(max(rs))})"


def main():
    rows = list(csv.DictReader(open(sys.argv[1], newline=""), delimiter="\t"))
    # Pinning (bench/run PIN_CPUS / PIN_SWEEP): `meta pin` rows, clients = number of CPUs,
    # note = cpus=LIST;workers=N. They label the targets and make the pooler-cores table.
    pin = {}
    for r in rows:
        if r["kind"] == "meta" and r["workload"] == "pin":
            kv = dict(x.split("=", 1) for x in (r.get("note") or "").split(";") if "=" in x)
            pin[r["target"]] = {"cores": int(num(r["clients"]) or 0), "cpus": kv.get("cpus", "?"),
                                "workers": kv.get("workers", "?")}
    for t, p in pin.items():
        if t == "pgbouncer":
            LABEL[t] = f"PgBouncer (CPU {p['cpus']})"
        elif t in LABEL or t.startswith("tp_c"):
            base = LABEL.get(t, "tidepool")
            LABEL[t] = (f"{base}, {p['cores']} core{'s' if p['cores'] != 1 else ''} "
                        f"(CPUs {p['cpus']}, workers = {p['workers']})")
    bench = defaultdict(list)  # (workload, mode, target) -> rows
    order = []
    targets = list(TARGETS)  # direct, pgbouncer, tidepool, then any other in TSV order
    for r in rows:
        if r["kind"] in ("pgbench", "memory") and r["target"] not in targets:
            targets.append(r["target"])
    present = {r["target"] for r in rows if r["kind"] == "pgbench"}
    # Extra ratio columns: "÷ baseline" with a baseline, "÷ tidepool" with tp_timeouts or
    # tp_defer (once).
    extra = list(dict.fromkeys(den for n, den in PAIRS if n in present and den in present))
    for r in rows:
        if r["kind"] != "pgbench":
            continue
        key = (r["workload"], r["mode"])
        if key not in order:
            order.append(key)
        bench[(r["workload"], r["mode"], r["target"])].append(r)

    summary = {}  # (workload, mode, target) -> dict
    out = []
    for workload, mode in order:
        out.append(f"### `pgbench {WORKLOADS.get(workload, workload)} -M {mode}`\n")
        out.append("| target | runs | TPS median | TPS min | TPS max | latency avg (ms) | failed | pooler CPU µs/txn | user / kernel µs/txn | TPS ÷ PgBouncer | TPS ÷ direct | CPU ÷ PgBouncer |"
                   + "".join(f" TPS ÷ {d} | CPU ÷ {d} |" for d in extra))
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(extra))
        stats = {}
        for t in targets:
            rs = bench.get((workload, mode, t), [])
            if not rs:
                continue
            tps = [num(r["tps"]) for r in rs]
            tps_ok = [x for x in tps if x is not None]
            lat = [num(r["latency_ms"]) for r in rs]
            s = {
                "runs": len(rs),
                "tps": med(tps),
                "min": min(tps_ok) if tps_ok else None,
                "max": max(tps_ok) if tps_ok else None,
                "lat": statistics.mean([x for x in lat if x is not None]) if any(x is not None for x in lat) else None,
                "failed": sum(int(num(r["failed"]) or 0) for r in rs),
                "bad_rc": sum(1 for r in rs if r["rc"] not in ("0", "")),
                "cpu": med([num(r["cpu_us_per_txn"]) for r in rs]),
                # The same split into user and kernel time (medians; absent in older TSVs).
                "usr": med([num(r.get("cpu_user_us_per_txn")) for r in rs]),
                "sys": med([num(r.get("cpu_sys_us_per_txn")) for r in rs]),
                # From pgbench --log (workloads that log each transaction, e.g. L1): the
                # medians over the rounds of each round's average, p50 and p99, in µs.
                "lat_avg": med([num(r.get("lat_avg_us")) for r in rs]),
                "lat_p50": med([num(r.get("lat_p50_us")) for r in rs]),
                "lat_p99": med([num(r.get("lat_p99_us")) for r in rs]),
            }
            stats[t] = s
            summary[(workload, mode, t)] = s
        for t, s in stats.items():
            pb, d = stats.get("pgbouncer"), stats.get("direct")
            failed = str(s["failed"]) + (f" ({s['bad_rc']} runs rc≠0)" if s["bad_rc"] else "")
            cells = ""
            for den in extra:
                e = stats.get(den)
                cells += (f" {fr(ratio(s['tps'], e['tps'])) if e else 'n/a'} |"
                          f" {'—' if t == 'direct' else fr(ratio(s['cpu'], e['cpu'])) if e else 'n/a'} |")
            out.append(
                f"| {LABEL.get(t, t)} | {s['runs']} | {f(s['tps'])} | {f(s['min'])} | {f(s['max'])} | {f(s['lat'], 3)} | {failed} | "
                f"{f(s['cpu'], 1) if t != 'direct' else '—'} | "
                f"{f(s['usr'], 1) + ' / ' + f(s['sys'], 1) if t != 'direct' else '—'} | "
                f"{fr(ratio(s['tps'], pb['tps'])) if pb else 'n/a'} | {fr(ratio(s['tps'], d['tps'])) if d else 'n/a'} | "
                f"{fr(ratio(s['cpu'], pb['cpu'])) if pb and t != 'direct' else '—'} |" + cells
            )
        out.append("")
        if any(s["lat_avg"] is not None for s in stats.values()):
            out.append(f"Latency per transaction, `{workload} -M {mode}` (µs, from `pgbench --log`: each "
                       "round's average, p50 and p99 over all its transactions, then the median over "
                       "the rounds; per round: the median (min … max) of the ratios of rounds run back "
                       "to back):\n")
            out.append("| target | runs | avg µs | p50 µs | p99 µs | avg ÷ PgBouncer | p99 ÷ PgBouncer | "
                       "avg ÷ PgBouncer per round | p99 ÷ PgBouncer per round |")
            out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            pbr = bench.get((workload, mode, "pgbouncer"), [])
            for t, s in stats.items():
                pb = stats.get("pgbouncer")
                rs = bench[(workload, mode, t)]
                both = pb and t != "pgbouncer"
                out.append(
                    f"| {LABEL.get(t, t)} | {s['runs']} | {f(s['lat_avg'], 1)} | {f(s['lat_p50'])} | {f(s['lat_p99'])} | "
                    f"{fr(ratio(s['lat_avg'], pb['lat_avg'])) if pb else 'n/a'} | "
                    f"{fr(ratio(s['lat_p99'], pb['lat_p99'])) if pb else 'n/a'} | "
                    f"{paired_ratio(rs, pbr, 'lat_avg_us') if both else '—'} | "
                    f"{paired_ratio(rs, pbr, 'lat_p99_us') if both else '—'} |"
                )
            out.append("")

    # Pooler cores: PgBouncer (one thread, one CPU) against each pinned tidepool, per workload.
    cored = sorted((p["cores"], t) for t, p in pin.items()
                   if t not in ("pgbouncer", "postgres+pgbench") and t in present)
    if pin and cored:
        rest = pin.get("postgres+pgbench")
        out.append("### Pooler cores (taskset)\n")
        out.append(f"Each pooler pinned with taskset (the targets take turns, one at a time), Postgres and pgbench to the other "
                   f"{rest['cores'] if rest else '?'} (CPUs {rest['cpus'] if rest else '?'}). "
                   "TPS medians; in brackets the ratio to PgBouncer on one core.\n")
        out.append("| workload | mode | PgBouncer, 1 core | " +
                   " | ".join(LABEL.get(t, t) for _, t in cored) + " |")
        out.append("|---|---|---:|" + "---:|" * len(cored))
        for workload, mode in order:
            pb = summary.get((workload, mode, "pgbouncer"))
            cells = []
            for _, t in cored:
                s = summary.get((workload, mode, t))
                cells.append(f"{f(s['tps'])} ({fr(ratio(s['tps'], pb['tps'])) if pb else 'n/a'})" if s else "n/a")
            out.append(f"| {workload} | {mode} | {f(pb['tps']) if pb else 'n/a'} | " + " | ".join(cells) + " |")
        out.append("")

    # This build against the baseline, and the cost of the timeouts.
    pairs = [(n, den) for n, den in PAIRS if n in present and den in present]
    if pairs:
        out.append("### " + "; ".join(f"{n} ÷ {den}" for n, den in pairs) + "\n")
        out.append("Ratios of the medians, and the median (min … max) of the per-round ratios "
                   "(the targets of one round run back to back).\n")
        out.append("| workload | mode | ratio | TPS (medians) | TPS per round | CPU µs/txn (medians) | CPU µs/txn per round |")
        out.append("|---|---|---|---:|---:|---:|---:|")
        for workload, mode in order:
            for n, den in pairs:
                a, b = summary.get((workload, mode, n)), summary.get((workload, mode, den))
                if not a or not b:
                    continue
                na, nb = bench[(workload, mode, n)], bench[(workload, mode, den)]
                out.append(f"| {workload} | {mode} | {n} ÷ {den} | {fr(ratio(a['tps'], b['tps']))} | "
                           f"{paired_ratio(na, nb, 'tps')} | {fr(ratio(a['cpu'], b['cpu']))} | "
                           f"{paired_ratio(na, nb, 'cpu_us_per_txn')} |")
        out.append("")

    # Memory.
    mem = defaultdict(dict)  # target -> clients -> row
    for r in rows:
        if r["kind"] == "memory":
            mem[r["target"]][int(r["clients"])] = r
    per_client = {}
    if mem:
        counts = sorted({c for t in mem for c in mem[t] if c > 0})
        out.append("### Memory: RSS with idle logged-in clients\n")
        out.append("| target | RSS, 0 clients (KiB) | " + " | ".join(f"RSS, {c:,} (KiB) | KiB/client @ {c:,}" for c in counts) + " |")
        out.append("|---|---:|" + "---:|---:|" * len(counts))
        for t in targets:
            if t not in mem:
                continue
            base = num(mem[t].get(0, {}).get("rss_kib"))
            cells = [LABEL.get(t, t), f(base)]
            for c in counts:
                r = mem[t].get(c)
                rss = num(r["rss_kib"]) if r else None
                kib = (rss - base) / c if rss is not None and base is not None else None
                per_client[(t, c)] = kib
                note = f" ({r['note']})" if r and r.get("note") and "failed=0" not in r["note"] else ""
                if r and "NOT_READY" in (r.get("note") or ""):
                    kib = None  # the clients never all logged in: no valid figure
                cells += [f(rss) + note, f(kib, 2)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("\nKiB/client = (RSS with N clients − RSS with 0 clients) / N; RSS = VmRSS of the pooler process.\n")

    # Scrape cost.
    scr = defaultdict(list)
    for r in rows:
        if r["kind"] == "scrape":
            scr[r["workload"]].append(r)
    scrape_diff = None
    if scr:
        out.append("### Cost of scraping `/metrics` every 100 ms (tidepool, `pgbench -S -c 16 -M simple`)\n")
        out.append("| variant | runs | TPS median | TPS min | TPS max | tidepool CPU µs/txn | scrapes per run (median) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        med_tps = {}
        for v in ("no_scrape", "scrape"):
            rs = scr.get(v, [])
            if not rs:
                continue
            tps = [num(r["tps"]) for r in rs]
            tps_ok = [x for x in tps if x is not None]
            med_tps[v] = med(tps)
            notes = [dict(kv.split("=", 1) for kv in r["note"].split(";") if "=" in kv) for r in rs]
            scrapes = med([num(n.get("scrapes")) for n in notes])
            out.append(f"| {'with scraping' if v == 'scrape' else 'without scraping'} | {len(rs)} | {f(med(tps))} | "
                       f"{f(min(tps_ok) if tps_ok else None)} | {f(max(tps_ok) if tps_ok else None)} | "
                       f"{f(med([num(r['cpu_us_per_txn']) for r in rs]), 1)} | {f(scrapes) if v == 'scrape' else '—'} |")
        if "scrape" in med_tps and "no_scrape" in med_tps and med_tps["no_scrape"]:
            scrape_diff = (med_tps["scrape"] - med_tps["no_scrape"]) / med_tps["no_scrape"] * 100
            # Per-round paired differences are less sensitive to drift in background load.
            by_round = defaultdict(dict)
            for v, rs in scr.items():
                for r in rs:
                    by_round[r["round"]][v] = num(r["tps"])
            paired = [(d["scrape"] - d["no_scrape"]) / d["no_scrape"] * 100 for d in by_round.values()
                      if d.get("scrape") and d.get("no_scrape")]
            out.append(f"\nThroughput with scraping vs without: **{scrape_diff:+.1f}%** (medians); "
                       f"per-round paired differences: median {statistics.median(paired):+.1f}%, "
                       f"range {min(paired):+.1f}% … {max(paired):+.1f}%.\n")

    # Targets.
    out.append("### Targets\n")
    out.append("| target | measured | verdict |")
    out.append("|---|---|---|")

    def get(w, m, t, k):
        s = summary.get((w, m, t))
        return s[k] if s else None

    def verdict(val, limit, higher_is_better):
        if val is None:
            return "n/a"
        ok = val >= limit if higher_is_better else val <= limit
        rel = (val / limit - 1) * 100 if limit else 0
        return f"**met** ({rel:+.0f}% vs limit)" if ok else f"**missed** ({rel:+.0f}% vs limit)"

    modes = sorted({m for (_, m) in order}, key=["simple", "extended", "prepared"].index)
    # The bars of issue 21 (the earlier 0.7× CPU and 1.1× TPS targets are withdrawn there):
    # parity in the steady state, a cheaper login, Unix sockets, one client's latency.
    # A row is printed only when the run has its workload.
    def row(label, val, limit, higher_is_better):
        out.append(f"| {label} | {fr(val)} | {verdict(val, limit, higher_is_better)} |")

    def tp_pb(w, m, k):
        return ratio(get(w, m, "tidepool", k), get(w, m, "pgbouncer", k))

    ran = {w for (w, _) in order}
    for w, tps_min, cpu_max, what in (("S16", 0.97, 1.03, "steady state, parity"),
                                      ("S200", 0.97, 1.03, "steady state, parity"),
                                      ("CS16", 1.0, 0.95, "a login per transaction")):
        if w not in ran:
            continue
        for m in modes:
            name = WORKLOADS[w].split(" (")[0]
            row(f"TPS ≥ {tps_min}× PgBouncer, {name}, -M {m} ({what})", tp_pb(w, m, "tps"), tps_min, True)
            row(f"CPU/txn ≤ {cpu_max}× PgBouncer, {name}, -M {m} ({what})", tp_pb(w, m, "cpu"), cpu_max, False)
    if "TPCB16" in ran:
        for m in modes:
            row(f"TPS ≥ 1.0× PgBouncer, TPC-B -c 16, -M {m}", tp_pb("TPCB16", m, "tps"), 1.0, True)
    if "US16" in ran:
        for m in modes:
            row(f"CPU/txn ≤ 1.0× PgBouncer's on its own socket, -S -c 16 over Unix sockets, -M {m}",
                tp_pb("US16", m, "cpu"), 1.0, False)
            row(f"CPU/txn over the Unix socket ≤ 0.9× tidepool's over TCP (US16 ÷ S16), -M {m}",
                ratio(get("US16", m, "tidepool", "cpu"), get("S16", m, "tidepool", "cpu")), 0.9, False)
    if "L1" in ran:
        for m in modes:
            row(f"average latency ≤ 1.0× PgBouncer's, one client (L1), -M {m}", tp_pb("L1", m, "lat_avg"), 1.0, False)
            p99 = tp_pb("L1", m, "lat_p99")
            out.append(f"| p99 latency vs PgBouncer's, one client (L1), -M {m} (no bar) | {fr(p99)} | — |")
    for (t, c), kib in sorted(per_client.items()):
        if t != "tidepool":
            continue
        pb = per_client.get(("pgbouncer", c))
        out.append(f"| RSS/idle client ≤ PgBouncer's, {c:,} clients | tidepool {f(kib, 2)} KiB vs PgBouncer {f(pb, 2)} KiB | "
                   f"{verdict(kib, pb, False) if pb is not None and pb > 0 else 'n/a'} |")
        out.append(f"| RSS/idle client ≤ 2 KiB, {c:,} clients | {f(kib, 2)} KiB | {verdict(kib, 2.0, False)} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
