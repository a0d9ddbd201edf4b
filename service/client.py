"""A small Python client for the service (httpx2), used by ``promptdistill classify`` / ``classes``.

Errors arrive as RFC 9457 problem details and are raised as typed exceptions
(:class:`NotFound`, :class:`Conflict`, :class:`InvalidRequest` with its field ``errors``,
:class:`Overloaded` with ``retry_after_s``...), all subclasses of :class:`ServiceClientError`.
429 and 503 are retried a bounded number of times, waiting what the server's ``Retry-After`` says
(tenacity): the server refuses those before doing any work, so a retry is safe even for writes.

This module imports no torch, numpy or FastAPI: the CLI's client commands stay fast.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

CLASS_PAGE = 1000  # classes per page when listing (the server allows up to 10,000)


class ServiceClientError(RuntimeError):
    """The server refused the request (or could not be reached: ``status`` 0).

    ``problem`` is the decoded problem-details body (empty when the server sent none), ``code`` its
    machine-readable code, ``detail`` the message meant for people.
    """

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status, self.detail = status, detail
        self.problem = problem or {}
        self.code: str = str(self.problem.get("code", ""))


class Unreachable(ServiceClientError):
    """No HTTP answer at all (connection refused, timeout, reset)."""


class Unauthorized(ServiceClientError):
    """401: the API key is missing or wrong."""


class NotFound(ServiceClientError):
    """404: unknown label set, class or route."""


class Conflict(ServiceClientError):
    """409: duplicate class, existing or protected set, empty set, no text side."""


class TooLarge(ServiceClientError):
    """413: body, image bytes or pixels over the server's limits."""


class InvalidRequest(ServiceClientError):
    """415 or 422: the request is malformed; ``errors`` lists invalid fields when the server named them."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        return list(self.problem.get("errors", []))


class Overloaded(ServiceClientError):
    """429 or 503 (after the retries): ``retry_after_s`` is the server's Retry-After."""

    def __init__(
        self, status: int, detail: str, problem: dict[str, Any] | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(status, detail, problem)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceClientError):
    """504: the server could not finish within its request deadline."""


_BY_STATUS: dict[int, type[ServiceClientError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: InvalidRequest,
    422: InvalidRequest,
    429: Overloaded,
    503: Overloaded,
    504: DeadlineExceeded,
}


def error_from_response(resp: httpx2.Response) -> ServiceClientError:
    """The typed exception for an error response (problem details, or any other body)."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    problem = body if isinstance(body, dict) else {}
    detail = str(problem.get("detail") or resp.text or resp.reason_phrase)
    kind = _BY_STATUS.get(resp.status_code, ServiceClientError)
    if kind is Overloaded:
        return Overloaded(resp.status_code, detail, problem, _retry_after(resp.headers.get("retry-after")))
    return kind(resp.status_code, detail, problem)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: not sent by this server; fall back to backoff
        return None


class _WaitRetryAfter:
    """tenacity wait: the server's Retry-After when it sent one (capped), else exponential backoff."""

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s
        self.backoff = wait_exponential(multiplier=0.5, max=max_wait_s)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Overloaded) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.max_wait_s)
        return float(self.backoff(state))


class VersionsFile:
    """The versions a client saw, kept between runs (the CLI: one process per command).

    One JSON file: per label-set database (its ``X-Store-Id``, the same on every replica of a
    fleet, whatever URL reaches it), the last version seen per label set. Updates merge under an
    exclusive lock (concurrent CLI runs), keep the newer version, replace the file atomically, and
    keep the ``MAX_STORES`` most recently used databases.
    """

    MAX_STORES = 32

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):  # absent or damaged: tokens are an optimisation, start afresh
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def load(self, store_id: str) -> dict[str, int]:
        entry = self._read().get(store_id)
        versions = entry.get("versions") if isinstance(entry, dict) else None
        if not isinstance(versions, dict):
            return {}
        return {str(k): int(v) for k, v in versions.items() if isinstance(v, int)}

    def save(self, store_id: str, versions: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            merged = {**self.load(store_id)}
            for name, v in versions.items():
                merged[name] = max(v, merged.get(name, 0))
            data[store_id] = {"used": time.time(), "versions": merged}
            recent = sorted(data, key=lambda k: -float(data[k].get("used", 0)))[: self.MAX_STORES]
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: data[k] for k in recent}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)


