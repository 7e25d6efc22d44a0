"""A grpcio (grpc-core) server for the interop suite: service interop.Test, raw bytes.

Messages are plain bytes (no protobuf): every handler is registered with no
serializer, so what the client sends is what the handler gets.

    python3 interop/server.py --listen 127.0.0.21:50051 --name s1 [--state-dir DIR]

Prints one line, `ready NAME ADDRESS`, when it accepts calls. Cancellations are
recorded as files in --state-dir, so several servers behind one proxy can share them
and a client can ask any of them (CancelSeen) whether the server it reached saw it.
"""

import argparse
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent import futures

import grpc

SERVICE = "interop.Test"
LARGE_REPLY = 310 * 1024
FAIL_CODE = grpc.StatusCode.FAILED_PRECONDITION
FAIL_MESSAGE = "ünïcødé\nline two ✓"
FAIL_BINARY = b"\x00\x01\xff"
HANG_LIMIT_S = 30  # a Hang call nobody cancels ends by itself after this


def pattern(n: int) -> bytes:
    """n bytes of a fixed pattern that a truncated or reordered copy cannot match."""
    block = bytes(range(251))  # a prime length, so offsets show through
    return (block * (n // len(block) + 1))[:n]


class Test:
    """The handlers; `name` goes into replies, `state` holds the cancel records."""

    def __init__(self, name: str, state: str):
        self.name = name
        self.state = state

    # Unary

    def echo(self, request: bytes, context) -> bytes:
        context.set_trailing_metadata((("x-server", self.name),))
        return request

    def name_of(self, request: bytes, context) -> bytes:
        return self.name.encode()

    def large(self, request: bytes, context) -> bytes:
        """The request's SHA-256, then a pattern up to 310 KB."""
        digest = hashlib.sha256(request).digest()
        return digest + pattern(LARGE_REPLY - len(digest))

    def sleep(self, request: bytes, context) -> bytes:
        """Sleeps for the milliseconds in the request, or until the call ends."""
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(int(request or b"1000") / 1000)
        return b"slept"

    def fail(self, request: bytes, context) -> bytes:
        """Headers with custom metadata, then a status with Unicode, newlines and
        binary trailing metadata."""
        context.send_initial_metadata((("x-custom-init", "hello"), ("x-server", self.name)))
        context.set_trailing_metadata((("x-bin-bin", FAIL_BINARY), ("x-trail", "t")))
        context.abort(FAIL_CODE, FAIL_MESSAGE)

    def cancel_seen(self, request: bytes, context) -> bytes:
        """What happened to the Hang call with this token: b"", b"started" or
        b"cancelled"."""
        token = request.decode()
        for state in ("cancelled", "started"):
            if os.path.exists(self._record(token, state)):
                return state.encode()
        return b""

    # Streaming

    def client_stream(self, requests, context) -> bytes:
        """b"COUNT:" and every request concatenated."""
        parts = list(requests)
        return b"%d:" % len(parts) + b"".join(parts)

    def server_stream(self, request: bytes, context):
        """As many replies as the request's number."""
        for i in range(int(request)):
            yield b"%d of %s from %s" % (i, request, self.name.encode())

    def ping_pong(self, requests, context):
        for request in requests:
            yield request

    def empty(self, requests, context):
        """Reads every request, answers none; the count goes in the trailers."""
        count = sum(1 for _ in requests)
        context.set_trailing_metadata((("x-requests", str(count)),))
        return iter(())

    def headers_first(self, requests, context):
        """Sends headers before reading anything, then echoes."""
        context.send_initial_metadata((("x-init", "v"),))
        for request in requests:
            yield request

    def hang(self, requests, context):
        """The first request is `TOKEN REPLIES`: records `started`, sends that many
        replies, then waits for the call to end; records `cancelled` if it ended
        before this handler did (the call has no deadline, so only a cancel ends it)."""
        token, replies = next(requests).decode().split()
        finished = threading.Event()
        ended = threading.Event()

        def on_end():
            if not finished.is_set():
                self._mark(token, "cancelled")
            ended.set()

        self._mark(token, "started")
        if not context.add_callback(on_end):
            on_end()  # already over
        for i in range(int(replies)):
            yield b"reply %d" % i
        ended.wait(HANG_LIMIT_S)
        finished.set()

    def _record(self, token: str, state: str) -> str:
        if not token.isalnum():
            raise ValueError(f"bad token {token!r}")
        return os.path.join(self.state, f"{token}.{state}")

    def _mark(self, token: str, state: str) -> None:
        with open(self._record(token, state), "w"):
            pass

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Echo": unary(self.echo),
                "Name": unary(self.name_of),
                "Large": unary(self.large),
                "Sleep": unary(self.sleep),
                "Fail": unary(self.fail),
                "CancelSeen": unary(self.cancel_seen),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "PingPong": grpc.stream_stream_rpc_method_handler(self.ping_pong),
                "Empty": grpc.stream_stream_rpc_method_handler(self.empty),
                "HeadersFirst": grpc.stream_stream_rpc_method_handler(self.headers_first),
                "Hang": grpc.stream_stream_rpc_method_handler(self.hang),
            },
        )


def serve(listen: str, name: str, state: str) -> grpc.Server:
    # Every streaming call holds a worker thread: 100 concurrent streams need 100.
    # The proxy pings each connection every second to notice a dead replica within 2 s.
    # grpc-core (like grpc-go) refuses pings more often than every 5 minutes while it
    # sends nothing, and answers GOAWAY "too_many_pings": a server behind the proxy
    # must permit them, as gRPC's keepalive guide says for any client keepalive.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=300),
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    server.add_generic_rpc_handlers((Test(name, state).handler(),))
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--name", required=True, help="server name in replies")
    parser.add_argument("--state-dir", help="where cancels are recorded [a new temporary directory]")
    args = parser.parse_args()
    state = args.state_dir or tempfile.mkdtemp(prefix="interop-state-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server = serve(args.listen, args.name, state)
        print(f"ready {args.name} {args.listen}", flush=True)
        server.wait_for_termination()
    except KeyboardInterrupt:
        return 0
    except (OSError, RuntimeError) as e:  # grpcio raises RuntimeError when it cannot bind
        print(f"server {args.name}: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.state_dir:
            shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
