"""``python -m bench NAME [--quick]``: one benchmark (``BENCHES``, ``EXTRA``, ``fleet``), ``report`` or ``all``.

Each benchmark writes ``<name>.json`` (+ ``<name>.png``) into bench/results/, with the commit it
ran on; ``report`` renders BENCHMARKS.md from them; ``all`` runs ``BENCHES`` and then ``report``.
Run on a quiet machine: every result file records the load average so disturbed runs can be
recognised. ``--quick`` is a smoke test (tiny sizes, 1-2
iterations): its numbers mean nothing, and BENCHMARKS.md says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, BenchCfg

QUICK_OUT = Path(tempfile.gettempdir()) / "promptdistill-bench-quick"
BENCHES = ("encoders", "labelsets", "http_load", "payoff", "preprocess", "server", "hostile", "admission", "fairness")
# not in ``all``: peers installs its own virtualenv, gpu needs CUDA, towers runs an older commit beside this one
EXTRA = ("peers", "gpu", "towers", "lifecycle", "capture")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("which", choices=(*BENCHES, *EXTRA, "fleet", "report", "all"))
    parser.add_argument("--quick", action="store_true", help="smoke test: minimal sizes and iterations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="budget per timed measurement")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default {RESULTS}; with --quick {QUICK_OUT})"
    )
    parser.add_argument("--peers-venv", type=Path, default=None, help="peers: virtualenv for Infinity (made if absent)")
    parser.add_argument("--no-install", action="store_true", help="peers: never create the virtualenv")
    parser.add_argument("--cpu-dry-run", action="store_true", help="gpu: the GPU check on the CPU, tiny models")
    args = parser.parse_args(argv)
    # ONNX Runtime's quantiser logs every node through the root logger: keep the root at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("bench", "models"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or (QUICK_OUT if args.quick else RESULTS)  # a smoke run never overwrites real results
    cfg = BenchCfg(threads=args.threads, quick=args.quick, max_seconds=args.max_seconds, out_dir=out)
    for name in (*BENCHES, "report") if args.which == "all" else (args.which,):
        logging.getLogger("bench").info("=== %s ===", name)
        module = __import__(f"bench.{name}", fromlist=["run"])
        if name == "peers":
            module.run(cfg, venv=args.peers_venv, install=not args.no_install)
        elif name == "gpu":
            return int(module.run(cfg, dry_run=args.cpu_dry_run))
        else:
            module.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
