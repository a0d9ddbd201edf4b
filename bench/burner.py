"""A bounded CPU burner: ``n`` busy processes that stop by themselves after ``max_s`` seconds.

Used to start servers on a loaded machine (issue 10: ``--workers 3`` at load >= 3). Each burner is a
child process spinning until its own deadline, so a crashed caller cannot leave load behind for long;
the context manager also terminates them on exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_SPIN = "import time\nend = time.monotonic() + {max_s}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def cpu_burn(n: int, max_s: float) -> Iterator[list[int]]:
    """Run ``n`` spinning processes for at most ``max_s`` seconds; yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(max_s=max_s)]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def load_1min() -> float:
    return os.getloadavg()[0]
