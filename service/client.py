"""A small Python client for the service (httpx2), used by ``promptdistill classify`` / ``classes``."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2


class ServiceClientError(RuntimeError):
    """The server answered with an error; ``status`` and ``detail`` say what."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail = status, detail


class Client:
    """``Client("http://127.0.0.1:8000", api_key=...)``; every method returns the decoded JSON."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        # Last version seen per label set, sent back as min_version: whichever replica answers, a
        # client sees its own writes (and never an older version than it already saw).
        self.seen: dict[str, int] = {}
        self._http = httpx2.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx2.TransportError as e:
            raise ServiceClientError(0, f"cannot reach {self._http.base_url}: {e}") from e
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            raise ServiceClientError(resp.status_code, str(detail))
        out = resp.json()
        self._remember(out)
        return out

    def _remember(self, out: Any) -> None:
        items = out.get("label_sets", [out]) if isinstance(out, dict) else []
        for item in items:
            name, version = item.get("label_set", item.get("name")), item.get("version")
            if isinstance(name, str) and isinstance(version, int):
                self.seen[name] = max(version, self.seen.get(name, 0))

    def _token(self, label_set: str) -> dict[str, str]:
        return {"min_version": str(self.seen[label_set])} if label_set in self.seen else {}

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
        params = {"min_version": max(self.seen.values())} if self.seen else {}
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

    def classes(self, label_set: str = "default") -> Any:
        return self._call("GET", f"/v1/label-sets/{label_set}/classes", params=self._token(label_set))

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
