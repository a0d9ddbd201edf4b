"""``serve --workers N``: gunicorn's arbiter supervises N uvicorn workers (``uvicorn-worker``).

Why gunicorn and not uvicorn's own supervisor: uvicorn's ``Multiprocess`` pings every worker over a pipe
and kills one that does not answer within ``timeout_worker_healthcheck`` (5 s) -- also while it is still
loading the model, which on a loaded 2-core machine takes longer (issue 10: up to 75 kills in a start).
gunicorn's arbiter times a worker out only after the worker's first heartbeat, and uvicorn's worker
sends that only once its lifespan (the model load) has finished, so start-up is never cut short; after
that a worker silent for ``worker_timeout_s`` is replaced. The arbiter forks, so workers share the
parent's imports (torch) instead of re-importing them.

What this module adds on top:

* every worker serves through :class:`service.server.DrainingServer` with the guarded protocol (read
  deadlines, connection cap, drain without resets), exactly as a single process does;
* a worker dies with its supervisor: ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (Linux) makes the kernel send
  it SIGTERM when the arbiter dies, even by ``kill -9``, and the heartbeat also checks the parent id;
* each worker marks itself ready in ``worker_dir`` once it serves (and unmarks when it stops), so
  ``/readyz`` can say how many of the N workers are up;
* SIGHUP to the supervisor is forwarded to every worker, each of which swaps in the bundle at
  ``--bundle`` as a single process does (service/reload.py: same space only, no gap in serving).
  gunicorn's own SIGHUP (a new set of workers, the old ones stopped at once) would leave no worker
  accepting while the new ones load the model, and would take a bundle of another space without the
  refusal a single process gives.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import sys
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from service.server import ConnectionLimits, DrainingServer, guarded_protocol, mark_ready, unmark_ready
from service.settings import Settings

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies. False where unsupported.

    One prctl(2) call through libc: the python-prctl package (last release 2020) needs a C build against
    libcap for the same single call.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return True


def limits_from(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
        retry_after_s=settings.retry_after_s,
    )


class Worker(UvicornWorker):  # type: ignore[misc]
    """uvicorn-worker's worker, serving through :class:`DrainingServer` and dying with the arbiter."""

    CONFIG_KWARGS: dict[str, Any] = {"loop": "asyncio", "http": "h11"}  # noqa: RUF012 - the base's shape

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = Settings()  # the CLI put every flag into PROMPTDISTILL_* before the arbiter started
        self.config.http = guarded_protocol(limits_from(self.settings))
        self.config.timeout_graceful_shutdown = int(self.settings.graceful_shutdown_s)
        self.server: DrainingServer | None = None

    def init_signals(self) -> None:
        super().init_signals()
        # gunicorn resets SIGHUP to its default (exit): a SIGHUP forwarded before the app's lifespan
        # installs its reload handler (service/app.py) is ignored instead -- nothing is loaded yet anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # After the signal reset: a SIGTERM from the kernel now kills (or, once serving, drains) this worker.
        die_with_parent(signal.SIGTERM)
        if os.getppid() != self.ppid:  # the arbiter died before the request above took effect
            sys.exit(0)

    async def _serve(self) -> None:
        folder = self.settings.worker_dir
        self.config.app = self.wsgi
        self.server = DrainingServer(
            self.config, on_ready=lambda: mark_ready(folder), on_stop=lambda: unmark_ready(folder)
        )
        self._install_sigquit_handler()
        await self.server.serve(sockets=self.sockets)
        if not self.server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)

    async def callback_notify(self) -> None:
        if os.getppid() != self.ppid and self.server is not None:  # no prctl here: stop at the next beat
            log.warning("supervisor %d is gone; worker %d stops", self.ppid, os.getpid())
            self.server.should_exit = True
            return
        self.notify()


class ForwardingArbiter(Arbiter):  # type: ignore[misc]
    """gunicorn's arbiter, except that SIGHUP goes to every worker (each reloads its own bundle)."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: forwarding to %d worker(s), each re-reads the bundle", len(self.WORKERS))
        for pid in list(self.WORKERS):
            self.kill_worker(pid, signal.SIGHUP)


class Supervisor(BaseApplication):  # type: ignore[misc]
    """gunicorn configured in code (no config file): the arbiter forks ``workers`` :class:`Worker` s."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host else s.host
        options: dict[str, Any] = {
            "bind": [f"{host}:{s.port}"],
            "workers": s.workers,
            "worker_class": Worker,
            "timeout": math.ceil(s.worker_timeout_s),  # gunicorn takes whole seconds
            "graceful_timeout": math.ceil(s.graceful_shutdown_s),
            "keepalive": math.ceil(s.keep_alive_s),
            "loglevel": s.log_level,
            # gunicorn 27's control socket (gunicornc) lives in $HOME, one per machine: servers would share it
            "control_socket_disable": True,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from service.app import create_app_from_env

        return create_app_from_env()

    def run(self) -> None:
        ForwardingArbiter(self).run()
