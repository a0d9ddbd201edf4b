"""The ``promptdistill`` console script: one parser, subcommands registered by each package.

Heavy imports (open_clip, FastAPI, training code) happen inside the handlers, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from models.runtime_check import check_flavour

# Each package contributes its subcommands through ``register(subparsers)``.
COMMAND_MODULES = ("models.cli", "service.cli", "training.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptdistill", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_flavour()
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Domain errors carry a message that says what to do; a traceback adds nothing for users.
        logging.getLogger("promptdistill").error("%s", e)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
