"""Virtualenvs for third-party clients whose pins fight ours (tritonclient, kserve), built once and reused.

Each requirement set gets its own folder under ``.venv-clients/`` at the repository root (or
``$PROMPTDISTILL_CLIENT_VENVS``), named by a hash of the requirements, so reruns and later sessions
reuse it; CI pays the install once per fresh checkout. A lock file keeps two test processes from
building the same one at once; ``.ready`` is written last, so a half-built folder is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
INSTALL_TIMEOUT_S = 900


def client_venv(requirements: list[str]) -> tuple[Path, float]:
    """(the venv's python, seconds spent installing now: 0 when it was already there)."""
    base = Path(os.environ.get("PROMPTDISTILL_CLIENT_VENVS", ROOT / ".venv-clients"))
    base.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
    folder = base / digest
    python = folder / "bin" / "python"
    with open(base / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / ".ready").exists():
            return python, 0.0
        shutil.rmtree(folder, ignore_errors=True)
        start = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=120)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements]
        run = subprocess.run(pip, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if run.returncode != 0:
            raise RuntimeError(f"installing {requirements} failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
        seconds = time.monotonic() - start
        (folder / ".ready").write_text(f"{seconds:.1f}\n")
        return python, seconds
