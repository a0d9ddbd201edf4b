"""The API through the clients people already use: a client generated from /openapi.json
(openapi-python-client), the openai client's embeddings call, and huggingface_hub's
zero-shot image classification — each against the real server over HTTP."""

from __future__ import annotations

import base64
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.service.conftest import png_bytes

KEY = "eco-key"


def _fixed_templates(folder: Path) -> Path:
    """openapi-python-client 0.29.1's endpoint template annotates a body with several content types
    (classify: JSON or multipart) as ``... | Unset`` without importing ``Unset``; the one-word fix,
    as a custom template (the generator's documented extension point)."""
    import openapi_python_client

    stock = Path(openapi_python_client.__file__).parent / "templates" / "endpoint_module.py.jinja"
    text = stock.read_text()
    assert "from ...types import Response, UNSET\n" in text, "template changed: re-check the workaround"
    folder.mkdir()
    (folder / stock.name).write_text(text.replace("import Response, UNSET\n", "import Response, UNSET, Unset\n"))
    return folder


@pytest.mark.slow
def test_generated_client_builds_and_classifies(live: Any, tmp_path: Path, photos: list[Any], monkeypatch: Any) -> None:
    with live(api_key=KEY) as server:
        spec = tmp_path / "openapi.json"
        spec.write_text(httpx2.get(server.url + "/openapi.json").text)
        config = tmp_path / "config.yaml"
        config.write_text("post_hooks: []\n")  # no formatter run on the generated code
        out = tmp_path / "pd_client"
        templates = _fixed_templates(tmp_path / "templates")
        gen = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec),
               "--output-path", str(out), "--meta", "none", "--config", str(config),
               "--custom-template-path", str(templates)]  # fmt: skip
        run = subprocess.run(gen, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "Warning" not in run.stdout, run.stdout + run.stderr
        monkeypatch.syspath_prepend(str(tmp_path))
        client_mod = importlib.import_module("pd_client")
        classify = importlib.import_module("pd_client.api.classify.classify")
        list_classes = importlib.import_module("pd_client.api.label_sets.list_classes")
        add_classes = importlib.import_module("pd_client.api.label_sets.add_classes")
        models = importlib.import_module("pd_client.models")

        client = client_mod.Client(base_url=server.url)
        image = base64.b64encode(png_bytes(photos[0])).decode()
        answer = classify.sync(client=client, body=models.ClassifyRequest(images=[image], top_k=3))
        assert isinstance(answer, models.ClassifyResponse), answer
        assert answer.label_set == "default" and len(answer.results[0].predictions) == 3
        direct = httpx2.post(server.url + "/v1/classify", json={"images": [image], "top_k": 3}).json()
        assert [p.label for p in answer.results[0].predictions] == [
            p["label"] for p in direct["results"][0]["predictions"]
        ]
        # errors come back as the typed problem models
        missing = list_classes.sync(client=client, name="nope")
        assert isinstance(missing, models.Problem) and missing.code == "unknown_label_set"
        invalid = classify.sync(client=client, body=models.ClassifyRequest(images=[image], top_k=0))
        assert isinstance(invalid, models.ValidationProblem) and invalid.errors[0].field == "top_k"
        # the security scheme: the authenticated client sends X-API-Key
        anonymous = add_classes.sync(client=client, name="default", body=models.ClassesIn(names=["okapi"]))
        assert isinstance(anonymous, models.Problem) and anonymous.status == 401
        keyed = client_mod.AuthenticatedClient(base_url=server.url, token=KEY, prefix="", auth_header_name="X-API-Key")
        added = add_classes.sync(client=keyed, name="default", body=models.ClassesIn(names=["okapi"]))
        assert isinstance(added, models.ChangeOut) and added.classes[0].name == "okapi"
        page = list_classes.sync(client=client, name="default", limit=2)
        assert isinstance(page, models.ClassList) and len(page.classes) == 2 and page.next_cursor
