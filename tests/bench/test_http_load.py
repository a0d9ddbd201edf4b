"""bench/harness.closed_loop's steady-state window against a real HTTP server that sheds load."""

from __future__ import annotations

from functools import partial
from typing import Any

from bench.harness import Classify, Window, closed_loop


def test_a_client_whose_retry_would_miss_the_window_stops(flaky: Any) -> None:
    """Told to wait past the window's end, a client stops: it does not re-send at once, again and again."""
    url, arrivals = flaky(429, failures=10**6, retry_after="60")  # far past the window, however slow the machine
    out = closed_loop(partial(Classify, url, [b"x"]), 4, window=Window(1.0, 4.0))
    assert len(arrivals) == 4, f"{len(arrivals)} POSTs from 4 clients each told to come back after the window"
    assert out["ok"] == 0 and out["errors"] == {} and out["refusals_retried"] == 4


def test_refusals_are_retried_after_retry_after_and_counted_from_the_first_attempt(flaky: Any) -> None:
    """Two refusals with Retry-After: 1, then answers: every request answered, and the first one's
    latency includes both waits (counted from its first attempt)."""
    url, arrivals = flaky(429, failures=2, retry_after="1")
    out = closed_loop(partial(Classify, url, [b"x"]), 1, requests=3)
    assert len(arrivals) == 5 and out["ok"] == 3 and out["refusals_retried"] == 2 and out["errors"] == {}
    assert out["p99_ms"] >= 0.98 * 2000.0  # p99 of 3 latencies: at least 98 % of the largest
