"""One factory for every CLIP backbone: architecture name or config file + a weights reference.

Architecture (``name``):
  * an open_clip architecture name, ``ViT-B-16``, ``ViT-L-14-quickgelu``, ...;
  * a path to an open_clip-style model-config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``),
    so custom or tiny architectures need no registration by the caller;
  * ``local-dir:/folder`` or ``hf-hub:org/repo`` (config and weights come from there).

Weights (``pretrained``):
  * ``None`` / ``""`` / ``"none"``: random initialisation;
  * an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...), resolved through the
    Hugging Face cache first, and through the network only when it is reachable;
  * a local file: ``.safetensors``, a ``torch.save`` state dict / training checkpoint, or an OpenAI
    TorchScript ``.pt`` archive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch
from open_clip.factory import get_model_config, parse_model_name
from open_clip.pretrained import get_pretrained_cfg

from models import _compat  # noqa: F401  (must precede open_clip)

log = logging.getLogger(__name__)

NO_WEIGHTS = ("", "none", "random")
IMAGE_TOWER_PREFIX = "visual."
_SCALARS = ("input_resolution", "context_length", "vocab_size")  # stored beside OpenAI's weights
HUB_HOST = "huggingface.co"
NETWORK_PROBE_TIMEOUT_S = 4.0


class BackboneError(RuntimeError):
    """A backbone could not be built; the message says what to do instead."""


class Tokenizer(Protocol):
    """What the prompted text encoders need from an open_clip tokenizer."""

    context_length: int

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class PreprocessConfig:
    """Image preprocessing, exactly as open_clip's eval transform applies it."""

    size: tuple[int, int]  # (height, width) fed to the network
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # "bicubic" | "bilinear" | "nearest"
    resize_mode: str = "shortest"  # "shortest" | "longest" | "squash"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(v) for v in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg["std"]),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            resize_mode=str(cfg.get("resize_mode", "shortest")),
            fill_color=int(cfg.get("fill_color", 0)),
        )

    def to_open_clip(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mode"] = "RGB"
        return d


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild the same backbone elsewhere (stored in bundles).

    ``model_config`` is the resolved open_clip model config, so a bundle never depends on a
    config file or a registration that exists only on the machine that wrote it.
    """

    name: str  # the architecture as the user gave it (name, config path, local-dir:, hf-hub:)
    pretrained: str | None  # tag, file path, or None for random init
    model_config: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None  # of the weights file, where the weights are a file


@dataclass
class Backbone:
    """A built backbone: the open_clip model (eval mode, frozen), its preprocessing and tokenizer."""

    model: open_clip.CLIP
    preprocess: PreprocessConfig
    tokenizer: Tokenizer
    spec: BackboneSpec


def load_backbone(
    name: str,
    pretrained: str | None = None,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    model_config: dict[str, Any] | None = None,
    text_only: bool = False,
) -> Backbone:
    """Build an open_clip CLIP model with its preprocess config and tokenizer.

    Args:
        name: architecture name, model-config JSON path, ``local-dir:`` or ``hf-hub:`` reference.
        pretrained: weights reference (see module docstring); ignored for ``local-dir:``/``hf-hub:``.
        cache_dir: where open_clip / huggingface_hub look for and store downloaded weights.
        device: where the model is placed.
        model_config: an already-resolved config (from a bundle); takes precedence over ``name``.
        text_only: build and load the text tower only (a text side): ``model.visual`` becomes
            ``nn.Identity``; ``pretrained`` may hold the text tower alone or a full checkpoint.

    Raises:
        BackboneError: unknown architecture, missing file, or weights that need a network
            that is not there (the message names the offline alternatives).
    """
    pretrained = None if pretrained is None or pretrained.lower() in NO_WEIGHTS else pretrained
    schema, _ = parse_model_name(name)
    if schema is not None:
        if schema == "hf-hub":
            _require_hub(name, cache_dir)
        try:
            model, preprocess_cfg = _create(name, None, cache_dir)
        except BackboneError as e:
            if schema == "hf-hub":  # offline and not cached: say what works offline
                raise BackboneError(_offline_message(name, str(e), cache_dir)) from e
            raise
        cfg = model_config or _resolved_config(name)
        with _quiet_open_clip():
            tokenizer = open_clip.get_tokenizer(name)
    else:
        arch, cfg = _resolve_architecture(name, model_config)
        weights_path = _resolve_weights(arch, pretrained, cache_dir)
        stub = _stub_image_tower(cfg) if text_only else None
        model, preprocess_cfg = _create(_register(f"{arch}-text-side", stub) if stub else arch, None, cache_dir)
        if text_only:
            model.visual = torch.nn.Identity()  # never run
        if weights_path is not None:
            _load_weights(model, weights_path, text_only)
            if pretrained is not None and get_pretrained_cfg(arch, pretrained):
                preprocess_cfg = _tag_preprocess(preprocess_cfg, arch, pretrained)
        with _quiet_open_clip():
            tokenizer = open_clip.get_tokenizer(arch)
    log.debug("backbone %s: %s", name, f"weights {pretrained}" if pretrained else "random initialisation")
    sha = _sha256(pretrained) if pretrained and Path(pretrained).is_file() else None
    model = model.to(device).eval()
    model.requires_grad_(False)
    spec = BackboneSpec(name=name, pretrained=pretrained, model_config=cfg, weights_sha256=sha)
    return Backbone(model, PreprocessConfig.from_open_clip(preprocess_cfg), tokenizer, spec)


class _OpenClipChatter(logging.Filter):
    """Drops open_clip's INFO narration (it logs on the root logger) and its "initialized randomly"
    warning: we create every model without weights and load them ourselves, so that warning is
    false for every bundle load; :func:`load_backbone` logs what it really loaded."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _OPEN_CLIP_DIR not in record.pathname:
            return True
        return record.levelno > logging.WARNING or (
            record.levelno == logging.WARNING and "initialized randomly" not in record.getMessage()
        )


_OPEN_CLIP_DIR = os.path.dirname(open_clip.__file__)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root, chatter = logging.getLogger(), _OpenClipChatter()
    root.addFilter(chatter)
    try:
        yield
    finally:
        root.removeFilter(chatter)


def configured_image_size(name: str) -> int | None:
    """The input side length ``name``'s architecture config declares, read without building the
    model; None where only the model itself can tell (``local-dir:``, ``hf-hub:``, non-square)."""
    if parse_model_name(name)[0] is not None:
        return None
    try:
        _arch, cfg = _resolve_architecture(name, None)
    except BackboneError:
        return None
    size = cfg.get("vision_cfg", {}).get("image_size")
    return size if isinstance(size, int) else None


def _create(arch: str, pretrained: str | None, cache_dir: str | None) -> tuple[Any, dict[str, Any]]:
    try:
        with _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir)
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        raise BackboneError(f"could not build backbone {arch!r}: {e}") from e
    if not isinstance(model, open_clip.CLIP):
        raise BackboneError(
            f"{arch!r} builds a {type(model).__name__}; promptdistill needs an open_clip.CLIP "
            "with the built-in text transformer (ViT-*, RN*, *-quickgelu, PE-Core-*, or a "
            "config JSON of that form)."
        )
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    return model, preprocess_cfg


