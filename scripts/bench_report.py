#!/usr/bin/env python3
"""Turns the output of scripts/bench.sh into markdown tables and hand-written SVG charts. Standard library only.

usage: bench_report.py DIR

Reads DIR/results.jsonl (tagged RESULT lines) and DIR/meta.json (date, machine, commit, knobs). Writes, when the
comparison ran: DIR/results.md (main table, targets, both curves as tables), DIR/chart.svg (bars),
DIR/rss_curve.svg (idle RSS per session against sessions) and DIR/cpu_curve.svg (proxy CPU per echoed message
against message rate); when the feature runs ran: DIR/features.md.
"""

import json
import math
import os
import statistics
import sys
from html import escape

TARGETS = ["direct", "ws_gateway", "haproxy", "nginx"]
PROXIES = ["ws_gateway", "haproxy", "nginx"]
NAMES = {"direct": "direct", "ws_gateway": "ws-gateway", "haproxy": "HAProxy", "nginx": "nginx"}
COLORS = {"direct": "#9e9e9e", "ws_gateway": "#1f77b4", "haproxy": "#d62728", "nginx": "#2ca02c"}
# What each feature configuration turns on (scripts/bench.sh, feature_config); the exact flags are listed too.
FEATURE_TEXT = {
    "baseline": "as in the comparison: TLS, RS256 JWT, one upstream",
    "redis": "`--redis-url` (revocations shared through a private Redis)",
    "limits": "redis + `--rate-limit-per-second`/`--rate-limit-burst` 1,000,000, `--max-sessions-per-subject` "
              "100,000, `--ws-message-rate-per-second` 1,000,000, `--handshake-rate-per-ip` 1,000,000",
    "upstreams": "three `ws-loadgen echo` upstreams in `--upstream-ws-url` (least connections)",
    "all": "redis + limits + upstreams",
}


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def pick(rows, target, label):
    for r in rows:
        if r["target"] == target and r["label"] == label:
            return r
    return None


def value(rows, target, label, field):
    r = pick(rows, target, label)
    return None if r is None else r.get(field)


def median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def runs(rows, target, prefix):
    return [r for r in rows if r["target"] == target and r["label"].startswith(prefix)]


def median_of(rows, target, prefix, field):
    return median(r.get(field) for r in runs(rows, target, prefix))


def median_fn(rows, target, prefix, fn):
    return median(fn(r) for r in runs(rows, target, prefix))


def all_of(rows, target, prefix, field):
    vals = [r[field] for r in runs(rows, target, prefix)]
    return " / ".join(fmt(v) for v in vals) if vals else "–"


def us_per_msg(r):
    """Proxy CPU µs per echoed message: the CPU over the measured window / the echoes measured in it."""
    cpu, n = r.get("proxy_cpu_s"), r.get("measured")
    return None if cpu is None or not n else cpu / n * 1e6


def ms_per_hs(r):
    """Proxy CPU ms per handshake: the CPU over the run / the handshakes completed."""
    cpu, n = r.get("proxy_cpu_s"), r.get("ok")
    return None if cpu is None or not n else cpu / n * 1e3


def store_ms_per_hs(r):
    cpu, n = r.get("store_cpu_s"), r.get("ok")
    return None if cpu is None or not n else cpu / n * 1e3


def delivered(r):
    n, d = r.get("measured"), r.get("duration_s")
    return None if n is None or not d else n / d


def bulk_cpu_per_gb(r):
    cpu = r.get("proxy_cpu_s")
    return None if cpu is None else cpu / (r["bytes"] / 1e9)


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def delta(v, base, digits):
    if v is None or base is None:
        return "–"
    d = v - base
    pct = f" ({d / base * 100:+.0f}%)" if base else ""
    return f"{d:+.{digits}f}{pct}"


