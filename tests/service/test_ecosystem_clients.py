"""The API through the clients people already use: a client generated from /openapi.json
(openapi-python-client), the openai client's embeddings call, and huggingface_hub's
zero-shot image classification — each against the real server over HTTP."""

from __future__ import annotations

import base64
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
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


def _data_uri(image: Any) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.mark.slow
def test_openai_embeddings_are_what_classify_searches_with(live: Any, photos: list[Any]) -> None:
    from openai import OpenAI

    with live() as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        images = [_data_uri(p) for p in photos[:2]]
        # the openai client asks for base64 by default and decodes it; ask for floats once as well
        got = client.embeddings.create(model="tiny", input=images, extra_body={"modality": "image"})
        floats = client.embeddings.create(
            model="tiny", input=images, encoding_format="float", extra_body={"modality": "image"}
        )
        assert [d.index for d in got.data] == [0, 1] and got.usage.prompt_tokens == 2
        emb = np.array([d.embedding for d in got.data])  # [2, D]
        assert np.allclose(emb, np.array([d.embedding for d in floats.data]), atol=1e-6)
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
        snap = server.services.registry.get("default")
        answer = httpx2.post(server.url + "/v1/classify", json={"images": images, "top_k": len(snap)}).json()
        by_id = {int(i): row for row, i in enumerate(snap.ids)}
        for b, result in enumerate(answer["results"]):
            for p in result["predictions"]:
                assert abs(float(emb[b] @ snap.vectors[by_id[p["class_id"]]]) - p["cosine"]) < 1e-4
        # texts: the vector a class of that name gets (the bundle's stored "cat" and "rocket")
        texts = client.embeddings.create(model="tiny", input=["cat", "rocket", "cat"])
        vec = np.array([d.embedding for d in texts.data])
        for row, name in enumerate(["cat", "rocket", "cat"]):
            assert float(vec[row] @ snap.vectors[snap.names.index(name)]) > 1 - 1e-4
        # images only as base64 / data: URIs, and the same refusals as classify
        with httpx2.Client(base_url=server.url) as http:
            url = http.post("/v1/embeddings", json={"input": ["https://example.com/cat.jpg"], "modality": "image"})
            assert url.status_code == 422 and url.headers["content-type"] == "application/problem+json"
            dims = http.post("/v1/embeddings", json={"input": ["cat"], "dimensions": 3})
            assert dims.status_code == 422 and "dimensions" in dims.json()["detail"]


_HF_SCRIPT = """
import json, sys
from huggingface_hub import InferenceClient
client = InferenceClient(model=sys.argv[1])
out = [client.zero_shot_image_classification(path, candidate_labels=["cat", "dog", "rocket"]) for path in sys.argv[2:]]
print(json.dumps([[{"label": e.label, "score": e.score} for e in answer] for answer in out]))
"""


@pytest.mark.slow
def test_hugging_face_client_gets_hugging_face_answers(live: Any, photos: list[Any], tmp_path: Path) -> None:
    paths = []
    for i, p in enumerate(photos[:2]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(p))
    # huggingface_hub refuses every URL, even a loopback one, while HF_HUB_OFFLINE=1: unset it for
    # the client process only (README, "Serving")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    with live() as server:
        endpoint = server.url + "/v1/classify"
        cmd = [sys.executable, "-c", _HF_SCRIPT, endpoint, *map(str, paths)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        offline = subprocess.run(
            cmd[:5], capture_output=True, text=True, timeout=120, env={**env, "HF_HUB_OFFLINE": "1"}
        )
        labels = ["cat", "dog", "rocket"]
        several = httpx2.post(endpoint, json={"inputs": [_data_uri(p) for p in photos[:2]],
                                              "parameters": {"candidate_labels": labels}}).json()  # fmt: skip
        ours = httpx2.post(endpoint, json={"images": [_data_uri(photos[0])], "candidate_labels": labels}).json()
    assert run.returncode == 0, run.stderr[-2000:]
    single = json.loads(run.stdout)
    assert offline.returncode != 0, "HF_HUB_OFFLINE=1 no longer blocks the client: update the README"
    assert len(single) == 2 and all(len(answer) == 3 for answer in single)
    for answer in single:  # best first, the softmax over the candidates
        assert [e["score"] for e in answer] == sorted((e["score"] for e in answer), reverse=True)
        assert sorted(e["label"] for e in answer) == labels and abs(sum(e["score"] for e in answer) - 1) < 1e-4
    assert isinstance(several, list) and len(several) == 2
    for from_client, from_list in zip(single, several, strict=True):  # one call per image == one list call
        assert [e["label"] for e in from_client] == [e["label"] for e in from_list]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(from_client, from_list, strict=True))
    assert [p["label"] for p in ours["results"][0]["predictions"]] == [e["label"] for e in single[0]]
