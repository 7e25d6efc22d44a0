"""Runs the interop suite: grpcio clients and grpcio servers on both sides of the proxy.

    python3 interop/run.py --proxy-bin target/debug/proxy   # after cargo build -p proxy
    python3 interop/run.py --direct                         # the cases against one server

Starts two grpcio servers on 127.a.b.1 and 127.a.b.2 (port 50051, a random /24 inside
127/8 so parallel runs do not collide), a DNS responder answering `interop.test` with
both, and the proxy with --target interop.test:50051 once per configuration (no
service config, retry, hedging, detection: through the frame relay, the default; and
`relay-off`: no service config through the HTTP/2 stack), runs every case of client.py through it, and prints a
summary table.
Everything it starts is stopped when it ends, whatever happens. Exits non-zero if any
case failed.
"""

import argparse
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the tree

import grpc  # noqa: E402

import client  # noqa: E402
from dns_responder import Dns  # noqa: E402

PORT = 50051
NAME = "interop.test"
TIME_LIMIT_S = 90
# The service configs, as files for --service-config.
RETRY = """{"methodConfig":[{"name":[{}],"retryPolicy":{"maxAttempts":4,"initialBackoff":"0.01s",
"maxBackoff":"0.01s","backoffMultiplier":1,"retryableStatusCodes":["UNAVAILABLE"]}}]}"""
HEDGING = """{"methodConfig":[{"name":[{}],"hedgingPolicy":{"maxAttempts":2,"hedgingDelay":"0.5s",
"nonFatalStatusCodes":["UNAVAILABLE"]}}]}"""
# Retries with health checking and ejection on: the grpcio servers have no health
# service, so their Watch answers UNIMPLEMENTED and they count as healthy.
DETECT = """{"healthCheckConfig":{"serviceName":"interop.Interop"},
"loadBalancingConfig":[{"outlier_detection":{"interval":"1s","baseEjectionTime":"1s",
"maxEjectionPercent":50,"consecutiveFailures":{"threshold":5},"childPolicy":[{"round_robin":{}}]}}],
"methodConfig":[{"name":[{}],"retryPolicy":{"maxAttempts":4,"initialBackoff":"0.01s",
"maxBackoff":"0.01s","backoffMultiplier":1,"retryableStatusCodes":["UNAVAILABLE"]}}]}"""
# "relay-off": no service config, calls forwarded by the HTTP/2 stack (--relay off);
# the others run with the proxy's default, --relay auto.
CONFIGS = {"none": None, "retry": RETRY, "hedging": HEDGING, "detect": DETECT, "relay-off": None}


class Setup(Exception):
    """Something the cases need did not start; the message says what."""


def random_subnet() -> str:
    """`127.a.b`, a /24 whose first address has port 50051 free (like testkit's Subnet)."""
    while True:
        prefix = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"
        with socket.socket() as s:
            try:
                s.bind((f"{prefix}.1", PORT))
                return prefix
            except OSError:
                continue


