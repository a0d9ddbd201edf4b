"""``promptdistill serve | classify | classes``: run the service and talk to it."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.client import Client
    from service.settings import Settings

log = logging.getLogger(__name__)
DEFAULT_URL = "http://127.0.0.1:8000"


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="serve a bundle over REST (FastAPI + uvicorn)")
    serve.add_argument("--bundle", help="bundle folder (or PROMPTDISTILL_BUNDLE)")
    serve.add_argument("--host", help="default 127.0.0.1; other hosts need --api-key or --allow-insecure-bind")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers", type=int, help="worker processes under gunicorn's arbiter (each rebuilds its index from the DB)"
    )
    serve.add_argument(
        "--backend", choices=["auto", "onnx", "torch"], help="auto (default): ONNX when the bundle has it, else torch"
    )
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"])
    serve.add_argument("--onnx-precision", choices=["fp32", "int8"], help="serve the int8 graph (bundle built --int8)")
    serve.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "int8"],
        help="image tower precision (fp16/bf16: torch; int8: ONNX), served only if it passes the bundle's parity floor",
    )
    serve.add_argument("--state-dir", help="where the label-set database lives (PROMPTDISTILL_STATE_DIR)")
    serve.add_argument("--api-key", help="require X-API-Key on mutating routes (better: PROMPTDISTILL_API_KEY)")
    serve.add_argument("--allow-insecure-bind", action="store_true", help="listen on a non-loopback host without a key")
    serve.add_argument("--max-batch-size", type=int)
    serve.add_argument("--max-wait-ms", type=float)
    serve.add_argument(
        "--max-images-in-flight", type=int, help="admission capacity (default: from the 0.5 s latency target)"
    )
    serve.add_argument("--header-timeout", dest="header_timeout_s", type=float, help="seconds for headers (408)")
    serve.add_argument("--body-timeout", dest="body_timeout_s", type=float, help="seconds for a body (408)")
    serve.add_argument("--max-connections", type=int, help="open connections per process; beyond: 503")
    serve.add_argument("--worker-timeout", dest="worker_timeout_s", type=float, help="restart a silent worker after")
    serve.set_defaults(func=_serve)

    cls = sub.add_parser("classify", help="classify image files with a running server")
    cls.add_argument("images", nargs="+", help="image files")
    _client_args(cls)
    cls.add_argument("--top-k", type=int, default=5)
    cls.set_defaults(func=_classify)

    classes = sub.add_parser("classes", help="list, add or remove classes of a running server's label set")
    csub = classes.add_subparsers(dest="classes_cmd", required=True)
    add = csub.add_parser("add", help="add class names (encoded by the server's text side)")
    add.add_argument("names", nargs="+")
    add.add_argument(
        "--if-exists", choices=["error", "skip"], default="error", help="a name already there: fail (409) or skip it"
    )
    _client_args(add)
    add.set_defaults(func=_classes_add)
    ls = csub.add_parser("list", help="list the classes of a label set")
    _client_args(ls)
    ls.set_defaults(func=_classes_list)
    rm = csub.add_parser("remove", help="remove classes by name (or --id)")
    rm.add_argument("names", nargs="*")
    rm.add_argument("--id", type=int, action="append", default=[], help="class id (repeatable)")
    _client_args(rm)
    rm.set_defaults(func=_classes_remove)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url", default=os.environ.get("PROMPTDISTILL_URL", DEFAULT_URL), help=f"server (default {DEFAULT_URL})"
    )
    p.add_argument("--label-set", default="default")
    p.add_argument("--api-key", default=os.environ.get("PROMPTDISTILL_API_KEY"), help="or PROMPTDISTILL_API_KEY")
    p.add_argument(
        "--versions-file",
        help="where the label-set versions this machine saw are kept, so each command reads the writes of the "
        "ones before on any replica (default PROMPTDISTILL_VERSIONS_FILE or $XDG_STATE_HOME/promptdistill/"
        "versions.json; '' keeps none)",
    )


def _client(args: argparse.Namespace) -> Client:
    from service.client import Client, default_versions_file

    versions = default_versions_file() if args.versions_file is None else (args.versions_file or None)
    return Client(args.url, args.api_key, versions_file=versions)


_SERVE_FIELDS = (
    "bundle",
    "host",
    "port",
    "workers",
    "backend",
    "device",
    "onnx_precision",
    "precision",
    "state_dir",
    "api_key",
    "max_batch_size",
    "max_wait_ms",
    "max_images_in_flight",
    "header_timeout_s",
    "body_timeout_s",
    "max_connections",
    "worker_timeout_s",
)


def _serve(args: argparse.Namespace) -> int:
    from service.settings import Settings
    from service.state import preflight

    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is blank: give a real key, or leave the option out to serve without one")
    for name in _SERVE_FIELDS:  # CLI flags win over the environment; workers read it back
        value = getattr(args, name)
        if value is not None:
            os.environ[f"PROMPTDISTILL_{name.upper()}"] = str(value)
    if args.allow_insecure_bind:
        os.environ["PROMPTDISTILL_ALLOW_INSECURE_BIND"] = "1"
    settings = Settings()
    problem = settings.insecure_bind_problem()
    if problem:
        raise RuntimeError(problem)
    preflight(settings)  # fail before uvicorn starts, with the message only
    log.info(
        "serving %s on http://%s:%d (%d worker(s))", settings.bundle, settings.host, settings.port, settings.workers
    )
    if settings.workers > 1:
        return _serve_workers(settings)
    return _serve_one(settings)


def _serve_one(settings: Settings) -> int:
    """One process: uvicorn's server with the guarded protocol (service/server.py)."""
    from service.server import DrainingServer, uvicorn_config
    from service.workers import limits_from

    config = uvicorn_config(
        "service.app:create_app_from_env",
        limits_from(settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_keep_alive=math.ceil(settings.keep_alive_s),
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
        proxy_headers=False,
    )
    # uvicorn drains on SIGTERM, restores the previous handler and re-raises the signal; with this no-op
    # handler in place the process then returns normally, so a clean drain exits 0 (not -15).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server = DrainingServer(config)
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's start-up failure code


def _serve_workers(settings: Settings) -> int:
    """N processes under gunicorn's arbiter (service/workers.py); each marks itself ready in a temp folder."""
    import shutil
    import tempfile

    from service.workers import Supervisor

    folder = tempfile.mkdtemp(prefix="promptdistill-workers-")
    os.environ["PROMPTDISTILL_WORKER_DIR"] = folder
    try:
        Supervisor(settings.model_copy(update={"worker_dir": folder})).run()  # exits via SystemExit
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.classify_files(args.images, label_set=args.label_set, top_k=args.top_k)
    for path, result in zip(args.images, out["results"], strict=True):
        preds = ", ".join(f"{p['label']} {p['score']:.3f}" for p in result["predictions"])
        sys.stdout.write(f"{path}\t{result['label']}\t[{preds}]\n")
    sys.stdout.write(f"# label set {out['label_set']} version {out['version']}\n")
    return 0


def _classes_add(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.add_classes(args.names, label_set=args.label_set, if_exists=args.if_exists)
    sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return 0


def _classes_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.classes(args.label_set)  # every page, all from one version of the set
    for c in out["classes"]:
        sys.stdout.write(f"{c['id']}\t{c['name']}\t{c['provenance']}\n")
    sys.stdout.write(f"# label set {out['label_set']} version {out['version']}\n")
    return 0


def _classes_remove(args: argparse.Namespace) -> int:
    if not args.names and not args.id:
        raise ValueError("name at least one class (or --id)")
    with _client(args) as client:
        for class_id in args.id:
            out = client.remove_class(args.label_set, class_id=class_id)
            sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
        for name in args.names:
            out = client.remove_class(args.label_set, name=name)
            sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    return 0