def _resolve_architecture(name: str, model_config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """Return a registered architecture name and its config, registering config files/dicts."""
    if model_config is not None:
        return _register(Path(name).stem if name.endswith(".json") else name, model_config), model_config
    path = Path(name)
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise BackboneError(f"model config file not found: {name}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BackboneError(f"model config {name} is not valid JSON: {e}") from e
        if "model_cfg" in cfg:  # an open_clip_config.json (hub / local-dir style)
            cfg = cfg["model_cfg"]
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in cfg:
                raise BackboneError(f"model config {name} lacks {key!r}; see open_clip's model_configs/*.json")
        return _register(path.stem, cfg), cfg
    cfg = get_model_config(name)
    if cfg is None:
        raise BackboneError(
            f"unknown architecture {name!r}: give an open_clip name (open_clip.list_models()), "
            "a model-config JSON path, local-dir:FOLDER or hf-hub:ORG/REPO"
        )
    return name, cfg


def _register(stem: str, cfg: dict[str, Any]) -> str:
    """Register a config under a name derived from its content (no clash with built-ins)."""
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    arch = f"{stem}-{digest}"
    if get_model_config(arch) is None:
        open_clip.factory._MODEL_CONFIGS[arch] = json.loads(json.dumps(cfg))
    return arch


def _resolved_config(name: str) -> dict[str, Any]:
    cfg = get_model_config(name)
    return dict(cfg) if cfg else {}


def _resolve_weights(arch: str, pretrained: str | None, cache_dir: str | None) -> str | None:
    """Turn a weights reference into a local file path, downloading only when a network exists."""
    if pretrained is None:
        return None
    if Path(pretrained).is_file():
        return pretrained
    tag_cfg = get_pretrained_cfg(arch, pretrained)
    if not tag_cfg:
        if any(sep in pretrained for sep in ("/", "\\", ".")):
            raise BackboneError(f"weights file not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise BackboneError(f"{pretrained!r} is neither a file nor a pretrained tag of {arch!r} (tags: {tags})")
    cached = _cached_tag_file(tag_cfg, cache_dir)
    if cached is not None:
        return cached
    _require_network(f"pretrained tag {arch}/{pretrained}", cache_dir)
    try:
        return str(open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir))
    except Exception as e:
        raise BackboneError(f"downloading {arch}/{pretrained} failed: {e}") from e


def _cached_tag_file(tag_cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The tag's weights file if it is already in the Hugging Face cache, else None."""
    hub = str(tag_cfg.get("hf_hub") or "").rstrip("/")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    parts = hub.split("/")
    repo_id, explicit = "/".join(parts[:2]), "/".join(parts[2:])
    candidates = (
        [explicit]
        if explicit
        else ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin"]
    )
    for fname in candidates:
        path = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    return None


def _require_hub(name: str, cache_dir: str | None) -> None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # huggingface_hub itself then answers from the cache or fails at once
    _require_network(name, cache_dir)


def _require_network(what: str, cache_dir: str | None) -> None:
    """Fail within seconds, naming the offline alternatives, when the hub cannot be reached."""
    reason = _hub_unreachable()
    if reason is not None:
        raise BackboneError(_offline_message(what, f"{HUB_HOST} is unreachable ({reason})", cache_dir))


def _offline_message(what: str, reason: str, cache_dir: str | None) -> str:
    cache = cache_dir or os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
    return (
        f"{what} needs a download and {reason}. Offline, give the weights as a local file "
        f"(--pretrained /path/to/open_clip_model.safetensors, a torch state dict, or an OpenAI "
        f"TorchScript .pt), a folder (local-dir:/path with open_clip_config.json + weights), or "
        f"pre-populate the cache dir ({cache}) on a machine with network and copy it here."
    )


def _hub_unreachable() -> str | None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1"
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=NETWORK_PROBE_TIMEOUT_S):
                result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    # DNS resolution ignores socket timeouts and can retry for ~50 s; bound it with a thread.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(NETWORK_PROBE_TIMEOUT_S + 1.0)
    return result[0] if result else "no answer within 5 s"


def _tag_preprocess(current: dict[str, Any], arch: str, tag: str) -> dict[str, Any]:
    from open_clip.transform import merge_preprocess_dict

    merged = merge_preprocess_dict(current, get_pretrained_cfg(arch, tag))
    return dict(merged)


def _load_weights(model: torch.nn.Module, path: str, text_only: bool = False) -> None:
    """Load .safetensors, torch state dicts / checkpoints, or OpenAI TorchScript archives."""
    try:
        if text_only:
            _load_text_tower(model, path)
        elif _is_torchscript(path):
            # OpenAI's .pt files are TorchScript archives whose parameter names match open_clip's.
            state = torch.jit.load(path, map_location="cpu").state_dict()
            # Scalars OpenAI stored next to the weights, and buffers our model keeps out of its
            # state dict (a traced open_clip model carries attn_mask), are not weights.
            persistent = set(model.state_dict())
            transient = {n for n, _ in model.named_buffers()} - persistent
            for key in (*_SCALARS, *transient):
                state.pop(key, None)
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        else:
            open_clip.load_checkpoint(model, path, strict=True)
    except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as e:  # open_clip asserts on shapes
        raise BackboneError(f"weights {path} do not fit this architecture: {e}") from e


def _stub_image_tower(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """``cfg`` with its ViT image tower cut to one narrow block, for a text side that drops the
    image tower anyway: building a ViT-L/14 image tower first would add ~1.2 GB to the start-up
    peak. None where the tower is not open_clip's own ViT (timm, ResNet): built as it is."""
    vision = cfg.get("vision_cfg", {})
    if not isinstance(vision.get("layers"), int) or vision.get("timm_model_name"):
        return None
    return {**cfg, "vision_cfg": {**vision, "layers": 1, "width": 64, "head_width": 64}}


def text_tower_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the image tower (``visual.*``): what a bundle's text side needs."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(IMAGE_TOWER_PREFIX)}


def _load_text_tower(model: torch.nn.Module, path: str) -> None:
    """Load the text tower into ``model`` (image tower dropped) from a text-tower-only file
    (:func:`text_tower_state`) or a full checkpoint in any format :func:`_load_weights` reads,
    whose image tower is then left unread into the model."""
    from open_clip.factory import load_state_dict
    from safetensors import safe_open

    if path.endswith(".safetensors"):  # tensor by tensor: a full file's image tower is never read
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(IMAGE_TOWER_PREFIX)}  # noqa: SIM118
    elif _is_torchscript(path):
        state = {k: v.float() for k, v in torch.jit.load(path, map_location="cpu").state_dict().items()}
    else:
        state = load_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(IMAGE_TOWER_PREFIX) and k not in _SCALARS}
    want = set(text_tower_state(model))
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise KeyError(f"text-tower weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    return _sha256(str(path))