def header(meta, title):
    """The title and the run's date, machine and commit."""
    out = [title + (" (QUICK smoke run: numbers are not meaningful)" if meta.get("quick") else ""), ""]
    commit = meta.get("commit") or "unknown"
    if meta.get("dirty"):
        commit += " with uncommitted changes"
    binaries = (f"binaries built elsewhere (`SKIP_BUILD=1`; ws-gateway {meta.get('gateway_built')}, "
                f"ws-loadgen {meta.get('loadgen_built')})" if meta.get("skip_build")
                else f"binaries built by this run ({meta.get('gateway_built')})")
    subject = f" ({meta['commit_subject']})" if meta.get("commit_subject") else ""
    out.append(f"Run {meta.get('date', '?')} on {meta.get('nproc', '?')} CPUs ({meta.get('cpu_model') or '?'}), "
               f"{meta.get('mem_gib', '?')} GiB, Linux {meta.get('kernel', '?')}; commit `{commit}`{subject}; "
               f"{binaries}.")
    out.append("")
    return out


# ---------------------------------------------------------------------------------------------------------------
# SVG

def nice_step(span, ticks=5):
    raw = span / ticks
    e = 10 ** math.floor(math.log10(raw))
    for f in (1, 2, 2.5, 5, 10):
        if raw <= f * e:
            return f * e
    return 10 * e


def tick_label(v):
    if v >= 1000 and v % 1000 == 0:
        return f"{v / 1000:,.0f}k"
    if v == int(v):
        return f"{int(v):,}"
    return f"{v:g}"


def line_chart(path, title, xlabel, ylabel, series, xlog=False):
    """One line per target: series maps target -> [(x, y)]. x ticks at the measured points."""
    pts = {t: sorted(p) for t, p in series.items() if p}
    if not pts:
        return False
    xs = sorted({x for p in pts.values() for x, _ in p})
    ymax_data = max(y for p in pts.values() for _, y in p)
    step = nice_step(ymax_data * 1.1 if ymax_data > 0 else 1)
    ymax = step * math.ceil((ymax_data * 1.1 if ymax_data > 0 else 1) / step)
    w, h, left, right, top, bottom = 720, 420, 75, 140, 45, 60
    pw, ph = w - left - right, h - top - bottom

    def fx(x):
        if len(xs) == 1:
            return left + pw / 2
        if xlog:
            lo, hi = math.log(xs[0]), math.log(xs[-1])
            return left + pw * (0.05 + 0.9 * (math.log(x) - lo) / (hi - lo))
        return left + pw * x / (xs[-1] * 1.05)

    def fy(y):
        return top + ph - ph * y / ymax

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="24" font-size="15" font-weight="bold">{escape(title)}</text>']
    y = 0.0
    while y <= ymax + 1e-9:
        svg.append(f'<line x1="{left}" y1="{fy(y):.1f}" x2="{left + pw}" y2="{fy(y):.1f}" stroke="#e0e0e0"/>')
        svg.append(f'<text x="{left - 6}" y="{fy(y) + 4:.1f}" text-anchor="end">{escape(tick_label(y))}</text>')
        y += step
    for x in xs:
        svg.append(f'<line x1="{fx(x):.1f}" y1="{top}" x2="{fx(x):.1f}" y2="{top + ph}" stroke="#f0f0f0"/>')
        svg.append(f'<text x="{fx(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{escape(tick_label(x))}</text>')
    svg.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#333"/>')
    svg.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#333"/>')
    svg.append(f'<text x="{left + pw / 2}" y="{h - 14}" text-anchor="middle">{escape(xlabel)}'
               f'{" (log scale)" if xlog else ""}</text>')
    svg.append(f'<text transform="translate(18,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(ylabel)}</text>')
    for i, t in enumerate(t for t in TARGETS if t in pts):
        p = pts[t]
        coords = " ".join(f"{fx(x):.1f},{fy(y):.1f}" for x, y in p)
        svg.append(f'<polyline points="{coords}" fill="none" stroke="{COLORS[t]}" stroke-width="2"/>')
        for x, y in p:
            svg.append(f'<circle cx="{fx(x):.1f}" cy="{fy(y):.1f}" r="4" fill="{COLORS[t]}">'
                       f'<title>{escape(NAMES[t])} @ {x:,}: {escape(fmt(y))}</title></circle>')
        ly = top + 10 + i * 22
        svg.append(f'<line x1="{left + pw + 15}" y1="{ly}" x2="{left + pw + 40}" y2="{ly}" stroke="{COLORS[t]}" '
                   f'stroke-width="3"/>')
        svg.append(f'<text x="{left + pw + 46}" y="{ly + 4}">{escape(NAMES[t])}</text>')
    svg.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")
    return True


