"""The interop suite's client: grpcio (grpc-core) calls to interop.Test, case by case.

    python3 interop/client.py HOST:PORT [--case NAME ...]

Runs each case against HOST:PORT (the proxy, or server.py directly), prints a table
(case, result, detail) and exits non-zero if any case failed. Every call has a
deadline and every wait a bound, so a broken proxy makes a case FAIL, never hang.
run.py imports `run_cases` to run the list under several proxy configs.
"""

import argparse
import hashlib
import os
import queue
import sys
import threading
import time
from collections.abc import Callable

import grpc

sys.dont_write_bytecode = True  # importing server.py leaves no __pycache__ in the tree
from server import FAIL_BINARY, FAIL_CODE, FAIL_MESSAGE, LARGE_REPLY, SERVICE, pattern

TIMEOUT = 5.0  # seconds, for any one call that should answer at once
SEEN_WAIT = 5.0  # how long the server gets to notice a cancel
SLOW_S = 6  # a slow call's server time, past grpc-core's ping strikes at 1 ping/s
CONCURRENT = 100
ROUND_TRIPS = 5


class Failure(Exception):
    """A case's expectation not met; the message is the table's detail."""


def poll(check: Callable[[], object], limit: float, every: float = 0.02):
    """Calls `check` until it returns something truthy or `limit` seconds pass;
    returns the last value."""
    deadline = time.monotonic() + limit
    while True:
        value = check()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(every)


def describe(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()!r}"


class Requests:
    """A request stream fed from a queue: the call gets a message only when the case
    sends one. Ends (half-closes) on close(), or after `limit` seconds without a
    message so no grpcio thread is left waiting on a case that gave up."""

    _END = object()

    def __init__(self, limit: float = 3 * TIMEOUT):
        self.queue = queue.Queue()
        self.limit = limit

    def send(self, message: bytes) -> None:
        self.queue.put(message)

    def close(self) -> None:
        self.queue.put(self._END)

    def __iter__(self):
        while True:
            try:
                item = self.queue.get(timeout=self.limit)
            except queue.Empty:
                return
            if item is self._END:
                return
            yield item


