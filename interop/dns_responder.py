"""A tiny DNS responder on UDP for the interop suite: A records from a fixed table.

The proxy finds replicas by resolving one name to every replica's address (a headless
Service); this answers that name with both grpcio servers' addresses, so the proxy can
be pointed at it with --dns-server. AAAA queries get an empty answer, unknown names
NXDOMAIN. Standard library only; runs in a thread of the caller.
"""

import ipaddress
import socket
import struct
import threading

TTL = 0
NXDOMAIN = 3
TYPE_A = 1
CLASS_IN = 1


def parse_question(packet: bytes) -> tuple[str, int, int]:
    """The first question's name (lowercase, no trailing dot), its type, and the
    offset just past it."""
    labels, i = [], 12
    while True:
        n = packet[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0:
            raise ValueError("compressed name in a question")
        labels.append(packet[i + 1 : i + 1 + n].decode("ascii").lower())
        i += 1 + n
    qtype, _qclass = struct.unpack_from("!HH", packet, i)
    return ".".join(labels), qtype, i + 4


def answer(packet: bytes, table: dict[str, list[str]]) -> bytes:
    """The response to one query packet."""
    ident, flags, qdcount = struct.unpack_from("!HHH", packet)
    if qdcount != 1:
        raise ValueError(f"{qdcount} questions")
    name, qtype, end = parse_question(packet)
    question = packet[12:end]
    ips = table.get(name)
    rcode = 0 if ips is not None else NXDOMAIN
    records = []
    if ips and qtype == TYPE_A:
        for ip in ips:
            rdata = ipaddress.IPv4Address(ip).packed
            # 0xC00C points at the name in the question.
            records.append(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, len(rdata)) + rdata)
    # QR, opcode 0, AA, RD as asked, RA.
    reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | 0x0080 | rcode
    header = struct.pack("!HHHHHH", ident, reply_flags, 1, len(records), 0, 0)
    return header + question + b"".join(records)


class Dns:
    """Answers on `ip` at a free UDP port until stopped."""

    def __init__(self, ip: str, table: dict[str, list[str]]):
        self.table = {name.lower().rstrip("."): ips for name, ips in table.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 0))
        self.addr = "%s:%d" % self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, name="dns", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                packet, peer = self.sock.recvfrom(4096)
            except OSError:
                return  # closed by stop()
            try:
                self.sock.sendto(answer(packet, self.table), peer)
            except (ValueError, IndexError, struct.error, UnicodeDecodeError):
                continue  # not a query we can answer: the resolver will time out
            except OSError:
                return

    def stop(self) -> None:
        # shutdown() wakes the blocked recvfrom; close() alone may not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=2)
