"""Service fixtures: settings on a tmp state dir, a real uvicorn server on 127.0.0.1, subprocess servers."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn

from bench.harness import ServerProcess, free_port
from service import Settings, create_app

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(image: Any, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def assert_same_answer(got: Any, want: Any, atol: float = 1e-6, where: str = "answer") -> None:
    """Equal JSON answers, floats within ``atol``: scores are float32 sums whose last digits differ
    between processes, FAISS builds and CPUs (seen: 0.03738753888629616 vs 0.037387539629666566)."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, int | float) and isinstance(want, int | float), (where, got, want)
        assert abs(got - want) <= atol, f"{where}: {got} != {want} (atol {atol})"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for key in want:
            assert_same_answer(got[key], want[key], atol, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_answer(g, w, atol, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.fixture(autouse=True)
def _isolated_env() -> Iterator[None]:
    """No PROMPTDISTILL_* variable leaks into a test (from the shell) or out of one (``serve`` sets them)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PROMPTDISTILL_")}
    for k in saved:
        del os.environ[k]
    yield
    for k in [k for k in os.environ if k.startswith("PROMPTDISTILL_")]:
        del os.environ[k]
    os.environ.update(saved)


@pytest.fixture
def make_settings(tiny_bundle_dir: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"bundle": tiny_bundle_dir, "state_dir": tmp_path / "state", "threads": 1}
        values.update(overrides)
        return Settings(**values)

    return make


class LiveServer:
    """A real uvicorn server running the app in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def services(self) -> Any:
        return self.app.state.services

    def client(self, **kwargs: Any) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, timeout=30.0, **kwargs)


@pytest.fixture
def live(make_settings: Callable[..., Settings]) -> Callable[..., Any]:
    """``with live(**settings_overrides) as server:`` -> a started :class:`LiveServer`."""

    def start(**overrides: Any) -> LiveServer:
        return LiveServer(make_settings(**overrides))

    return start


@pytest.fixture(scope="module")
def shared_server(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One started server with default settings for a whole module (like infinity's end-to-end tests).

    For tests that need a running service but not a fresh one: each must leave the classes it finds
    in place, and name its own label sets so that no other test of the module depends on them.
    """
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("PROMPTDISTILL_")]}
    try:  # settings are read once, here: nothing from the shell's PROMPTDISTILL_* may leak in
        settings = Settings(bundle=tiny_bundle_dir, state_dir=tmp_path_factory.mktemp("shared-state"), threads=1)
    finally:
        os.environ.update(saved)
    with LiveServer(settings) as server:
        yield server


@contextmanager
def subprocess_server(
    bundle: Path, state_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """``promptdistill serve`` in a child process (bench/harness.py), ready; killed on exit if still running."""
    server = ServerProcess.serve(bundle, state_dir, *extra, env=env)
    server.start()
    try:
        server.wait_ready(START_TIMEOUT_S)
        yield server
    finally:
        server.kill()
