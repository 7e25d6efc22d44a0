#!/usr/bin/env python3
"""`task demo:outlier`: the same load through a proxy without detection and one with it,
side by side, while a node-a replica misbehaves three ways:

  failing  a new replica that fails every call (--fail-rate 1) joins
  hung     a replica is frozen with SIGSTOP, then resumed with SIGCONT
  sick     a replica turns NOT_SERVING (SIGUSR1: health NOT_SERVING, calls
           UNAVAILABLE), then SERVING again

usage: demo_outlier.py PROJECT CLIENT RATE SCENARIOS
The proxies proxy-plain (:50072) and proxy-detect (:50073) must be running. Neither has
a retry policy, so every call that reaches the bad replica shows. When the replica was
taken out of rotation and put back comes from each proxy's log, relative to the fault.
Exits 1 unless detection failed fewer calls than no detection in every scenario."""
import datetime
import json
import subprocess
import sys
import tempfile
import time

PROJECT, CLIENT, RATE, SCENARIOS = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
PROXIES = [("no detection", "proxy-plain", 50072), ("detection", "proxy-detect", 50073)]
LOAD_SECONDS = 12
FAULT_AT, HEAL_AT = 2.0, 7.0
OUT = ("Ejecting endpoint", "Endpoint unhealthy", "Connection lost")
BACK = ("Endpoint back from ejection", "Endpoint healthy", "Endpoint reconnected")


def run(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout.strip()


def container(name):
    return f"{PROJECT}_{name}"


def replica(name, *env):
    run("scripts/sandbox.sh", "extra_replica", name, *env)
    ip = run("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container(name))
    return f"{ip}:50051"


def wait_in_rotation(host):
    """Until both proxies have sent a call to the new replica (it is discovered and ready)."""
    deadline = time.time() + 20
    for _, _, port in PROXIES:
        while time.time() < deadline:
            out = run(CLIENT, "--proxy", f"localhost:{port}", "load", "--rate", "30", "--duration", "0.2s",
                      "--json", "--allow-failures", "--quiet", check=False)
            try:
                if any(r["server"] == host for r in json.loads(out)["replicas"]):
                    break
            except (json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.3)
        else:
            sys.exit(f"error: replica {host} never took calls through :{port}")


def events(proxy, addr, since):
    """(seconds after `since`, message) for each log line of `proxy` about `addr`."""
    logs = subprocess.run(
        ["docker", "logs", "-t", "--since", f"{since - 1:.3f}", container(proxy)],
        capture_output=True, text=True,
    )
    found = []
    for line in (logs.stdout + logs.stderr).splitlines():
        if f"addr={addr}" not in line:
            continue
        stamp, _, rest = line.partition(" ")
        t = datetime.datetime.fromisoformat(stamp[:26] + "+00:00").timestamp()
        found.append((t - since, rest))
    return sorted(found)


def first(evs, kinds, after):
    return next(((t, m) for t, m in evs if t >= after and any(k in m for k in kinds)), None)


def scenario(name):
    print(f"\n== {name}", flush=True)
    extra = []
    if name == "failing":
        what = "a new node-a replica failing every call joins at +2 s"
    elif name == "hung":
        addr = replica("hung")
        extra.append("hung")
        what = "SIGSTOP at +2 s, SIGCONT at +7 s"
    elif name == "sick":
        addr = replica("sick")
        extra.append("sick")
        what = "SIGUSR1 (NOT_SERVING) at +2 s, SIGUSR1 (SERVING) at +7 s"
    else:
        sys.exit(f"error: unknown scenario {name!r} (failing, hung, sick)")
    if extra:
        wait_in_rotation(extra[0])
    print(f"   {what}; load {RATE}/s for {LOAD_SECONDS} s through each proxy", flush=True)
    outs, loads = [], []
    for _, _, port in PROXIES:
        f = tempfile.TemporaryFile(mode="w+")
        outs.append(f)
        loads.append(subprocess.Popen(
            [CLIENT, "--proxy", f"localhost:{port}", "load", "--rate", RATE, "--duration", f"{LOAD_SECONDS}s",
             "--concurrency", "1000", "--json", "--allow-failures", "--quiet"], stdout=f))
    start = time.time()
    time.sleep(FAULT_AT)
    fault = time.time()
    if name == "failing":
        addr = replica("failing", "SERVER_FAIL_RATE=1")
        extra.append("failing")
    elif name == "hung":
        run("docker", "kill", "--signal", "STOP", container("hung"))
    else:
        run("docker", "kill", "--signal", "USR1", container("sick"))
    time.sleep(max(0.0, start + HEAL_AT - time.time()))
    heal = time.time()
    if name == "hung":
        run("docker", "kill", "--signal", "CONT", container("hung"))
    elif name == "sick":
        run("docker", "kill", "--signal", "USR1", container("sick"))
    for p in loads:
        p.wait()
    results = []
    for f in outs:
        f.seek(0)
        results.append(json.load(f))
    host = run("docker", "inspect", "-f", "{{.Config.Hostname}}", container(extra[-1]))
    rows = [("calls", [str(r["calls"]) for r in results]),
            ("failed", [str(r["failed"]) for r in results]),
            ("failures", [", ".join(f"{k} {v}" for k, v in r["failures"].items()) or "-" for r in results]),
            (f"answered by {host}", [str(sum(x["calls"] for x in r["replicas"] if x["server"] == host))
                                     for r in results]),
            ("latency p99 (ms)", [f'{r["latency_ms"]["p99"]:.1f}' for r in results]),
            ("latency max (ms)", [f'{r["latency_ms"]["max"]:.1f}' for r in results])]
    outs_row, back_row = [], []
    for _, proxy, _ in PROXIES:
        evs = events(proxy, addr, fault)
        out = first(evs, OUT, 0.0)
        outs_row.append(f"+{out[0]:.3f} s ({reason(out[1])})" if out else "never")
        back = first(evs, BACK, (heal - fault) if name != "failing" else (out[0] if out else 1e9) + 0.001)
        back_row.append(f"+{back[0]:.3f} s ({reason(back[1])})" if back else "-")
    rows.append(("out of rotation (after the fault)", outs_row))
    rows.append(("back in rotation (after the fault)", back_row))
    print_table(rows)
    run("docker", "rm", "-f", *(container(e) for e in extra), check=False)
    return [r["failed"] for r in results]


def reason(msg):
    for k in OUT + BACK:
        if k in msg:
            tail = msg.split("reason=", 1)[1].split(" times=")[0] if "reason=" in msg else ""
            why = msg.split("why=", 1)[1][:60] if "why=" in msg else ""
            return k.replace("Endpoint ", "").replace("Ejecting endpoint", "ejected") + (f": {tail or why}" if tail or why else "")
    return msg[:40]


def print_table(rows):
    labels = [p[0] for p in PROXIES]
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(labels[i]), *(len(r[1][i]) for r in rows)) for i in range(len(labels))]
    print(f"   {'':<{w0}}  " + "  ".join(f"{l:>{w}}" for l, w in zip(labels, ws)))
    print(f"   {'-' * w0}  " + "  ".join("-" * w for w in ws))
    for label, cells in rows:
        print(f"   {label:<{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, ws)))


failed = {name: scenario(name) for name in SCENARIOS}
bad = [n for n, (plain, detect) in failed.items() if not detect < plain]
print()
if bad:
    sys.exit(f"CHECK FAILED: detection did not fail fewer calls in: {', '.join(bad)}")
print("CHECK PASSED: detection failed fewer calls in every scenario")
