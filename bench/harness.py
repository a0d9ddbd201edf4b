"""One harness for tests and benchmarks: a server child process and a closed-loop load.

:class:`ServerProcess` starts ``promptdistill serve`` (or a peer's command) on a free loopback port,
with its output in a log file (a pipe can fill up and stall the server), waits for its health route
with a deadline, and stops it with SIGTERM (then SIGKILL). :func:`closed_loop` is the one load loop:
``c`` clients, each sending its next request when the last one is answered, for a fixed count or a
steady-state window. Every HTTP call to our server goes through the project's own
:class:`service.client.Client`.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np

from service.client import Client, Overloaded, ServiceClientError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server child process on 127.0.0.1:``port``; ``start()``, ``wait_ready()``, ``stop()``.

    ``ServerProcess.serve(bundle, state_dir, "--workers", "2", env={...})`` is ``promptdistill serve``
    from ``repo`` (default: this checkout; another checkout serves an older commit) with no
    ``PROMPTDISTILL_*`` setting leaking in from the shell. It is a context manager (start + ready,
    then stop).
    """

    def __init__(
        self,
        cmd: Sequence[str],
        port: int,
        log: Path,
        env: Mapping[str, str],
        *,
        health: str = "/readyz",
        cwd: Path = REPO,
    ) -> None:
        self.cmd, self.port, self.log, self.env, self.health, self.cwd = list(cmd), port, log, dict(env), health, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def serve(
        cls,
        bundle: Path,
        state_dir: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        threads: int = 1,
        log: Path | None = None,
        port: int | None = None,
        repo: Path = REPO,
    ) -> ServerProcess:
        """``promptdistill serve`` (not started yet); ``env`` adds settings to the defaults."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(bundle), "--state-dir", str(state_dir)]
        cmd += ["--port", str(port), *args]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTDISTILL_")}
        child_env.update({"PYTHONPATH": str(repo), "PROMPTDISTILL_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
        child_env.update(env or {})
        return cls(cmd, port, log or state_dir.with_name(f"{state_dir.name}-server.log"), child_env, cwd=repo)

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout_s)

    def start(self) -> ServerProcess:
        """Start (again, after a stop or kill: same port, same log, appended)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.is_file() else ""

    def _healthy(self) -> bool:
        try:
            if self.health == "/readyz":  # ours: the project's client (200 only when every worker serves)
                with Client(self.url, timeout_s=5.0, retries=0) as c:
                    return c.ready()
            return httpx2.get(self.url + self.health, timeout=5.0).status_code == 200  # a peer's own route
        except (httpx2.TransportError, ServiceClientError):
            return False

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds until the health route answered 200; raises with the log's tail if it exited or timed out."""
        assert self.proc is not None, "not started"
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.output()}")
            if self._healthy():
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"server at {self.url} not ready after {timeout_s} s:\n{self.output()}")

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (a graceful drain), SIGKILL if it is still running after ``timeout_s``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL (no drain: what a crash looks like); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=60)

    def client(self, **kwargs: Any) -> Client:
        return Client(self.url, **kwargs)

    def __enter__(self) -> ServerProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- one load loop

Send = Callable[[int], Any]  # one request (the i-th): returns on success, raises ServiceClientError otherwise


@dataclass(frozen=True)
class Window:
    """Steady state: clients send until ``warm_up_s + measure_s``; answers inside the measured part count."""

    warm_up_s: float
    measure_s: float


