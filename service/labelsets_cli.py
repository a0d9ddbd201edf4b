"""``promptdistill labelsets export | import | spaces``: the command line of service/labelsets_io.py.

Each command opens the store itself (``--state-dir`` or ``--database-url``): no bundle, no running
server. Errors are one line on standard error and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from service.labelsets_io import ImportError_, export_lines, import_lines


def register(sub: Any) -> None:
    p = sub.add_parser("labelsets", help="back up, move and inspect label sets in a state dir or database")
    lsub = p.add_subparsers(dest="labelsets_cmd", required=True)
    ex = lsub.add_parser("export", help="write every set and class (ids, versions, provenance) as JSON Lines")
    _store_args(ex)
    ex.add_argument("--vectors", action="store_true", help="include every space's vectors (base64 float32)")
    ex.add_argument("-o", "--out", help="file to write (default: standard output)")
    ex.set_defaults(func=_export)
    im = lsub.add_parser("import", help="load an export into an empty database (ids and versions kept)")
    im.add_argument("file", help="a JSON Lines export ('-': standard input)")
    _store_args(im)
    im.set_defaults(func=_import)
    sp = lsub.add_parser("spaces", help="list the embedding spaces with stored vectors, or remove one")
    _store_args(sp)
    sp.add_argument("--remove", metavar="SPACE", help="delete this space's vectors (not undoable)")
    sp.set_defaults(func=_spaces)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="the SQLite database's folder (a stopped or running service's)")
    p.add_argument("--database-url", help="postgresql://... (a fleet's database; or PROMPTDISTILL_DATABASE_URL)")
    p.add_argument("--embed-dim", type=int, default=0, help="import: check vectors against this size")


def _open(args: argparse.Namespace) -> Any:
    import os

    from service.stores.sqlite import DB_FILE, SqliteStore

    url = args.database_url or os.environ.get("PROMPTDISTILL_DATABASE_URL")
    tool_space = "(labelsets tool)"  # reads and writes no space of its own
    if url:
        from service.stores.postgres import PostgresStore

        return PostgresStore(url, args.embed_dim, tool_space)
    if not args.state_dir:
        raise ImportError_("give --state-dir DIR or --database-url URL")
    state = Path(args.state_dir)
    if args.func is not _import and not (state / DB_FILE).is_file():
        raise ImportError_(f"no label-set database in {state} ({DB_FILE} is missing)")
    state.mkdir(parents=True, exist_ok=True)
    return SqliteStore(state, args.embed_dim, tool_space)


def _run(args: argparse.Namespace, work: Any) -> int:
    from service.errors import ServiceError, StartupError

    try:
        store = _open(args)
    except (ImportError_, StartupError, OSError) as e:
        print(f"promptdistill labelsets: error: {e}", file=sys.stderr)  # noqa: T201 - the CLI's one line
        return 2
    try:
        return int(work(store))
    except (ImportError_, ServiceError, OSError) as e:
        print(f"promptdistill labelsets: error: {getattr(e, 'message', e)}", file=sys.stderr)  # noqa: T201
        return 2
    finally:
        store.close()


def _export(args: argparse.Namespace) -> int:
    def work(store: Any) -> int:
        out: TextIO = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
        try:
            for line in export_lines(store, vectors=args.vectors):
                out.write(line + "\n")
        finally:
            if args.out:
                out.close()
        return 0

    return _run(args, work)


def _import(args: argparse.Namespace) -> int:
    def work(store: Any) -> int:
        src = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        try:
            counts = import_lines(store, src)
        finally:
            if src is not sys.stdin:
                src.close()
        print(json.dumps(counts))  # noqa: T201 - the command's result
        return 0

    return _run(args, work)


def _spaces(args: argparse.Namespace) -> int:
    def work(store: Any) -> int:
        if args.remove:
            with store.transaction() as db:
                removed = store.drop_space(db, args.remove)
            print(json.dumps({"removed": args.remove, "vectors": removed}))  # noqa: T201
            return 0
        print(json.dumps(store.spaces(), indent=2))  # noqa: T201
        return 0

    return _run(args, work)
