"""Waits between attempts for the loops that cannot be one tenacity call.

A request that is retried is one :class:`tenacity.AsyncRetrying` (the client, the
PostgreSQL and Redis engines). Some loops are not one call: a watch stream that
reconnects and then runs for hours, a background loop that retries until it is stopped,
a compare-and-set loop whose attempts read afresh. They take their waits from
:class:`Backoff`, which plays a tenacity wait strategy (``wait_exponential_jitter``,
``wait_random_exponential``, ...) attempt by attempt, so the backoff rule is tenacity's
in every loop and written nowhere else.
"""

from __future__ import annotations

from typing import Any, cast

import tenacity
from tenacity.wait import wait_base

__all__ = ["Backoff"]


class Backoff:
    """Successive waits of a tenacity wait strategy.

    Args:
        wait: the strategy, e.g. ``tenacity.wait_exponential_jitter(initial=0.1, max=2)``
            (seconds).

    ``next()`` gives the wait after the next failure in a row (the first failure's wait
    first); ``reset()`` starts again after a success.
    """

    def __init__(self, wait: wait_base) -> None:
        self._wait = wait
        # A strategy reads only the attempt number of the state it is given.
        self._state = tenacity.RetryCallState(cast(Any, None), None, (), {})

    @property
    def failures(self) -> int:
        """Failures in a row so far (0 after :meth:`reset`)."""
        return self._state.attempt_number - 1

    def next(self) -> float:
        """Seconds to wait after one more failure."""
        seconds = float(self._wait(self._state))
        self._state.attempt_number += 1
        return seconds

    def reset(self) -> None:
        """Forget the failures (after a success)."""
        self._state.attempt_number = 1
