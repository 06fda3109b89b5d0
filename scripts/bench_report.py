#!/usr/bin/env python3
"""Turns target/bench/results.jsonl (tagged RESULT lines from scripts/bench.sh) into a markdown table and an SVG bar
chart. Standard library only.

usage: bench_report.py RESULTS.jsonl OUT.md OUT.svg HAPROXY_VERSION NGINX_VERSION QUICK
"""

import json
import statistics
import sys
from html import escape

TARGETS = ["direct", "ws_gateway", "haproxy", "nginx"]
NAMES = {"direct": "direct", "ws_gateway": "ws-gateway", "haproxy": "HAProxy", "nginx": "nginx"}
COLORS = {"direct": "#9e9e9e", "ws_gateway": "#1f77b4", "haproxy": "#d62728", "nginx": "#2ca02c"}


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


def bulk_median(rows, target):
    vals = [r["mb_per_s"] for r in rows if r["target"] == target and r["label"].startswith("bulk")]
    return statistics.median(vals) if vals else None


def median_of(rows, target, prefix, field):
    vals = [r[field] for r in rows if r["target"] == target and r["label"].startswith(prefix) and r.get(field) is not None]
    return statistics.median(vals) if vals else None


def all_of(rows, target, prefix, field):
    vals = [r[field] for r in rows if r["target"] == target and r["label"].startswith(prefix)]
    return " / ".join(fmt(v) for v in vals) if vals else "–"


def bulk_cpu_per_gb(rows, target):
    vals = [r["proxy_cpu_s"] / (r["bytes"] / 1e9) for r in rows
            if r["target"] == target and r["label"].startswith("bulk") and r.get("proxy_cpu_s") is not None]
    return statistics.median(vals) if vals else None


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


def main():
    src, md_out, svg_out, hap_v, ngx_v, quick = sys.argv[1:7]
    rows = load(src)
    hs = next((r for r in rows if r["mode"] == "handshakes"), {})
    lat = next((r for r in rows if r["mode"] == "latency"), {})
    bulk = next((r for r in rows if r["mode"] == "bulk"), {})
    lat_runs = len({r["label"] for r in rows if r["mode"] == "latency"})
    idle_sizes = sorted({r["sessions"] for r in rows if r["mode"] == "idle"})
    idle_small = idle_sizes[0] if idle_sizes else None

    def per_target(fn):
        return {t: fn(t) for t in TARGETS}

    metrics = [
        (f"Handshakes/s (full TLS 1.3, no resumption, {hs.get('concurrency', '?')} loops) ↑",
         per_target(lambda t: value(rows, t, "handshakes", "rate")), True),
        ("Handshakes per proxy CPU-second ↑",
         per_target(lambda t: value(rows, t, "handshakes", "per_proxy_cpu_s")), True),
        ("Handshake (connect→101) p50 ms ↓", per_target(lambda t: value(rows, t, "handshakes", "hs_p50_ms")), False),
        ("Handshake (connect→101) p99 ms ↓", per_target(lambda t: value(rows, t, "handshakes", "hs_p99_ms")), False),
        ("Handshake errors", per_target(lambda t: value(rows, t, "handshakes", "errors")), False),
        (f"Echo latency p50 µs ({lat.get('sessions', '?')} sessions × {fmt(lat.get('rate'))} msg/s, median of "
         f"{lat_runs} runs) ↓", per_target(lambda t: median_of(rows, t, "latency", "p50_us")), False),
        ("Echo latency p99 µs (median of runs) ↓", per_target(lambda t: median_of(rows, t, "latency", "p99_us")), False),
        ("Echo latency p99.9 µs (median of runs) ↓",
         per_target(lambda t: median_of(rows, t, "latency", "p999_us")), False),
        ("Echo messages lost (all runs)",
         per_target(lambda t: sum(r["lost"] for r in rows if r["target"] == t and r["mode"] == "latency")
                    if any(r["target"] == t and r["mode"] == "latency" for r in rows) else None), False),
        (f"Proxy CPU s per {lat.get('duration_s', '?')} s latency window (median) ↓",
         per_target(lambda t: median_of(rows, t, "latency", "proxy_cpu_s")), False),
        ("Loadgen schedule lag p99 µs (median; the client's own noise floor)",
         per_target(lambda t: median_of(rows, t, "latency", "send_lag_p99_us")), False),
        (f"Bulk MB/s, one session, {bulk.get('frame', 65536) // 1024} KiB frames (median) ↑",
         per_target(lambda t: bulk_median(rows, t)), True),
        ("Bulk proxy CPU s per GB ↓", per_target(lambda t: bulk_cpu_per_gb(rows, t)), False),
    ]
    for n in idle_sizes:
        metrics.append((f"Idle RSS KiB per authenticated TLS session @ {n:,} ↓",
                        {t: value(rows, t, f"idle{n}", "kib_per_session") if t != "direct" else None
                         for t in TARGETS}, False))

    out = []
    out.append("# ws-gateway vs HAProxy vs nginx" + (" (QUICK smoke run: numbers are not meaningful)" if quick == "1" else ""))
    out.append("")
    out.append(f"Same `ws-loadgen echo` upstream behind each proxy; HAProxy {hap_v} verifies the RS256 JWT "
               f"(`jwt_verify`, alg and exp checks); nginx {ngx_v} does no auth; direct = loadgen to the upstream over "
               "plain ws. All on one 2-core machine, client and proxy sharing the cores. Generated by "
               "`scripts/bench.sh`.")
    out.append("")
    out.append("| metric | direct | ws-gateway | HAProxy | nginx | gw/HAProxy | gw/nginx | gw/direct |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, vals, _ in metrics:
        gw = vals["ws_gateway"]
        out.append(f"| {name} | {fmt(vals['direct'])} | {fmt(gw)} | {fmt(vals['haproxy'])} | {fmt(vals['nginx'])} | "
                   f"{ratio(gw, vals['haproxy'])} | {ratio(gw, vals['nginx'])} | {ratio(gw, vals['direct'])} |")
    out.append("")

    # Targets from issue 7.
    def check(ok, text):
        if quick == "1":
            # A smoke run's numbers mean nothing: no verdicts.
            return f"- {text}: not judged (QUICK smoke run)"
        if ok is None:
            return f"- [ ] {text}: not measured"
        return f"- [{'x' if ok else ' '}] {text}: **{'met' if ok else 'NOT met'}**"

    g = dict(metrics[0][1])
    p99 = metrics[6][1]
    bulkv = metrics[11][1]
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
    with open(md_out, "w") as f:
        f.write("\n".join(out))

    # Chart: one panel per headline metric, absolute values, one bar per target.
    panels = [
        ("Handshakes/s ↑", metrics[0][1]),
        ("Echo p99 µs ↓", metrics[6][1]),
        ("Bulk MB/s ↑", metrics[11][1]),
    ]
    if idle_small is not None:
        panels.append((f"Idle KiB/session @{idle_small:,} ↓", metrics[13][1]))
    pw, ph, top, bottom, left = 230, 260, 50, 40, 20
    width = left + len(panels) * pw + 10
    height = top + ph + bottom + 30
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15" font-weight="bold">ws-gateway vs HAProxy {escape(hap_v)} vs '
           f'nginx {escape(ngx_v)} (same echo upstream, loopback, 2 cores)</text>']
    for i, (title, vals) in enumerate(panels):
        x0 = left + i * pw
        svg.append(f'<text x="{x0 + pw / 2 - 10}" y="{top - 8}" text-anchor="middle" font-weight="bold">'
                   f'{escape(title)}</text>')
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
    with open(svg_out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
