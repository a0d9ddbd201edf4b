"""bench/http_load.load's steady-state window against a real HTTP server that sheds load."""

from __future__ import annotations

from typing import Any

from bench.http_load import load


def test_a_client_whose_retry_would_miss_the_window_stops(flaky: Any) -> None:
    """Told to wait past the window's end, a client stops: it does not re-send at once, again and again."""
    url, arrivals = flaky(429, failures=10**6, retry_after="60")  # far past the window, however slow the machine
    port = int(url.rsplit(":", 1)[1])
    out = load(port, 4, 0, [b"{}"], 0.0, honour_retry_after=True, window=(1.0, 4.0))
    assert len(arrivals) == 4, f"{len(arrivals)} POSTs from 4 clients each told to come back after the window"
    assert out["ok"] == 0 and out["errors"] == {} and out["refusals_retried"] == 4