def default_versions_file() -> Path:
    """``PROMPTDISTILL_VERSIONS_FILE``, else ``$XDG_STATE_HOME/promptdistill/versions.json``."""
    explicit = os.environ.get("PROMPTDISTILL_VERSIONS_FILE")
    if explicit:
        return Path(explicit)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "promptdistill" / "versions.json"


class Client:
    """``Client("http://127.0.0.1:8000", api_key=...)``; every method returns the decoded JSON.

    ``retries``: how many times a 429/503 is retried (0: never); ``max_wait_s`` caps one wait.
    ``versions_file``: keep the versions seen between runs (see :class:`VersionsFile`), so a later
    run still reads its own writes, whichever replica answers.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        *,
        retries: int = 3,
        max_wait_s: float = 30.0,
        versions_file: str | Path | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.url = url.rstrip("/")
        # Last version seen per label set, sent back as min_version: whichever replica answers, a
        # client sees its own writes (and never an older version than it already saw). Versions
        # only compare within one database: ``store_id`` is the one they came from.
        self.seen: dict[str, int] = {}
        self.store_id: str | None = None
        self._versions = VersionsFile(versions_file) if versions_file is not None else None
        self._asked = False  # whether the database was asked for by name (once per client)
        self._http = httpx2.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self._retrying = Retrying(
            stop=stop_after_attempt(retries + 1),
            wait=_WaitRetryAfter(max_wait_s),
            retry=retry_if_exception_type(Overloaded),
            reraise=True,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        if self._versions is not None and self.store_id and self.seen:
            self._versions.save(self.store_id, self.seen)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._retrying(self._once, method, path, **kwargs)

    def _once(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx2.TransportError as e:
            raise Unreachable(0, f"cannot reach {self._http.base_url}: {e}") from e
        self._note_store(resp)
        if resp.status_code >= 400:
            raise error_from_response(resp)
        out = resp.json()
        self._remember(out)
        return out

    def _note_store(self, resp: httpx2.Response) -> None:
        """Versions only compare within one database: a new one (re-created, or another deployment)
        starts from what the versions file kept for it."""
        store_id = resp.headers.get("x-store-id")
        if store_id and store_id != self.store_id:
            kept = self.seen if self.store_id is None else {}  # first contact: what we saw was this store's
            loaded = self._versions.load(store_id) if self._versions is not None else {}
            self.seen = {k: max(loaded.get(k, 0), kept.get(k, 0)) for k in {*loaded, *kept}}
            self.store_id = store_id

    def _remember(self, out: Any) -> None:
        items = out.get("label_sets", [out]) if isinstance(out, dict) else []
        for item in items:
            name, version = item.get("label_set", item.get("name")), item.get("version")
            if isinstance(name, str) and isinstance(version, int):
                self.seen[name] = max(version, self.seen.get(name, 0))

    def _tokens(self) -> dict[str, int]:
        """``seen`` for the server's database; with a versions file, one cheap call first names it."""
        if self.store_id is None and self._versions is not None and not self._asked:
            self._asked = True
            with contextlib.suppress(httpx2.TransportError):  # the real request reports an unreachable server
                self._note_store(self._http.get("/livez"))
        return self.seen

    def _token(self, label_set: str) -> dict[str, str]:
        seen = self._tokens()
        return {"min_version": str(seen[label_set])} if label_set in seen else {}

    # classify
    def classify_files(self, paths: Sequence[str | Path], label_set: str = "default", top_k: int = 5) -> Any:
        files = [("files", (Path(p).name, Path(p).read_bytes(), "application/octet-stream")) for p in paths]
        data = {"label_set": label_set, "top_k": str(top_k), **self._token(label_set)}
        return self._call("POST", "/v1/classify", files=files, data=data)

    def classify_bytes(self, images: Sequence[bytes], **params: Any) -> Any:
        body = {"images": [base64.b64encode(b).decode("ascii") for b in images], **params}
        if "candidate_labels" not in params and "min_version" not in params:
            body.update({k: int(v) for k, v in self._token(params.get("label_set", "default")).items()})
        return self._call("POST", "/v1/classify", json=body)

    # label sets
    def label_sets(self) -> Any:
        seen = self._tokens()
        params = {"min_version": max(seen.values())} if seen else {}
        return self._call("GET", "/v1/label-sets", params=params)

    def create_label_set(
        self, name: str, names: Sequence[str], templates: Sequence[str] | None = None, if_exists: str = "error"
    ) -> Any:
        """``if_exists="skip"``: an existing set is returned as it is instead of a 409."""
        body: dict[str, Any] = {"name": name, "names": list(names), "if_exists": if_exists}
        if templates is not None:
            body["templates"] = list(templates)
        return self._call("POST", "/v1/label-sets", json=body)

    def delete_label_set(self, name: str) -> Any:
        return self._call("DELETE", f"/v1/label-sets/{name}")

    def class_pages(self, label_set: str = "default", page_size: int = CLASS_PAGE) -> Iterator[dict[str, Any]]:
        """Every page of a set's class list, following ``next_cursor`` (ascending class ids)."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size, **self._token(label_set)}
            if cursor:
                params["cursor"] = cursor
            page = self._call("GET", f"/v1/label-sets/{label_set}/classes", params=params)
            yield page
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def iter_classes(self, label_set: str = "default", page_size: int = CLASS_PAGE) -> Iterator[dict[str, Any]]:
        """Every class of a set, page by page (memory stays at one page)."""
        for page in self.class_pages(label_set, page_size):
            yield from page["classes"]

    def classes(self, label_set: str = "default", page_size: int = CLASS_PAGE, attempts: int = 3) -> Any:
        """The whole class list as one page-shaped answer, from one version of the set.

        A write between two pages changes the set's version; the listing then starts again (up to
        ``attempts`` times) so the classes returned are exactly one version's.
        """
        for _ in range(attempts - 1):
            pages = list(self.class_pages(label_set, page_size))
            if len({p["version"] for p in pages}) == 1:
                break
        else:
            pages = list(self.class_pages(label_set, page_size))
        last = pages[-1]
        return {**last, "classes": [c for p in pages for c in p["classes"]], "next_cursor": None}

    def add_classes(
        self,
        names: Sequence[str],
        label_set: str = "default",
        templates: Sequence[str] | None = None,
        if_exists: str = "error",
    ) -> Any:
        """``if_exists="skip"``: names already in the set are left out (listed in ``skipped``) instead of a 409."""
        body: dict[str, Any] = {"names": list(names), "if_exists": if_exists}
        if templates is not None:
            body["templates"] = list(templates)
        return self._call("POST", f"/v1/label-sets/{label_set}/classes", json=body)

    def remove_class(self, label_set: str = "default", *, class_id: int | None = None, name: str | None = None) -> Any:
        if (class_id is None) == (name is None):
            raise ValueError("give exactly one of class_id or name")
        if class_id is not None:
            return self._call("DELETE", f"/v1/label-sets/{label_set}/classes/{class_id}")
        return self._call("DELETE", f"/v1/label-sets/{label_set}/classes", params={"name": name})

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def model(self) -> Any:
        """The served model card, what is loaded since when, and the reload history (GET /v1/model)."""
        return self._call("GET", "/v1/model")

    def reload(self) -> Any:
        """Swap in the bundle at the server's configured path (same embedding space; needs the key)."""
        return self._call("POST", "/v1/admin/reload")