class Case:
    """One case's view of the target: a fresh channel and method stubs."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)

    def unary(self, method: str, service: str = SERVICE):
        return self.channel.unary_unary(f"/{service}/{method}")

    def client_stream(self, method: str):
        return self.channel.stream_unary(f"/{SERVICE}/{method}")

    def server_stream(self, method: str):
        return self.channel.unary_stream(f"/{SERVICE}/{method}")

    def bidi(self, method: str):
        return self.channel.stream_stream(f"/{SERVICE}/{method}")

    def close(self) -> None:
        self.channel.close()


def expect(what: str, got, want) -> None:
    if got != want:
        raise Failure(f"{what}: got {short(got)}, want {short(want)}")


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def expect_code(call, want: grpc.StatusCode) -> None:
    code = call.code()
    if code != want:
        raise Failure(f"status {code.name if code else None} {call.details()!r}, want {want.name}")


def expect_error(fn: Callable[[], object], want: grpc.StatusCode) -> grpc.RpcError:
    try:
        reply = fn()
    except grpc.RpcError as e:
        if e.code() != want:
            raise Failure(f"{describe(e)}, want {want.name}") from None
        return e
    raise Failure(f"succeeded with {short(reply)}, want {want.name}")


# The cases: each takes a Case, raises Failure (or grpc.RpcError), returns a detail.


def unary(c: Case) -> str:
    request = "hello ünïcødé".encode()
    reply, call = c.unary("Echo").with_call(request, timeout=TIMEOUT)
    expect("reply", reply, request)
    server = dict(call.trailing_metadata()).get("x-server")
    if not server:
        raise Failure(f"no x-server in trailers {call.trailing_metadata()}")
    return f"echoed by {server}"


def large(c: Case) -> str:
    request = os.urandom(270 * 1024)
    reply = c.unary("Large")(request, timeout=TIMEOUT)
    expect("reply size", len(reply), LARGE_REPLY)
    expect("request digest seen by the server", reply[:32], hashlib.sha256(request).digest())
    if reply[32:] != pattern(LARGE_REPLY - 32):
        raise Failure("reply bytes differ from what the server sent")
    return "270 KB up, 310 KB down, both intact"


def client_streaming(c: Case) -> str:
    parts = [b"a", b"bb", b"", b"dddd"]
    reply = c.client_stream("ClientStream")(iter(parts), timeout=TIMEOUT)
    expect("reply", reply, b"4:abbdddd")
    return "4 messages (one empty) counted and joined"


def server_streaming(c: Case) -> str:
    call = c.server_stream("ServerStream")(b"5", timeout=TIMEOUT)
    replies = list(call)
    expect("replies", len(replies), 5)
    for i, reply in enumerate(replies):
        if not reply.startswith(b"%d of 5 from " % i):
            raise Failure(f"reply {i}: {reply!r}")
    expect_code(call, grpc.StatusCode.OK)
    return "5 replies in order, then OK"


def bidi_streaming(c: Case) -> str:
    requests = Requests()
    call = c.bidi("PingPong")(iter(requests), timeout=TIMEOUT)
    try:
        for i in range(10):
            message = b"ping %d" % i
            requests.send(message)
            expect(f"reply {i}", next(call), message)
        requests.close()
        expect("after half-close", list(call), [])
        expect_code(call, grpc.StatusCode.OK)
    finally:
        requests.close()
        call.cancel()
    return "10 round trips, each answered before the next was sent"


def empty_stream(c: Case) -> str:
    call = c.bidi("Empty")(iter(()), timeout=TIMEOUT)
    expect("replies", list(call), [])
    expect_code(call, grpc.StatusCode.OK)
    expect("requests the server read", dict(call.trailing_metadata()).get("x-requests"), "0")
    return "nothing either way, OK, server read 0"


def cancel_seen(c: Case, token: str) -> bytes:
    return c.unary("CancelSeen")(token.encode(), timeout=TIMEOUT)


def cancel_case(c: Case, replies: int) -> str:
    """Starts a Hang call, cancels it once the server has begun (and `replies` replies
    arrived), and waits for the server to see the cancel."""
    token = os.urandom(8).hex()
    requests = Requests()
    call = c.bidi("Hang")(iter(requests))  # no deadline: only the cancel may end it
    try:
        requests.send(f"{token} {replies}".encode())
        if not poll(lambda: cancel_seen(c, token), SEEN_WAIT):
            raise Failure(f"the server did not start the call within {SEEN_WAIT:.0f} s")
        for i in range(replies):
            expect(f"reply {i}", next(call), b"reply %d" % i)
        call.cancel()
    finally:
        requests.close()
        call.cancel()
    expect_code(call, grpc.StatusCode.CANCELLED)
    started = time.monotonic()
    state = poll(lambda: cancel_seen(c, token) == b"cancelled", SEEN_WAIT)
    if not state:
        raise Failure(f"the server did not see the cancel within {SEEN_WAIT:.0f} s")
    return f"server saw the cancel after {(time.monotonic() - started) * 1000:.0f} ms"


def cancel_after_begin(c: Case) -> str:
    return cancel_case(c, replies=0)


def cancel_after_first_response(c: Case) -> str:
    return cancel_case(c, replies=1)


def deadline_1ms(c: Case) -> str:
    started = time.monotonic()
    expect_error(lambda: c.unary("Sleep")(b"2000", timeout=0.001), grpc.StatusCode.DEADLINE_EXCEEDED)
    took = time.monotonic() - started
    if took > 1.0:
        raise Failure(f"DEADLINE_EXCEEDED only after {took:.2f} s")
    expect("an echo right after", c.unary("Echo")(b"still there", timeout=TIMEOUT), b"still there")
    return f"DEADLINE_EXCEEDED after {took * 1000:.0f} ms"


def slow_unary(c: Case) -> str:
    """A reply after 6 s with nothing on the wire meanwhile: whatever keeps the
    connections alive must not get them closed by the server."""
    started = time.monotonic()
    try:
        reply = c.unary("Sleep")(b"%d" % (SLOW_S * 1000), timeout=SLOW_S + TIMEOUT)
    except grpc.RpcError as e:
        raise Failure(f"{describe(e)} after {time.monotonic() - started:.1f} s") from None
    expect("reply", reply, b"slept")
    return f"answered after {time.monotonic() - started:.1f} s"


def status_unicode(c: Case) -> str:
    e = expect_error(lambda: c.unary("Fail")(b"", timeout=TIMEOUT), FAIL_CODE)
    expect("message", e.details(), FAIL_MESSAGE)
    return f"{FAIL_CODE.name} {FAIL_MESSAGE!r}"


def error_metadata(c: Case) -> str:
    e = expect_error(lambda: c.unary("Fail")(b"", timeout=TIMEOUT), FAIL_CODE)
    initial = dict(e.initial_metadata() or ())
    trailing = dict(e.trailing_metadata() or ())
    expect("initial x-custom-init", initial.get("x-custom-init"), "hello")
    expect("trailing x-bin-bin", trailing.get("x-bin-bin"), FAIL_BINARY)
    expect("trailing x-trail", trailing.get("x-trail"), "t")
    return "x-custom-init in headers, x-bin-bin and x-trail in trailers"


def unimplemented_method(c: Case) -> str:
    e = expect_error(lambda: c.unary("NoSuchMethod")(b"", timeout=TIMEOUT), grpc.StatusCode.UNIMPLEMENTED)
    return describe(e)


def unimplemented_service(c: Case) -> str:
    call = c.unary("Echo", service="interop.NoSuchService")
    e = expect_error(lambda: call(b"", timeout=TIMEOUT), grpc.StatusCode.UNIMPLEMENTED)
    return describe(e)


def headers_before_reading(c: Case) -> str:
    """The server sends headers before reading: the client must get them while it has
    not sent a single request message."""
    requests = Requests()
    call = c.bidi("HeadersFirst")(iter(requests), timeout=3 * TIMEOUT)
    got = {}
    reader = threading.Thread(target=lambda: got.update(md=call.initial_metadata()), daemon=True)
    reader.start()
    try:
        reader.join(TIMEOUT)
        if reader.is_alive():
            # Find out whether a request releases them, to say what is wrong.
            requests.send(b"ping")
            reader.join(TIMEOUT)
            after = "arrived only after the first request" if not reader.is_alive() else "never arrived"
            raise Failure(f"no headers within {TIMEOUT:.0f} s before any request; they {after}")
        if dict(got["md"] or ()).get("x-init") != "v":
            ended = f"; the call ended {call.code().name} {call.details()!r}" if call.done() else ""
            raise Failure(f"headers without x-init: {got['md']}{ended}")
        requests.send(b"ping")
        expect("echo", next(call), b"ping")
        requests.close()
        expect("after half-close", list(call), [])
        expect_code(call, grpc.StatusCode.OK)
    finally:
        requests.close()
        call.cancel()
    return "x-init: v before the first request, then an echo"


def concurrent_streams(c: Case) -> str:
    """100 bidi streams open at once (a barrier after each one's first round trip),
    each doing several ping-pong round trips."""
    barrier = threading.Barrier(CONCURRENT)
    errors = []
    answered = []  # streams whose first ping came back
    at_break = []  # how many had when the barrier broke

    def stream(n: int) -> None:
        requests = Requests()
        call = c.bidi("PingPong")(iter(requests), timeout=4 * TIMEOUT)
        try:
            for i in range(ROUND_TRIPS):
                message = b"stream %d ping %d" % (n, i)
                requests.send(message)
                expect(f"stream {n} reply {i}", next(call), message)
                if i == 0:
                    answered.append(n)
                    barrier.wait(timeout=3 * TIMEOUT)
            requests.close()
            expect(f"stream {n} after half-close", list(call), [])
            expect_code(call, grpc.StatusCode.OK)
        except threading.BrokenBarrierError:
            at_break.append(len(answered))  # the wait timed out, or another stream failed and says why
        except (Failure, grpc.RpcError, StopIteration) as e:
            errors.append(f"stream {n}: {describe(e) if isinstance(e, grpc.RpcError) else e}")
            barrier.abort()
        finally:
            requests.close()
            call.cancel()

    threads = [threading.Thread(target=stream, args=(n,), daemon=True) for n in range(CONCURRENT)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 6 * TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    if errors or stuck or barrier.broken:
        opened = min(at_break, default=len(answered))
        first = errors[0] if errors else f"only {opened} streams got a first reply within {3 * TIMEOUT:.0f} s"
        raise Failure(f"{len(errors)} failed, {stuck} stuck; {first}")
    return f"{CONCURRENT} streams open at once, {ROUND_TRIPS} round trips each"


CASES: list[tuple[str, Callable[[Case], str]]] = [
    ("unary", unary),
    ("large messages", large),
    ("client streaming", client_streaming),
    ("server streaming", server_streaming),
    ("bidi streaming", bidi_streaming),
    ("empty stream", empty_stream),
    ("cancel after begin", cancel_after_begin),
    ("cancel after first response", cancel_after_first_response),
    ("deadline 1 ms", deadline_1ms),
    ("slow unary (6 s)", slow_unary),
    ("status with unicode", status_unicode),
    ("error metadata", error_metadata),
    ("unimplemented method", unimplemented_method),
    ("unimplemented service", unimplemented_service),
    ("headers before reading", headers_before_reading),
    ("100 concurrent streams", concurrent_streams),
]


def run_case(target: str, fn: Callable[[Case], str]) -> tuple[bool, str]:
    c = Case(target)
    try:
        return True, fn(c)
    except Failure as e:
        return False, str(e)
    except grpc.RpcError as e:
        return False, describe(e)
    except StopIteration:
        return False, "the stream ended early"
    except Exception as e:  # a bug in the case itself still shows up as a row
        return False, f"{type(e).__name__}: {e}"
    finally:
        c.close()


def run_cases(target: str, only: list[str] | None = None, out=sys.stdout) -> list[tuple[str, bool, str]]:
    """Runs the cases (all, or those named in `only`), printing each row as it ends."""
    results = []
    width = max(len(name) for name, _ in CASES)
    print(f"{'case':<{width}}  result  detail", file=out)
    print(f"{'-' * width}  ------  ------", file=out)
    for name, fn in CASES:
        if only and name not in only:
            continue
        ok, detail = run_case(target, fn)
        results.append((name, ok, detail))
        print(f"{name:<{width}}  {'pass' if ok else 'FAIL':<6}  {detail}", file=out, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT of the proxy or of a server")
    parser.add_argument("--case", action="append", choices=[name for name, _ in CASES], help="run only these")
    args = parser.parse_args()
    results = run_cases(args.target, args.case)
    failed = sum(not ok for _, ok, _ in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
