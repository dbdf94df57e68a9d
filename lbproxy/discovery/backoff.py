"""Retry pacing shared by the discovery sources."""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential backoff with jitter: base·2ⁿ, at most ``cap``, times [0.5, 1).

    Never less than half the step, so retries spread out without collapsing to zero.
    """

    def __init__(self, cap: float, *, base: float, rng: random.Random) -> None:
        self.cap = cap
        self.base = min(base, cap)
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** min(self._attempt, 32))
        self._attempt += 1
        return delay * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempt
