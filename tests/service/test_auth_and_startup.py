"""API key on mutating routes, the insecure-bind refusal, and start-up errors with clear messages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from promptdistill.cli import main
from service import Settings, create_app
from service.errors import StartupError
from tests.service.conftest import ROOT

KEY = "s3cret-key"
MUTATING = [
    ("POST", "/v1/label-sets", {"json": {"name": "pets", "names": ["cat"]}}),
    ("POST", "/v1/label-sets/default/classes", {"json": {"names": ["emu"]}}),
    ("DELETE", "/v1/label-sets/default/classes/0", {}),
    ("DELETE", "/v1/label-sets/default/classes", {"params": {"name": "dog"}}),
    ("DELETE", "/v1/label-sets/pets", {}),
    ("POST", "/v1/admin/reload", {}),
]


def test_every_mutating_route_needs_the_key_and_health_stays_open(live: Any) -> None:
    with live(api_key=KEY) as server, server.client() as http:
        # every route the app declares with a mutating method must be in MUTATING (no forgotten route)
        paths = http.get("/openapi.json").json()["paths"]
        declared = {(m.upper(), p) for p, ops in paths.items() for m in ops if m in {"post", "delete", "put", "patch"}}
        assert declared - {("POST", "/v1/classify"), ("POST", "/v1/embeddings")} == {  # reads, not mutations
            ("POST", "/v1/label-sets"),
            ("POST", "/v1/label-sets/{name}/classes"),
            ("DELETE", "/v1/label-sets/{name}/classes/{class_id}"),
            ("DELETE", "/v1/label-sets/{name}/classes"),
            ("DELETE", "/v1/label-sets/{name}"),
            ("POST", "/v1/admin/reload"),
        }
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            for method, url, kwargs in MUTATING:
                resp = http.request(method, url, headers=headers, **kwargs)
                assert resp.status_code == 401, (method, url, headers, resp.text)
                assert "X-API-Key" in resp.json()["detail"]
        for path in ("/livez", "/readyz", "/metrics", "/v1/label-sets", "/v1/label-sets/default/classes", "/docs"):
            assert http.get(path).status_code == 200, path
        classes = http.get("/v1/label-sets/default/classes").json()["classes"]
        assert {"cat", "dog"} <= {c["name"] for c in classes}, "a refused request changed something"
        ok = {"X-API-Key": KEY}
        codes = [http.request(m, u, headers=ok, **kw).status_code for m, u, kw in MUTATING]
        assert codes == [201, 201, 200, 200, 200, 200]


def test_serve_refuses_public_bind_without_key(tiny_bundle_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("PROMPTDISTILL_API_KEY", raising=False)
    started = []
    monkeypatch.setattr("service.cli._serve_one", lambda settings: started.append({"host": settings.host}) or 0)
    base = ["serve", "--bundle", str(tiny_bundle_dir), "--state-dir", str(tmp_path / "s")]
    assert main([*base, "--host", "0.0.0.0"]) == 2
    assert main([*base, "--host", "192.168.1.5"]) == 2
    assert not started
    assert main([*base, "--host", "0.0.0.0", "--allow-insecure-bind"]) == 0
    assert main([*base, "--host", "0.0.0.0", "--api-key", KEY]) == 0
    assert main([*base, "--host", "127.0.0.1"]) == 0
    assert [k["host"] for k in started] == ["0.0.0.0", "0.0.0.0", "127.0.0.1"]


def _start(settings: Any) -> None:
    with TestClient(create_app(settings)):
        pass


def _without_onnx(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["image_encoder"]["onnx"] = []
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_backend_auto_picks_what_the_bundle_has(make_settings: Any, tiny_bundle_dir: Path, tmp_path: Path) -> None:
    no_onnx = _without_onnx(tiny_bundle_dir, tmp_path / "no-onnx")
    for bundle, want in ((tiny_bundle_dir, "onnx"), (no_onnx, "torch")):
        settings = make_settings(bundle=bundle, state_dir=tmp_path / want)
        assert settings.backend == "auto"  # the default
        with TestClient(create_app(settings)) as http:
            assert http.app.state.services.encoder.backend == want  # type: ignore[attr-defined]
            assert http.get("/readyz").status_code == 200


def _clear_promptdistill_env() -> None:
    for k in [k for k in os.environ if k.startswith("PROMPTDISTILL_")]:
        del os.environ[k]


def test_serve_start_up_errors_are_one_line_and_exit_2(
    tiny_bundle_dir: Path, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    monkeypatch.setattr("service.cli._serve_one", lambda settings: pytest.fail("served despite a start-up error"))
    no_onnx = _without_onnx(tiny_bundle_dir, tmp_path / "no-onnx")
    state = ["--state-dir", str(tmp_path / "state")]
    cases = [
        (["--bundle", str(tmp_path / "nowhere")], "manifest.json is missing"),
        (["--bundle", str(no_onnx), "--backend", "onnx"], "--onnx.*--backend torch"),
        (["--bundle", str(tiny_bundle_dir), "--onnx-precision", "int8"], "no such ONNX graph"),
        (["--bundle", str(tiny_bundle_dir), "--port", "70000"], r"port \(PROMPTDISTILL_PORT\).*70000"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((["--bundle", str(tiny_bundle_dir), "--device", "cuda"], "no CUDA device"))
    for args, message in cases:
        # `serve` hands its flags to the workers through the environment; not monkeypatch.delenv: it
        # would put them back after this module's _isolated_env cleaned up, into later tests
        _clear_promptdistill_env()
        assert main(["serve", *args, *state]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(message, err) and err.startswith("promptdistill serve: error: "), err
    other = tmp_path / "other"  # no text side: another space, and nothing to encode runtime classes with
    shutil.copytree(tiny_bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["text_encoder"] = None
    (other / "manifest.json").write_text(json.dumps(manifest))
    seeded = tmp_path / "seeded"
    _clear_promptdistill_env()
    with TestClient(create_app(Settings(bundle=tiny_bundle_dir, state_dir=seeded, threads=1))) as http:
        assert http.post("/v1/label-sets/default/classes", json={"names": ["okapi"]}).status_code == 201
    assert main(["serve", "--bundle", str(other), "--state-dir", str(seeded)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no text side" in err and "default/okapi" in err, err
    monkeypatch.setenv("PROMPTDISTILL_MAX_WAIT_MS", "soon")  # a bad setting from the environment
    assert main(["serve", "--bundle", str(tiny_bundle_dir), *state]) == 2
    assert "max_wait_ms (PROMPTDISTILL_MAX_WAIT_MS)" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter (the in-process test covers the messages)
def test_serve_without_bundle_fails_in_one_line_from_the_shell(tmp_path: Path) -> None:
    """The real console entry point: no traceback on stderr, exit status 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTDISTILL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(tmp_path / "missing")],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"promptdistill serve: error: cannot serve bundle {tmp_path / 'missing'}: not a bundle: "
        f"{tmp_path / 'missing' / 'manifest.json'} is missing (the folder does not exist)"
    ]


def test_startup_errors_say_what_to_fix(make_settings: Any, tiny_bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="manifest.json is missing"):
        _start(make_settings(bundle=tmp_path / "nowhere"))
    with pytest.raises(StartupError, match="no bundle given"):
        _start(make_settings(bundle=None))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle_dir, corrupt)
    with (corrupt / "class_vectors.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(StartupError, match="corrupted"):
        _start(make_settings(bundle=corrupt))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StartupError, match="not writable.*PROMPTDISTILL_STATE_DIR"):
        _start(make_settings(state_dir=blocker / "state"))
    no_onnx = _without_onnx(tiny_bundle_dir, tmp_path / "no-onnx")
    with pytest.raises(StartupError, match="--onnx.*--backend torch"):
        _start(make_settings(bundle=no_onnx, backend="onnx"))
    _start(make_settings(bundle=no_onnx, backend="torch", state_dir=tmp_path / "torch-state"))  # torch still works


def test_learned_prompt_text_side_refuses_templates() -> None:
    from service.errors import InvalidInput
    from service.text import TextTower

    enc = TextTower(None, learned_prompts=True, max_candidate_prompts=256, retry_after_s=1)
    enc.check_templates(None)
    with pytest.raises(InvalidInput, match="learned prompts"):
        enc.check_templates(["a photo of {}."])
