"""Failed authentications per client address, counted in fixed one-minute windows, per server process.

Tokens are long random strings, so guessing is hopeless anyway; the limit keeps a misbehaving client (or a
scanner) from filling logs and spending database round trips, and answers PROTOCOL.md's 429. An address
over the limit gets 429 on every API call until its window ends, so a guess that happens to be right
teaches nothing either. Several server processes each keep their own count.
"""

from __future__ import annotations

import time

# Addresses tracked at most; past this, windows that have ended are dropped (and, if need be, the oldest).
MAX_ADDRESSES = 10_000


class FailureLimiter:
    def __init__(self, window_s: float = 60.0, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self.windows: dict[str, tuple[float, int]] = {}  # address -> (window start, failures in it)

    def retry_after(self, address: str, limit: int) -> float:
        """Seconds until `address` may call again (0: it may now). A limit of 0 or less is no limit."""
        entry = self.windows.get(address)
        if limit <= 0 or entry is None:
            return 0.0
        started, failures = entry
        left = started + self.window_s - self.clock()
        if left <= 0:
            del self.windows[address]
            return 0.0
        return left if failures >= limit else 0.0

    def failed(self, address: str) -> None:
        now = self.clock()
        started, failures = self.windows.get(address, (now, 0))
        if now - started >= self.window_s:
            started, failures = now, 0
        self.windows[address] = (started, failures + 1)
        if len(self.windows) > MAX_ADDRESSES:
            self._prune(now)

    def _prune(self, now: float) -> None:
        self.windows = {a: w for a, w in self.windows.items() if now - w[0] < self.window_s}
        while len(self.windows) > MAX_ADDRESSES:
            del self.windows[min(self.windows, key=lambda a: self.windows[a][0])]
