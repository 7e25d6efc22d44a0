#!/usr/bin/env python3
"""`task demo:outlier`: the same load through a proxy without detection and one with it,
side by side, while a node-a replica misbehaves three ways:

  failing  a new replica that fails every call (--fail-rate 1) joins
  hung     a replica is frozen with SIGSTOP, then resumed with SIGCONT
  sick     a replica turns NOT_SERVING (SIGUSR1: health NOT_SERVING, calls
           UNAVAILABLE), then SERVING again

usage: demo_outlier.py PROJECT CLIENT RATE SCENARIOS PROXY_PORT
The proxies proxy-plain (:50072, no detection) and proxy-detect (:50073, detection) must
be running; neither has a retry policy, so every call that reaches the bad replica
shows. The sandbox's node-a proxy (PROXY_PORT: detection and the default retry policy) gets
the same load too. When the replica was
taken out of rotation and put back comes from each proxy's log, relative to the fault
(for `sick`, to the moment the replica logged its health change).
Exits 1 unless, in every scenario, detection hurt fewer calls (failed, or answered after
more than a second) than no detection, and no call failed with detection and retries."""
import datetime
import json
import subprocess
import sys
import tempfile
import time

PROJECT, CLIENT, RATE, SCENARIOS, PROXY_PORT = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(","), int(sys.argv[5])
# (label, container, port): two extra proxies, and the sandbox's own node-a proxy, whose
# default config adds the retry policy to detection.
PROXIES = [("no detection", "proxy-plain", 50072), ("detection", "proxy-detect", 50073),
           ("detection + retry", "proxy", PROXY_PORT)]
LOAD_SECONDS = 12
FAULT_AT, HEAL_AT = 2.0, 7.0
# The proxy logs each endpoint leaving and entering rotation, whatever the cause.
OUT, BACK = "Endpoint out of rotation", "Endpoint in rotation"


def run(*args, check=True):
    return subprocess.run(args, check=check, capture_output=True, text=True).stdout.strip()


def container(name):
    if name == "proxy":  # a compose service: its name differs between compose v1 and v2
        return run("docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                   "--filter", "label=com.docker.compose.service=proxy")
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


def replica_log(name, since):
    """(seconds after `since`, line) for each log line of container `name`, timed by
    the line's own timestamp (when it was written; Docker's is when Docker read it)."""
    logs = subprocess.run(["docker", "logs", "-t", "--since", f"{since - 1:.3f}", name],
                          capture_output=True, text=True)
    found = []
    for line in (logs.stdout + logs.stderr).splitlines():
        stamp, _, rest = line.partition(" ")
        own, _, text = rest.partition(" ")
        if own[:4].isdigit() and "T" in own:
            stamp, rest = own, text
        t = datetime.datetime.fromisoformat(stamp[:26].rstrip("Z") + "+00:00").timestamp()
        found.append((t - since, rest))
    return found


def events(proxy, addr, since):
    """(seconds after `since`, message) for each log line of `proxy` about `addr`."""
    return sorted((t, m) for t, m in replica_log(container(proxy), since) if f"addr={addr}" in m)


def first(evs, kind, after):
    return next(((t, m) for t, m in evs if t >= after and kind in m), None)


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
            ("ok but slower than 1 s", [str(r["slow_over_1s"]) for r in results]),
            ("latency p99 (ms)", [f'{r["latency_ms"]["p99"]:.1f}' for r in results]),
            ("latency max (ms)", [f'{r["latency_ms"]["max"]:.1f}' for r in results])]
    if name == "sick":
        # The replica logs the moment its health changed: measure from there, not from
        # when `docker kill` started (the signal takes tens of milliseconds to arrive).
        said = [t for t, m in replica_log(container("sick"), fault) if "Health changed" in m]
        if len(said) >= 2:
            fault, heal = fault + said[0], fault + said[1]
    outs_row, back_row = [], []
    for _, proxy, _ in PROXIES:
        evs = events(proxy, addr, fault)
        out = first(evs, OUT, 0.0)
        outs_row.append(f"{since(out[0])}, {reason(out, evs)}" if out else "never")
        healed = heal - fault if name != "failing" else None
        back = first(evs, BACK, healed if healed is not None else (out[0] if out else 1e9) + 0.001)
        if not back:
            back_row.append("-")
        elif healed is None:
            back_row.append(since(back[0]))
        else:
            back_row.append(f"{since(back[0])} ({since(back[0] - healed)} after the fix)")
    rows.append(("out of rotation (after the fault)", outs_row))
    rows.append(("back in rotation (after the fault)", back_row))
    print_table(rows)
    run("docker", "rm", "-f", *(container(e) for e in extra), check=False)
    return [r["failed"] + r["slow_over_1s"] for r in results], results[2]["failed"]


def since(t):
    """A time after the fault: milliseconds under a second."""
    return f"+{t * 1000:.1f} ms" if t < 1 else f"+{t:.3f} s"


def reason(out, evs):
    """Why the endpoint left rotation, in a few words: the ejection's reason when it was
    ejected."""
    t, msg = out
    why = msg.split("why=", 1)[1] if "why=" in msg else ""
    if why == "ejected":
        ejected = next((m for u, m in evs if abs(u - t) < 0.05 and "Ejecting endpoint" in m), "")
        if "reason=" in ejected:
            why = "ejected, " + ejected.split("reason=", 1)[1].split(" times=")[0]
    why = why.removeprefix("connection lost: ").removeprefix("health watch ended: ")
    return why if len(why) <= 34 else why[:33] + "…"


def print_table(rows):
    labels = [p[0] for p in PROXIES]
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(labels[i]), *(len(r[1][i]) for r in rows)) for i in range(len(labels))]
    print(f"   {'':<{w0}}  " + "  ".join(f"{l:>{w}}" for l, w in zip(labels, ws)))
    print(f"   {'-' * w0}  " + "  ".join("-" * w for w in ws))
    for label, cells in rows:
        print(f"   {label:<{w0}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, ws)))


outcomes = {name: scenario(name) for name in SCENARIOS}
failed = {name: hurt for name, (hurt, _) in outcomes.items()}
bad = [n for n, (plain, detect, _) in failed.items() if not detect < plain]
bad += [f"{n} (detection + retry failed {f} calls)" for n, (_, f) in outcomes.items() if f]
print()
for n, (plain, detect, retry) in failed.items():
    print(f"   {n}: calls failed or slower than 1 s: {plain} without detection, {detect} with, {retry} with retries too")
if bad:
    sys.exit(f"CHECK FAILED: detection did not hurt fewer calls, or retries did not hide every failure, in: {', '.join(bad)}")
print("CHECK PASSED: detection hurt fewer calls in every scenario, and with retries no call failed")
