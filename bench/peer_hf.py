"""Runs in the peers' virtualenv (transformers, no open_clip): open_clip weights -> a Hugging Face CLIPModel.

``python bench/peer_hf.py convert SRC OUT`` reads ``SRC/open_clip.safetensors`` + ``SRC/dims.json``
(written by bench/peers.py from our bundle), writes a ``CLIPModel`` folder (config, weights,
tokenizer, image processor) to OUT and checks that the converted image tower gives the same
embedding as open_clip on ``SRC/probe_pixels.npy`` (cosine printed as JSON on stdout).

``python bench/peer_hf.py serve MODEL LABELS PORT``: the naive baseline, a FastAPI app around the
Hugging Face ``zero-shot-image-classification`` pipeline (re-encodes every label on every call).
"""

# no ``from __future__ import annotations``: FastAPI must see the local request model as a class
import json
import sys
from pathlib import Path
from typing import Any

MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP, as in open_clip
STD = [0.26862954, 0.26130258, 0.27577711]


def _attention(sd: dict[str, Any], src: str, dst: str, out: dict[str, Any]) -> None:
    """open_clip's fused in_proj (q, k, v stacked) -> HF's three projections."""
    for part in ("weight", "bias"):
        q, k, v = sd[f"{src}.attn.in_proj_{part}"].chunk(3, dim=0)
        out[f"{dst}.self_attn.q_proj.{part}"] = q
        out[f"{dst}.self_attn.k_proj.{part}"] = k
        out[f"{dst}.self_attn.v_proj.{part}"] = v
        out[f"{dst}.self_attn.out_proj.{part}"] = sd[f"{src}.attn.out_proj.{part}"]
        out[f"{dst}.layer_norm1.{part}"] = sd[f"{src}.ln_1.{part}"]
        out[f"{dst}.layer_norm2.{part}"] = sd[f"{src}.ln_2.{part}"]
        out[f"{dst}.mlp.fc1.{part}"] = sd[f"{src}.mlp.c_fc.{part}"]
        out[f"{dst}.mlp.fc2.{part}"] = sd[f"{src}.mlp.c_proj.{part}"]


def convert_state_dict(sd: dict[str, Any], vision_layers: int, text_layers: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for part in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{part}"] = sd[f"visual.ln_pre.{part}"]  # sic: HF's name
        out[f"vision_model.post_layernorm.{part}"] = sd[f"visual.ln_post.{part}"]
        out[f"text_model.final_layer_norm.{part}"] = sd[f"ln_final.{part}"]
    for i in range(vision_layers):
        _attention(sd, f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}", out)
    for i in range(text_layers):
        _attention(sd, f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", out)
    return out


def convert(src: Path, dst: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    dims = json.loads((src / "dims.json").read_text())
    v, t = dims["vision"], dims["text"]
    config = CLIPConfig(
        projection_dim=dims["embed_dim"],
        logit_scale_init_value=2.6592,
        vision_config={
            "hidden_size": v["width"], "intermediate_size": v["width"] * 4, "num_hidden_layers": v["layers"],
            "num_attention_heads": v["heads"], "image_size": v["image_size"], "patch_size": v["patch_size"],
            "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        },
        text_config={
            "hidden_size": t["width"], "intermediate_size": t["width"] * 4, "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"], "vocab_size": t["vocab_size"], "max_position_embeddings": t["context"],
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
    )  # fmt: skip
    model = CLIPModel(config).eval()
    weights = convert_state_dict(load_file(str(src / "open_clip.safetensors")), v["layers"], t["layers"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"conversion incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tokenizer = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=t["context"])
    images = CLIPImageProcessor(
        size={"shortest_edge": v["image_size"]}, crop_size={"height": v["image_size"], "width": v["image_size"]},
        resample=3, image_mean=MEAN, image_std=STD,
    )  # fmt: skip
    model.save_pretrained(dst)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(dst)
    pixels = torch.from_numpy(np.load(src / "probe_pixels.npy"))
    with torch.no_grad():
        ours = model.get_image_features(pixel_values=pixels).numpy()
    ref = np.load(src / "probe_embedding.npy")
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    return {"image_cosine_vs_open_clip_min": float(cos.min()), "transformers": __import__("transformers").__version__}


def serve(model_dir: Path, labels_file: Path, port: int) -> None:
    import base64
    import io

    import uvicorn
    from fastapi import FastAPI
    from PIL import Image
    from pydantic import BaseModel
    from transformers import pipeline

    labels = json.loads(labels_file.read_text())
    pipe = pipeline("zero-shot-image-classification", model=str(model_dir), device="cpu")
    app = FastAPI()

    class Body(BaseModel):
        inputs: str

    @app.post("/classify")
    def classify(body: Body) -> list[dict[str, Any]]:  # sync: FastAPI runs it in its thread pool
        image = Image.open(io.BytesIO(base64.b64decode(body.inputs))).convert("RGB")
        return list(pipe(image, candidate_labels=labels, top_k=5))

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        print(json.dumps(convert(Path(sys.argv[2]), Path(sys.argv[3]))))
    elif sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