# Looked up once here: the child of a threaded process should not load anything.
PR_SET_PDEATHSIG = 1
prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when this script dies, even by SIGKILL."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Processes:
    """What this run started, stopped in reverse order by stop_all()."""

    def __init__(self, logs: str):
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        log = open(os.path.join(self.logs, f"{name}.log"), "wb")
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(argv, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent, **kwargs)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.logs, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def start_server(procs: Processes, name: str, listen: str, state: str) -> None:
    argv = [sys.executable, "-u", os.path.join(HERE, "server.py"), "--listen", listen, "--name", name]
    proc = procs.start(name, argv + ["--state-dir", state], stdout=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    line = b""
    ready = f"ready {name} {listen}".encode()

    def read_ready() -> bool:
        nonlocal line
        line += proc.stdout.read() or b""
        return ready in line or proc.poll() is not None

    client.poll(read_ready, 15)
    if ready not in line:
        raise Setup(f"server {name} on {listen} not ready: {line!r} {procs.log_tail(name)}")


def start_proxy(procs: Processes, name: str, argv: list[str], listen: str) -> subprocess.Popen:
    """Starts the proxy and waits until calls through it have reached both servers."""
    proc = procs.start(name, argv, env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
    seen = set()
    channel = grpc.insecure_channel(listen)
    who = channel.unary_unary(f"/{client.SERVICE}/Name")

    def both_answered() -> bool:
        if proc.poll() is not None:
            return True
        try:
            seen.add(who(b"", timeout=1, wait_for_ready=True).decode())
        except grpc.RpcError:
            pass
        return seen >= {"s1", "s2"}

    try:
        client.poll(both_answered, 15)
    finally:
        channel.close()
    if proc.poll() is not None:
        raise Setup(f"proxy exited with {proc.returncode}: {procs.log_tail(name)}")
    if seen < {"s1", "s2"}:
        raise Setup(f"calls through the proxy reached only {sorted(seen)} in 15 s")
    return proc


def through_proxy(args, procs: Processes, work: str, config: str, listen: str, dns: str):
    """The cases through a proxy with one service config."""
    print(f"\n== proxy, service config: {config}", flush=True)
    argv = [args.proxy_bin, "--listen", listen, "--target", f"{NAME}:{PORT}", "--dns-server", dns]
    argv += ["--resolve-interval", "250ms", "--drain-timeout", "1s", "--admin-listen", "off"]
    if CONFIGS[config]:
        path = os.path.join(work, f"{config}.json")
        with open(path, "w") as f:
            f.write(CONFIGS[config])
        argv += ["--service-config", path]
    if config == "relay-off":
        argv += ["--relay", "off"]
    name = f"proxy-{config}"
    try:
        proc = start_proxy(procs, name, argv, listen)
    except Setup as e:
        print(f"setup FAIL: {e}", flush=True)
        return [(case, False, "setup failed") for case, _ in client.CASES if not args.case or case in args.case]
    results = client.run_cases(listen, args.case)
    if not all(ok for _, ok, _ in results):
        print(f"-- last lines of the {name} log:\n{procs.log_tail(name)}", end="", flush=True)
    procs.stop(proc)
    return results


def summary(runs: dict[str, list[tuple[str, bool, str]]]) -> str:
    """Case by config: pass or FAIL."""
    configs = list(runs)
    results = {(config, name): ok for config, rows in runs.items() for name, ok, _ in rows}
    cases = [name for name, _ in client.CASES if any((c, name) in results for c in configs)]
    width = max(len(name) for name in cases + ["case"])
    lines = [f"{'case':<{width}}  " + "  ".join(f"{c:<7}" for c in configs)]
    lines.append(f"{'-' * width}  " + "  ".join("-------" for _ in configs))
    for name in cases:
        row = ("-" if (c, name) not in results else "pass" if results[c, name] else "FAIL" for c in configs)
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r:<7}" for r in row))
    return "\n".join(line.rstrip() for line in lines)


def on_alarm(signum, frame):
    raise TimeoutError(f"the suite ran past {TIME_LIMIT_S} s")


def run(args, procs: Processes, work: str) -> dict[str, list[tuple[str, bool, str]]]:
    subnet = random_subnet()
    state = os.path.join(work, "state")
    os.mkdir(state)
    servers = [("s1", f"{subnet}.1:{PORT}"), ("s2", f"{subnet}.2:{PORT}")]
    if args.direct:
        servers = servers[:1]
    for name, listen in servers:
        start_server(procs, name, listen, state)
    print("servers: " + ", ".join(f"{n} on {a}" for n, a in servers), flush=True)
    if args.direct:
        print("\n== direct (no proxy)", flush=True)
        return {"direct": client.run_cases(servers[0][1], args.case)}

    dns = Dns(f"{subnet}.250", {NAME: [f"{subnet}.1", f"{subnet}.2"]})
    try:
        return {
            config: through_proxy(args, procs, work, config, f"{subnet}.200:{50180 + i}", dns.addr)
            for i, config in enumerate(args.config)
        }
    finally:
        dns.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxy-bin", help="the proxy binary (cargo build -p proxy: target/debug/proxy)")
    parser.add_argument("--direct", action="store_true", help="no proxy: the cases against one server")
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="only these service configs")
    parser.add_argument("--case", action="append", choices=[n for n, _ in client.CASES], help="only these cases")
    args = parser.parse_args()
    if not args.direct and not args.proxy_bin:
        parser.error("--proxy-bin is needed unless --direct")
    if args.proxy_bin and not os.access(args.proxy_bin, os.X_OK):
        parser.error(f"--proxy-bin {args.proxy_bin}: not an executable file (cargo build -p proxy)")
    args.config = args.config or list(CONFIGS)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TIME_LIMIT_S)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="interop-")
    procs = Processes(work)
    failed = True
    try:
        runs = run(args, procs, work)
        results = [ok for rows in runs.values() for _, ok, _ in rows]
        failed = not all(results)
        print(f"\n== summary ({time.monotonic() - started:.1f} s)\n{summary(runs)}\n")
        print(f"interop: {sum(results)} passed, {len(results) - sum(results)} failed")
    except (Setup, TimeoutError) as e:
        print(f"interop: {e}")
    finally:
        signal.alarm(0)
        procs.stop_all()
        if failed:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
