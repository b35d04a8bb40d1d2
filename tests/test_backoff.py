"""hivemem.backoff: a tenacity wait strategy played attempt by attempt."""

from __future__ import annotations

import tenacity

from hivemem.backoff import Backoff


def test_waits_follow_the_strategy_and_start_again_after_reset() -> None:
    backoff = Backoff(tenacity.wait_exponential(multiplier=0.1, max=1.0))
    assert [round(backoff.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.failures == 6
    backoff.reset()
    assert backoff.failures == 0 and round(backoff.next(), 3) == 0.1


def test_jittered_waits_stay_within_their_bounds() -> None:
    backoff = Backoff(tenacity.wait_exponential_jitter(initial=0.1, max=2.0, jitter=0.1))
    waits = [backoff.next() for _ in range(200)]
    assert all(0.1 <= w <= 2.0 for w in waits)
    assert waits[-1] == 2.0  # capped