def closed_loop(
    make_send: Callable[[], Send],
    concurrency: int,
    *,
    requests: int = 0,
    window: Window | None = None,
    max_seconds: float = 600.0,
    honour_retry_after: bool = True,
    max_wait_s: float = 60.0,
) -> dict[str, Any]:
    """``concurrency`` clients (threads, each with its own ``make_send()``), each sending its next
    request when the last one was answered: ``requests`` in all, or for a steady-state ``window``.

    A refusal (:class:`Overloaded`: 429 / 503 with ``Retry-After``) is retried after that delay
    (at most ``max_wait_s``) when ``honour_retry_after``, its latency counted from the first attempt
    (``p50_ms``; ``attempt_p50_ms`` counts the answered attempt alone); near a window's end a client
    that would sleep past it stops instead (sending again at once would hammer a server that asked
    for a delay). With a window, throughput is answers inside it / ``measure_s``: a fixed count ends
    with a tail in which few clients are left, charging a server that sheds load for its clients'
    back-off.
    """
    done: list[tuple[float, float, float, int]] = []  # (finished at, ms from first attempt, ms of last, status)
    refused: list[float] = []  # ms until each retried refusal
    lock = threading.Lock()
    counter = iter(range(requests)) if window is None else itertools.count()
    open_from = close_at = 0.0  # set when the clients start

    def one(send: Send, i: int) -> tuple[float, int] | None:
        """(ms of the last attempt, status); None: the client stops (its retry would miss the window)."""
        while True:
            start = time.perf_counter()
            try:
                send(i)
                return (time.perf_counter() - start) * 1000.0, 200
            except Overloaded as e:
                if not (honour_retry_after and e.retry_after_s is not None):
                    return (time.perf_counter() - start) * 1000.0, e.status
                wait = min(e.retry_after_s, max_wait_s)
                with lock:
                    refused.append((time.perf_counter() - start) * 1000.0)
                if window is not None and time.perf_counter() + wait > close_at:
                    return None
                time.sleep(wait)
            except ServiceClientError as e:  # Unreachable (a transport error) has status 0
                return (time.perf_counter() - start) * 1000.0, e.status

    def client(send: Send) -> None:
        try:
            for i in counter:  # shared iterator: each index taken once (next() on a C iterator is atomic)
                if time.perf_counter() > close_at:
                    return
                start = time.perf_counter()
                got = one(send, i)
                if got is None:
                    return
                now = time.perf_counter()
                with lock:
                    done.append((now, (now - start) * 1000.0, got[0], got[1]))
        finally:
            close = getattr(send, "close", None)
            if close is not None:
                close()

    senders = [make_send() for _ in range(concurrency)]  # connections' set-up is not the server's time
    threads = [threading.Thread(target=client, args=(send,)) for send in senders]
    t0 = time.perf_counter()
    if window is None:
        open_from, close_at = t0, t0 + max_seconds
    else:
        open_from, close_at = t0 + window.warm_up_s, t0 + window.warm_up_s + window.measure_s
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if window is not None:
        done = [d for d in done if open_from <= d[0] <= close_at]
    return summarise(done, concurrency, refused, wall if window is None else window.measure_s, window)


def summarise(
    done: list[tuple[float, float, float, int]],
    concurrency: int,
    refused: list[float],
    seconds: float,
    window: Window | None,
) -> dict[str, Any]:
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) if values else float("nan")

    latencies = [ms for _, ms, _, status in done if status == 200]
    attempts = [ms for _, _, ms, status in done if status == 200]
    errors: dict[str, int] = {}
    for *_, status in done:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "ok": len(latencies),
        "errors": errors,
        "refusals_retried": len(refused),
        "refusal_p50_ms": pct(refused, 50) if refused else None,
        "seconds": seconds,
        "throughput_rps": len(latencies) / seconds,
        "p50_ms": pct(latencies, 50),
        "p95_ms": pct(latencies, 95),
        "p99_ms": pct(latencies, 99),
        "attempt_p50_ms": pct(attempts, 50),
        "attempt_p99_ms": pct(attempts, 99),
    }
    if window is not None:
        out["window_s"] = {"warm_up": window.warm_up_s, "measured": window.measure_s}
    return out


class Classify:
    """``Send`` for our server: one image per request through the project's :class:`Client`."""

    def __init__(self, url: str, images: Sequence[bytes], **params: Any) -> None:
        self.client = Client(url, timeout_s=300.0, retries=0)  # refusals are the load loop's to count
        self.images, self.params = images, params

    def __call__(self, i: int) -> Any:
        return self.client.classify_bytes([self.images[i % len(self.images)]], **self.params)

    def close(self) -> None:
        self.client.close()


class PostJson:
    """``Send`` for a peer's own API (not ours: the project's client does not speak it): POST a JSON body."""

    def __init__(self, url: str, path: str, bodies: Sequence[dict[str, Any]]) -> None:
        self.http = httpx2.Client(base_url=url, timeout=300.0)
        self.path, self.bodies = path, bodies

    def __call__(self, i: int) -> None:
        from service.client import error_from_response

        resp = self.http.post(self.path, json=self.bodies[i % len(self.bodies)])
        if resp.status_code >= 400:
            raise error_from_response(resp)

    def close(self) -> None:
        self.http.close()


def metrics(url: str, prefix: str) -> dict[str, float]:
    """Our server's Prometheus samples whose names start with ``prefix`` (prefix removed; labels in braces).

    ``/metrics`` is Prometheus text, not JSON: the project's client does not read it.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx2.get(url + "/metrics", timeout=30.0).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[sample.name[len(prefix) :] + (f"{{{labels}}}" if labels else "")] = sample.value
    return out
