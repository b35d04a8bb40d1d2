"""Replica selection for RemoteHive: round robin over healthy replicas, with a circuit
breaker per replica.

States of a replica (the circuit-breaker pattern, M. Nygard, "Release It!", 2007):

- closed (healthy): takes requests in turn with the other healthy replicas;
- open (out): after ``client_circuit_failures`` consecutive failures (timeouts,
  502/503/504), or at once when a connection is refused (a TLS certificate that does
  not verify counts as refused). Any other answer, a 429 "rate limited" or a 3xx
  included, shows the replica is up and is a success. It gets no requests for
  ``client_circuit_open_seconds``, doubling (up to 30 s) each time a probe fails;
- half-open: once that time has passed, the next request may go to it as a probe;
  success closes the circuit, failure opens it again.

When every replica is out, the one whose time is up soonest is tried anyway: a
client never refuses to send a request just because everything failed before.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

__all__ = ["Endpoint", "Endpoints"]

_MAX_OPEN_SECONDS = 30.0
#: A probe that never reported back (its caller gave up) frees the replica for another
#: probe after this many seconds.
_PROBE_GRACE = 10.0


@dataclass
class Endpoint:
    """One replica's base URL and its circuit state."""

    url: str
    failures: int = 0
    open_until: float = 0.0  # monotonic seconds; 0 = closed
    open_seconds: float = 0.0
    probe_at: float = 0.0  # monotonic seconds a probe was handed out; 0 = none

    @property
    def closed(self) -> bool:
        return self.open_until == 0.0


class Endpoints:
    """The replicas of one service and their health, shared by a RemoteHive's views.

    Args:
        urls: base URLs (``http://host:port``), at least one.
        failures_to_open: ``client_circuit_failures``.
        open_seconds: ``client_circuit_open_seconds``.
    """

    def __init__(self, urls: list[str], failures_to_open: int, open_seconds: float) -> None:
        self.all = [Endpoint(u) for u in urls]
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self._next = random.randrange(len(self.all))  # spread clients over replicas

    def __len__(self) -> int:
        return len(self.all)

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """The replica for the next request: the next closed one in turn (other than
        ``avoid`` when there is a choice), else one whose open time is over (a probe),
        else the one whose open time ends soonest."""
        now = time.monotonic()
        n = len(self.all)
        fallback: Endpoint | None = None
        for i in range(n):
            ep = self.all[(self._next + i) % n]
            if ep is avoid and n > 1:
                continue
            if ep.closed:
                self._next = (self._next + i + 1) % n
                return ep
            if ep.open_until <= now and now - ep.probe_at > _PROBE_GRACE:
                ep.probe_at = now
                self._next = (self._next + i + 1) % n
                return ep
            if fallback is None or ep.open_until < fallback.open_until:
                fallback = ep
        return fallback if fallback is not None else self.all[0]

    def succeeded(self, ep: Endpoint) -> None:
        """A response came back: any status but 502/503/504, including 4xx such as 429
        (a rate limit says the replica is busy, not broken) and 3xx."""
        ep.failures = 0
        ep.open_until = 0.0
        ep.open_seconds = 0.0
        ep.probe_at = 0.0

    def failed(self, ep: Endpoint, *, refused: bool = False) -> None:
        """A request to ``ep`` failed (connection error, timeout, 502/503/504);
        ``refused``: the connection was never made (refused, DNS, TLS handshake)."""
        ep.failures += 1
        was_probe = ep.probe_at > 0.0
        ep.probe_at = 0.0
        if refused or was_probe or not ep.closed or ep.failures >= self.failures_to_open:
            ep.open_seconds = (
                self.open_seconds
                if ep.open_seconds == 0.0
                else min(ep.open_seconds * 2, _MAX_OPEN_SECONDS)
            )
            ep.open_until = time.monotonic() + ep.open_seconds

    def healthy(self) -> list[str]:
        """URLs of the replicas whose circuit is closed."""
        return [ep.url for ep in self.all if ep.closed]
