#!/usr/bin/env python3
"""Prints two `client load --json` summaries side by side:
    compare.py LABEL_A A.json LABEL_B B.json [retry|hedging]
With a check name, exits 1 unless B shows what the demo is about: `retry`: B has no
failed call; `hedging`: B's p99 is under half of A's."""
import json
import sys

label_a, file_a, label_b, file_b = sys.argv[1:5]
a, b = (json.load(open(f)) for f in (file_a, file_b))

def row(name, fa, fb, fmt="{:.2f}"):
    va, vb = fa(a), fb(b) if fb else fa(b)
    return name, fmt.format(va), fmt.format(vb)

rows = [
    ("calls", str(a["calls"]), str(b["calls"])),
    ("failed", str(a["failed"]), str(b["failed"])),
    ("failures", ", ".join(f"{k} {v}" for k, v in a["failures"].items()) or "-",
     ", ".join(f"{k} {v}" for k, v in b["failures"].items()) or "-"),
]
for q in ("p50", "p90", "p99", "max"):
    rows.append((f"latency {q} (ms)", f'{a["latency_ms"][q]:.2f}', f'{b["latency_ms"][q]:.2f}'))
servers = sorted({r["server"] for r in a["replicas"]} | {r["server"] for r in b["replicas"]})
for s in servers:
    get = lambda d: next((r["calls"] for r in d["replicas"] if r["server"] == s), 0)
    rows.append((f"calls answered by {s}", str(get(a)), str(get(b))))

w0 = max(len(r[0]) for r in rows)
w1 = max(len(label_a), *(len(r[1]) for r in rows))
w2 = max(len(label_b), *(len(r[2]) for r in rows))
print()
print(f"{'':<{w0}}  {label_a:>{w1}}  {label_b:>{w2}}")
print(f"{'-' * w0}  {'-' * w1}  {'-' * w2}")
for r in rows:
    print(f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}")

check = sys.argv[5] if len(sys.argv) > 5 else None
if check == "retry" and b["failed"] != 0:
    sys.exit(f"CHECK FAILED: {b['failed']} calls failed through {label_b}")
if check == "hedging" and not b["latency_ms"]["p99"] < a["latency_ms"]["p99"] / 2:
    sys.exit(f"CHECK FAILED: p99 {b['latency_ms']['p99']:.1f} ms through {label_b} is not under half of {a['latency_ms']['p99']:.1f} ms")
if check:
    print(f"\nCHECK PASSED ({check})")