def bar_chart(path, title, panels):
    """One panel per headline metric, absolute values, one bar per target."""
    pw, ph, top, bottom, left = 230, 260, 50, 40, 20
    width = left + len(panels) * pw + 10
    height = top + ph + bottom + 30
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    for i, (ptitle, vals) in enumerate(panels):
        x0 = left + i * pw
        svg.append(f'<text x="{x0 + pw / 2 - 10}" y="{top - 8}" text-anchor="middle" font-weight="bold">'
                   f'{escape(ptitle)}</text>')
        present = [(t, vals[t]) for t in TARGETS if vals.get(t) is not None]
        vmax = max((v for _, v in present), default=0) or 1
        bw = (pw - 40) / len(TARGETS)
        base_y = top + ph
        svg.append(f'<line x1="{x0}" y1="{base_y}" x2="{x0 + pw - 20}" y2="{base_y}" stroke="#333"/>')
        for j, t in enumerate(TARGETS):
            v = vals.get(t)
            bx = x0 + 5 + j * bw
            if v is None:
                svg.append(f'<text x="{bx + bw / 2}" y="{base_y - 4}" text-anchor="middle" fill="#999">n/a</text>')
            else:
                h = max(1.0, ph * v / vmax * 0.9)
                svg.append(f'<rect x="{bx:.1f}" y="{base_y - h:.1f}" width="{bw - 6:.1f}" height="{h:.1f}" '
                           f'fill="{COLORS[t]}"/>')
                svg.append(f'<text x="{bx + (bw - 6) / 2:.1f}" y="{base_y - h - 4:.1f}" text-anchor="middle">'
                           f'{escape(fmt(v))}</text>')
            svg.append(f'<text x="{bx + (bw - 6) / 2:.1f}" y="{base_y + 14}" text-anchor="middle" font-size="10">'
                       f'{escape(NAMES[t])}</text>')
    svg.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The comparison: results.md, chart.svg and the two curves

def cpu_curve_points(rows, meta, t):
    """rate -> (µs/message, p99 µs, delivered msg/s, lost, runs) for one proxy."""
    points = {}
    for rate in meta.get("cpu_rates", []):
        rs = runs(rows, t, "latency") if rate == meta.get("cpu_reuse_rate") else \
            [r for r in rows if r["target"] == t and r["label"] == f"cpu{rate}"]
        if rs:
            points[rate] = (median(us_per_msg(r) for r in rs), median(r.get("p99_us") for r in rs),
                            median(delivered(r) for r in rs), sum(r.get("lost", 0) for r in rs), len(rs))
    return points


