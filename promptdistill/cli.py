"""The ``promptdistill`` console script: one parser, subcommands registered by each package.

Registering a subcommand imports nothing heavy: torch, open_clip, FastAPI and the training code are
imported inside the handlers, so ``--help`` and the client commands (``classify``, ``classes``) start
in a fraction of a second. Importing ``models`` no longer imports torch (see models/__init__.py).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from models.runtime_check import check_flavour

# Each package contributes its subcommands through ``register(subparsers)``.
COMMAND_MODULES = (
    "models.cli",
    "service.cli",
    "service.labelsets_cli",
    "service.capture",
    "training.cli",
    "training.shadow",
)
QUIET_LOGGERS = ("httpx2", "httpcore2", "httpx", "httpcore")


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
    if not args.verbose:  # the HTTP client logs one INFO line per request: noise unless asked for
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_flavour()
        return int(args.func(args) or 0)
    except (OSError, ValueError, RuntimeError) as e:
        # Domain errors (StartupError, bad settings, missing or unreadable files) carry a message that
        # says what to do; a traceback adds nothing for users. -v shows it.
        if args.verbose:
            raise
        sys.stderr.write(f"promptdistill {args.command}: error: {one_line(e)}\n")
        return 2


def one_line(error: BaseException) -> str:
    """``error`` as one line: pydantic validation errors name the setting, OS errors the file."""
    from pydantic import ValidationError  # only on the error path: keeps start-up imports light

    if isinstance(error, ValidationError):
        problems = []
        for item in error.errors():
            field = ".".join(str(part) for part in item["loc"])
            where = f"{field} (PROMPTDISTILL_{field.upper()})" if error.title == "Settings" and field else field
            got = f" (got {item['input']!r})" if field and not isinstance(item["input"], dict) else ""
            msg = item["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg}{got}" if where else msg)
        text = f"invalid {error.title.lower()}: " + "; ".join(problems)
    elif isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
