"""The failover scenario's timeline: when node-a's proxy failed over after the kill and
failed back after a restarted replica began serving.

    timeline.py EVENTS KILLED STARTED LOGS

EVENTS is what `curl -sN .../admin/events` wrote during the scenario (Server-Sent
Events); KILLED and STARTED are, comma-separated, when each node-a replica died and
when it started again (RFC 3339, as `docker inspect` gives them); LOGS is `docker logs
--timestamps` of the restarted replicas.
"""

import json
import sys
from datetime import datetime


def parse_time(text):
    """An RFC 3339 time (the proxy's milliseconds or Docker's nanoseconds) as Unix seconds."""
    text = text.rstrip("Z")
    whole, _, fraction = text.partition(".")
    seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    return seconds + (float("0." + fraction) if fraction else 0.0)


def events(path):
    """(kind, at) for every event in an SSE capture, in order."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("data: "):
                try:
                    event = json.loads(line[len("data: "):])
                    yield event["kind"], parse_time(event["at"])
                except (ValueError, KeyError):
                    continue


def first_serving(path, since):
    """When the first restarted replica logged that it serves, from Docker's timestamps."""
    times = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stamp, _, rest = line.partition(" ")
            if "Serving hello.HelloService" in rest:
                try:
                    times.append(parse_time(stamp))
                except ValueError:
                    continue
    times = [t for t in times if t >= since - 1]
    return min(times) if times else None


def first(kinds, kind, since):
    """The first event of `kind` at or after `since`."""
    return next((at for k, at in kinds if k == kind and since is not None and at >= since), None)


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    path, logs = sys.argv[1], sys.argv[4]
    try:
        # The failover follows the last death; the failback the first start.
        killed = max(parse_time(t) for t in sys.argv[2].split(","))
        started = min(parse_time(t) for t in sys.argv[3].split(","))
    except ValueError as e:
        sys.exit(f"timeline: KILLED and STARTED must be RFC 3339 times: {e}")
    kinds = list(events(path))
    # The capture begins in steady state, so the first failover is the kill's (the proxy
    # may see the connections reset before Docker records the death), and the address
    # comes back and the failback follow it.
    failover = first(kinds, "failover", float("-inf"))
    serving = first_serving(logs, started)
    added = first(kinds, "added", failover)
    failback = first(kinds, "failback", failover)

    def after(at, origin, what):
        if at is None or origin is None:
            return "not seen"
        ms = (at - origin) * 1000
        return f"{ms:.0f} ms after {what}" if ms >= 0 else f"{-ms:.0f} ms before {what}"

    rows = [
        ("proxy failed over", after(failover, killed, "Docker saw the last node-a replica die")),
        ("a node-a replica serving", after(serving, started, "its container started")),
        ("proxy added its address", after(added, serving, "it served")),
        ("proxy failed back", after(failback, serving, "it served")),
    ]
    for name, value in rows:
        print(f"  {name:<26} {value}")


if __name__ == "__main__":
    main()