def comparison(rows, meta, out_dir):
    quick = meta.get("quick")
    hap_v, ngx_v = meta.get("haproxy_version", ""), meta.get("nginx_version", "")
    hs = next((r for r in rows if r["mode"] == "handshakes" and r["target"] in TARGETS), {})
    lat = next((r for r in rows if r["mode"] == "latency" and r["label"].startswith("latency")
                and r["target"] in TARGETS), {})
    bulk = next((r for r in rows if r["mode"] == "bulk"), {})
    lat_runs = len({r["label"] for r in rows if r["label"].startswith("latency") and r["target"] in TARGETS})
    idle_sizes = sorted({r["sessions"] for r in rows if r["mode"] == "idle"})
    idle_small = idle_sizes[0] if idle_sizes else None

    def per_target(fn):
        return {t: fn(t) for t in TARGETS}

    def idle_row(n):
        return {t: value(rows, t, f"idle{n}", "kib_per_session") if t != "direct" else None for t in TARGETS}

    # key -> (name, values per target, digits)
    m = {}
    m["hs_rate"] = (f"Handshakes/s (full TLS 1.3, no resumption, {hs.get('concurrency', '?')} loops) ↑",
                    per_target(lambda t: value(rows, t, "handshakes", "rate")), 1)
    m["hs_per_cpu"] = ("Handshakes per proxy CPU-second ↑",
                       per_target(lambda t: value(rows, t, "handshakes", "per_proxy_cpu_s")), 1)
    m["hs_cpu_ms"] = ("Proxy CPU ms per handshake ↓", per_target(lambda t: median_fn(rows, t, "handshakes", ms_per_hs)),
                      2)
    m["hs_p50"] = ("Handshake (connect→101) p50 ms ↓", per_target(lambda t: value(rows, t, "handshakes", "hs_p50_ms")),
                   1)
    m["hs_p99"] = ("Handshake (connect→101) p99 ms ↓", per_target(lambda t: value(rows, t, "handshakes", "hs_p99_ms")),
                   1)
    m["hs_err"] = ("Handshake errors", per_target(lambda t: value(rows, t, "handshakes", "errors")), 1)
    m["p50"] = (f"Echo latency p50 µs ({lat.get('sessions', '?')} sessions × {fmt(lat.get('rate'))} msg/s, median of "
                f"{lat_runs} runs) ↓", per_target(lambda t: median_of(rows, t, "latency", "p50_us")), 1)
    m["p99"] = ("Echo latency p99 µs (median of runs) ↓", per_target(lambda t: median_of(rows, t, "latency", "p99_us")),
                1)
    m["p999"] = ("Echo latency p99.9 µs (median of runs) ↓",
                 per_target(lambda t: median_of(rows, t, "latency", "p999_us")), 1)
    m["lost"] = ("Echo messages lost (all runs)",
                 per_target(lambda t: sum(r["lost"] for r in runs(rows, t, "latency")) if runs(rows, t, "latency")
                            else None), 1)
    m["lat_cpu"] = (f"Proxy CPU s per {lat.get('duration_s', '?')} s latency window (median) ↓",
                    per_target(lambda t: median_of(rows, t, "latency", "proxy_cpu_s")), 1)
    m["msg_cpu_us"] = ("Proxy CPU µs per echoed message (latency runs, median) ↓",
                       per_target(lambda t: median_fn(rows, t, "latency", us_per_msg)), 1)
    m["lag"] = ("Loadgen schedule lag p99 µs (median; the client's own noise floor)",
                per_target(lambda t: median_of(rows, t, "latency", "send_lag_p99_us")), 1)
    m["bulk"] = (f"Bulk MB/s, one session, {bulk.get('frame', 65536) // 1024} KiB frames (median) ↑",
                 per_target(lambda t: median_of(rows, t, "bulk", "mb_per_s")), 1)
    m["bulk_cpu"] = ("Bulk proxy CPU s per GB ↓", per_target(lambda t: median_fn(rows, t, "bulk", bulk_cpu_per_gb)), 1)
    # The first and last points of the idle curve here; every point in its own table below.
    for n in (idle_sizes[:1] + idle_sizes[-1:]) if len(idle_sizes) > 1 else idle_sizes:
        m[f"idle{n}"] = (f"Idle RSS KiB per authenticated TLS session @ {n:,} ↓", idle_row(n), 1)

    out = header(meta, "# ws-gateway vs HAProxy vs nginx")
    out.append(f"Same `ws-loadgen echo` upstream behind each proxy; HAProxy {hap_v} verifies the RS256 JWT "
               f"(`jwt_verify`, alg and exp checks); nginx {ngx_v} does no auth; direct = loadgen to the upstream over "
               "plain ws. All on one machine, client and proxy sharing the cores. Generated by "
               "`scripts/bench.sh`. Proxy CPU is the proxy's processes' user + system time (for nginx the master "
               "and its workers; for direct, the echo upstream's) over the measured window.")
    out.append("")
    out.append("| metric | direct | ws-gateway | HAProxy | nginx | gw/HAProxy | gw/nginx | gw/direct |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, vals, digits in m.values():
        gw = vals["ws_gateway"]
        out.append(f"| {name} | {fmt(vals['direct'], digits)} | {fmt(gw, digits)} | {fmt(vals['haproxy'], digits)} | "
                   f"{fmt(vals['nginx'], digits)} | {ratio(gw, vals['haproxy'])} | {ratio(gw, vals['nginx'])} | "
                   f"{ratio(gw, vals['direct'])} |")
    out.append("")

    # Targets from issue 7.
    def check(ok, text):
        if quick:
            # A smoke run's numbers mean nothing: no verdicts.
            return f"- {text}: not judged (QUICK smoke run)"
        if ok is None:
            return f"- [ ] {text}: not measured"
        return f"- [{'x' if ok else ' '}] {text}: **{'met' if ok else 'NOT met'}**"

    g, p99, bulkv = m["hs_rate"][1], m["p99"][1], m["bulk"][1]
    out.append("## Targets")
    out.append("")
    ok = None if None in (g["ws_gateway"], g["haproxy"]) else g["ws_gateway"] >= 1.5 * g["haproxy"]
    out.append(check(ok, f"handshakes/s ≥ 1.5× HAProxy ({fmt(g['ws_gateway'])} vs 1.5 × {fmt(g['haproxy'])})"))
    ok = None if None in (p99["ws_gateway"], p99["haproxy"]) else p99["ws_gateway"] <= p99["haproxy"]
    out.append(check(ok, f"p99 echo latency ≤ HAProxy's ({fmt(p99['ws_gateway'])} µs vs {fmt(p99['haproxy'])} µs)"))
    ok = None if None in (bulkv["ws_gateway"], bulkv["haproxy"], bulkv["nginx"]) else (
        bulkv["ws_gateway"] >= bulkv["haproxy"] and bulkv["ws_gateway"] >= bulkv["nginx"])
    out.append(check(ok, f"bulk ≥ HAProxy and nginx ({fmt(bulkv['ws_gateway'])} vs {fmt(bulkv['haproxy'])} and "
                         f"{fmt(bulkv['nginx'])} MB/s)"))
    if idle_small is not None:
        gi = value(rows, "ws_gateway", f"idle{idle_small}", "kib_per_session")
        hi = value(rows, "haproxy", f"idle{idle_small}", "kib_per_session")
        ok = None if None in (gi, hi) else (gi <= hi / 2 and gi <= 16)
        out.append(check(ok, f"idle RSS per session ≤ half of HAProxy's and ≤ 16 KiB @ {idle_small:,} "
                             f"({fmt(gi)} vs {fmt(hi)} KiB)"))
        for n in idle_sizes[1:]:
            gi = value(rows, "ws_gateway", f"idle{n}", "kib_per_session")
            out.append(check(None if gi is None else gi <= 16, f"ws-gateway idle RSS ≤ 16 KiB @ {n:,} ({fmt(gi)} KiB)"))
    out.append("")
    out.append("Echo latency p99 per run (µs): " + "; ".join(
        f"{NAMES[t]} {all_of(rows, t, 'latency', 'p99_us')}" for t in TARGETS) + ".")
    out.append("")
    out.append("![chart](chart.svg)")
    out.append("")

    # The idle curve.
    if idle_sizes:
        out.append("## Idle RSS per authenticated TLS session against session count")
        out.append("")
        out.append("A fresh proxy process per point; the sessions are opened (TLS 1.3, token in the header, upgraded, "
                   "64 at a time), then the proxy's RSS is read after the settle time: (RSS with the sessions − RSS "
                   "before) / sessions. One run per point. A proxy holds two sockets per session (client and "
                   "upstream) and a process may open 20,000 files on this machine, hence at most ~9,000 sessions.")
        out.append("")
        out.append("| sessions | ws-gateway KiB/session | HAProxy | nginx | gw/HAProxy | gw/nginx | "
                   "RSS MiB with the sessions (gw / HAProxy / nginx) | open errors (gw / HAProxy / nginx) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in idle_sizes:
            v = idle_row(n)
            rss = " / ".join(fmt(None if value(rows, t, f"idle{n}", "rss_after_kib") is None
                                 else value(rows, t, f"idle{n}", "rss_after_kib") / 1024) for t in PROXIES)
            errs = " / ".join(fmt(value(rows, t, f"idle{n}", "errors")) for t in PROXIES)
            out.append(f"| {n:,} | {fmt(v['ws_gateway'])} | {fmt(v['haproxy'])} | {fmt(v['nginx'])} | "
                       f"{ratio(v['ws_gateway'], v['haproxy'])} | {ratio(v['ws_gateway'], v['nginx'])} | {rss} | "
                       f"{errs} |")
        out.append("")
        series = {t: [(n, idle_row(n)[t]) for n in idle_sizes if idle_row(n)[t] is not None] for t in PROXIES}
        if line_chart(os.path.join(out_dir, "rss_curve.svg"), "Idle RSS per authenticated TLS session",
                      "sessions held", "KiB per session", series):
            out.append("![idle RSS per session](rss_curve.svg)")
            out.append("")

    # The CPU curve.
    curve = {t: cpu_curve_points(rows, meta, t) for t in PROXIES}
    rates = sorted({rate for p in curve.values() for rate in p})
    if rates:
        reuse = meta.get("cpu_reuse_rate")
        out.append("## Proxy CPU per echoed message against message rate")
        out.append("")
        text = (f"{meta.get('cpu_sessions', '?'):,} sessions, 32-byte binary frames at the offered aggregate rate, "
                f"one run of {meta.get('cpu_seconds', '?')} s measured per point")
        if reuse is not None and reuse in rates:
            text += (f"; the {reuse:,} msg/s point is the latency runs of the table above (median of "
                     f"{lat_runs})")
        out.append(text + ". CPU µs per echoed message = the proxy's CPU seconds over the measured window / the "
                   "echoes received in it; each message crosses the proxy twice (to the upstream and back). "
                   "Delivered = echoes measured per second: where it falls short of the offered rate, the load "
                   "generator (on the same two cores) could not keep up.")
        out.append("")
        out.append("| offered msg/s | ws-gateway CPU µs/message | HAProxy | nginx | gw/HAProxy | gw/nginx | "
                   "delivered msg/s (gw / HAProxy / nginx) | echo p99 µs (gw / HAProxy / nginx) | lost |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for rate in rates:
            # per proxy: (µs/message, p99 µs, delivered msg/s, lost, runs), or None
            p = {t: curve[t].get(rate) or (None,) * 5 for t in PROXIES}
            us = {t: p[t][0] for t in PROXIES}
            cells = [f"{rate:,}", fmt(us["ws_gateway"]), fmt(us["haproxy"]), fmt(us["nginx"]),
                     ratio(us["ws_gateway"], us["haproxy"]), ratio(us["ws_gateway"], us["nginx"])]
            cells += [" / ".join(fmt(p[t][i]) for t in PROXIES) for i in (2, 1, 3)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        series = {t: [(rate, v[0]) for rate, v in curve[t].items() if v[0] is not None] for t in PROXIES}
        xlog = len(rates) > 1 and rates[-1] / rates[0] > 8
        if line_chart(os.path.join(out_dir, "cpu_curve.svg"),
                      f"Proxy CPU per echoed message, {meta.get('cpu_sessions', '?'):,} sessions",
                      "offered messages/s", "CPU µs per echoed message", series, xlog=xlog):
            out.append("![proxy CPU per echoed message](cpu_curve.svg)")
            out.append("")

    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(out))

    panels = [("Handshakes/s ↑", m["hs_rate"][1]), ("Echo p99 µs ↓", m["p99"][1]), ("Bulk MB/s ↑", m["bulk"][1])]
    if idle_small is not None:
        panels.append((f"Idle KiB/session @{idle_small:,} ↓", idle_row(idle_small)))
    bar_chart(os.path.join(out_dir, "chart.svg"), f"ws-gateway vs HAProxy {hap_v} vs nginx {ngx_v} "
              "(same echo upstream, loopback, 2 cores)", panels)


# ---------------------------------------------------------------------------------------------------------------
# Feature costs: features.md

def features(rows, meta, out_dir):
    configs = [c for c in meta.get("feat_configs", []) if any(r["target"] == f"gw_{c}" for r in rows)]
    n_runs = meta.get("feat_runs", "?")
    out = header(meta, "# ws-gateway: what each feature costs")
    out.append(f"A fresh ws-gateway per run (TLS, RS256 JWT in the header, the `ws-loadgen echo` upstream), one "
               f"feature configuration at a time against the baseline, in one run of "
               f"`FEATURES=1 scripts/bench.sh` (or `FEATURES=only`): a latency run "
               f"({meta.get('lat_sessions', 0):,} sessions × {meta.get('lat_rate', 0):,} msg/s, "
               f"{meta.get('feat_lat_seconds', '?')} s measured) and a handshake run "
               f"({meta.get('hs_concurrency', '?')} closed loops of full TLS 1.3 handshake + upgrade + one echo + "
               f"close, {meta.get('feat_hs_seconds', '?')} s) per configuration and round, {n_runs} round(s), the "
               "configurations interleaved in each round; medians over the rounds. CPU is the gateway process's "
               "user + system time: per handshake over the handshake run, per echoed message over the latency "
               "window. Every session carries the same token, so every limit decision hits one subject's keys in "
               "Redis. Redis's own CPU (over the whole handshake run) is apart. The limits are set so that they "
               "never refuse: a run with an error or a lost message fails the benchmark.")
    out.append("")
    out.append("| configuration | what is on | gateway CPU ms/handshake ↓ | Δ vs baseline | handshakes/s | "
               "handshake p99 ms | gateway CPU µs/echoed message ↓ | Δ vs baseline | echo p50 µs | echo p99 µs | "
               "Redis CPU ms/handshake | errors + lost | limit fallbacks |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def stats(c):
        t = f"gw_{c}"
        return {
            "hs_ms": median_fn(rows, t, "handshakes", ms_per_hs),
            "hs_rate": median_of(rows, t, "handshakes", "rate"),
            "hs_p99": median_of(rows, t, "handshakes", "hs_p99_ms"),
            "msg_us": median_fn(rows, t, "latency", us_per_msg),
            "p50": median_of(rows, t, "latency", "p50_us"),
            "p99": median_of(rows, t, "latency", "p99_us"),
            "store_ms": median_fn(rows, t, "handshakes", store_ms_per_hs),
            "bad": sum(r.get("errors", 0) + r.get("lost", 0) + r.get("broken_sessions", 0) for r in runs(rows, t, "")),
            "fallbacks": sum(r.get("limit_fallbacks", 0) for r in runs(rows, t, "")),
        }

    s = {c: stats(c) for c in configs}
    base = s.get("baseline", {})
    for c in configs:
        v = s[c]
        is_base = c == "baseline"
        out.append(f"| {c} | {FEATURE_TEXT.get(c, c)} | {fmt(v['hs_ms'], 3)} | "
                   f"{'–' if is_base else delta(v['hs_ms'], base.get('hs_ms'), 3)} | {fmt(v['hs_rate'])} | "
                   f"{fmt(v['hs_p99'])} | {fmt(v['msg_us'])} | "
                   f"{'–' if is_base else delta(v['msg_us'], base.get('msg_us'), 1)} | {fmt(v['p50'])} | "
                   f"{fmt(v['p99'])} | {fmt(v['store_ms'], 3)} | {v['bad']:,} | {v['fallbacks']:,} |")
    out.append("")
    out.append("Per round, gateway CPU ms/handshake: " + "; ".join(
        f"{c} " + (" / ".join(fmt(ms_per_hs(r), 3) for r in runs(rows, f"gw_{c}", "handshakes")) or "–")
        for c in configs) + ".")
    out.append("")
    out.append("Per round, gateway CPU µs/echoed message: " + "; ".join(
        f"{c} " + (" / ".join(fmt(us_per_msg(r)) for r in runs(rows, f"gw_{c}", "latency")) or "–")
        for c in configs) + ".")
    out.append("")
    out.append("Upstreams and flags of each configuration, besides the common ones (the Redis port is a free one, "
               "picked per run):")
    out.append("")
    for c in configs:
        r = next(iter(runs(rows, f"gw_{c}", "")), {})
        out.append(f"- {c}: `{r.get('flags', '?')}`")
    out.append("")
    out.append("The MQTT-aware edge (the CONNECT parsed and rewritten once per session, topic rules on every packet) "
               "is measured by `scripts/mqtt_bench.sh` in front of a real Mosquitto (README, \"What the MQTT-aware "
               "edge costs\").")
    out.append("")
    with open(os.path.join(out_dir, "features.md"), "w") as f:
        f.write("\n".join(out))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    rows = load(os.path.join(out_dir, "results.jsonl"))
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    if meta.get("main", True):
        comparison(rows, meta, out_dir)
    if any(r["target"].startswith("gw_") for r in rows) or meta.get("features", "0") != "0":
        features(rows, meta, out_dir)


if __name__ == "__main__":
    main()
