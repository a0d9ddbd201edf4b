"""Prompted CLIP encoders built from the attributes ``open_clip.CLIP`` exposes (no fork).

Both towers follow the order of open_clip's own forward passes (batch-first), with learnable
prompt tokens inserted where CoOp / IVLP / VPT-deep put them. With prompts disabled
(``n_tokens == 0``) each encoder computes exactly ``CLIP.encode_text`` / ``CLIP.encode_image``.

Prompt tensors are one parameter per tower, ``[depth, n_tokens, width]``: row 0 is inserted at the
input, row i (1 <= i < depth) replaces the prompt positions before transformer block i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import Tokenizer

PLACEHOLDER = "X"  # CoOp's stand-in token; its embeddings are overwritten by the learned context


@dataclass(frozen=True)
class TextPromptCfg:
    """Learnable text context (CoOp when depth == 1, IVLP deep text prompts when depth > 1)."""

    n_tokens: int = 0  # context tokens after SOS; 0 disables prompting
    depth: int = 1  # J: the input row plus J-1 deep rows replaced before blocks 1..J-1
    init: str | None = None  # e.g. "a photo of a": row 0 starts as these token embeddings
    init_std: float = 0.02  # N(0, std) for rows without a phrase init


@dataclass(frozen=True)
class VisualPromptCfg:
    """Deep visual prompts appended after the positional embedding (VPT-deep / IVLP vision)."""

    n_tokens: int = 0  # 0 disables prompting
    depth: int = 1  # J: input row plus J-1 deep rows replaced before blocks 1..J-1
    init_std: float = 0.02


def _check_depth(depth: int, n_tokens: int, n_layers: int, what: str) -> None:
    if n_tokens < 0:
        raise ValueError(f"{what}: n_tokens must be >= 0, got {n_tokens}")
    if n_tokens and not 1 <= depth <= n_layers:
        raise ValueError(f"{what}: depth must be in 1..{n_layers} (transformer layers), got {depth}")


def _run_blocks(
    transformer: Any,
    x: torch.Tensor,
    prompts: torch.Tensor | None,
    depth: int,
    start: int,
    attn_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Run open_clip transformer blocks; before block i >= 1 replace ``x[:, start:start+n]`` by ``prompts[i]``.

    x: [B, L, D] batch-first. prompts: [depth, n, D] or None.
    """
    batch_first = getattr(transformer, "batch_first", True)
    for i, block in enumerate(transformer.resblocks):
        if prompts is not None and 1 <= i < depth:
            fresh = prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :start], fresh, x[:, start + fresh.shape[1] :]], dim=1)
        if batch_first:
            x = block(x, attn_mask=attn_mask)
        else:  # older open_clip releases ran blocks sequence-first
            x = block(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
    return x


class PromptedTextEncoder(nn.Module):
    """CLIP text tower with CoOp / IVLP prompts; encodes already-formatted texts.

    ``encode(["lion."])`` with a 4-token context initialised from "a photo of a" equals
    ``clip.encode_text(tokenize("a photo of a lion."))``: the text is tokenised as
    ``"X X X X lion."`` and the four placeholder embeddings are overwritten by the context.
    """

    def __init__(self, clip: Any, tokenizer: Tokenizer, cfg: TextPromptCfg = TextPromptCfg()) -> None:
        super().__init__()
        self.clip = clip  # frozen backbone (shared with the image side where both exist)
        self.tokenizer = tokenizer
        self.cfg = cfg
        width = clip.token_embedding.weight.shape[1]
        _check_depth(cfg.depth, cfg.n_tokens, len(clip.transformer.resblocks), "text prompts")
        self.prompts: nn.Parameter | None = None
        if cfg.n_tokens:
            rows = torch.randn(cfg.depth, cfg.n_tokens, width) * cfg.init_std
            if cfg.init:
                rows[0] = self._phrase_embedding(cfg.init, cfg.n_tokens)
            self.prompts = nn.Parameter(rows)
        clip.requires_grad_(False)

    def _phrase_embedding(self, phrase: str, n_tokens: int) -> torch.Tensor:
        ids = self.tokenizer([phrase])[0]
        n_words = int((ids != 0).sum()) - 2  # without SOS and EOT
        if n_words != n_tokens:
            raise ValueError(f"init phrase {phrase!r} is {n_words} tokens; set n_tokens={n_words}")
        with torch.no_grad():
            return self.clip.token_embedding(ids[1 : 1 + n_tokens]).detach().clone()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters an optimiser may update (prompt rows only)."""
        return {"prompts": self.prompts} if self.prompts is not None else {}

    @property
    def device(self) -> torch.device:
        return self.clip.token_embedding.weight.device

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [T, context_length] with the placeholder context in front of each text."""
        n = self.cfg.n_tokens
        prefix = " ".join([PLACEHOLDER] * n) + " " if n else ""
        return self.tokenizer([prefix + t for t in texts]).to(self.device)

    def encode(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        """Text features [T, embed_dim] for already-formatted texts (template applied)."""
        return self.forward(self.tokenize(texts), normalize=normalize)

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Per text, the position whose features are pooled (the EOT token); None for other poolings."""
        pool = getattr(self.clip, "text_pool_type", "argmax")
        if pool == "argmax":  # EOT has the highest id in CLIP's vocabulary
            return tokens.argmax(dim=-1)
        eos = getattr(self.clip, "text_eos_id", None)
        if pool == "eos" and eos is not None:
            return (tokens == eos).int().argmax(dim=-1)
        return None

    def forward(
        self,
        tokens: torch.Tensor,
        normalize: bool = False,
        trim: bool = True,
    ) -> torch.Tensor:
        """Features of token ids [T, L]; ``trim=False`` runs every context position (the reference).

        Under CLIP's causal mask a position only attends to earlier ones, so the pooled EOT
        features do not depend on the padding after it: the blocks run on the shortest prefix
        holding every text's EOT (about 10 of 77 positions for a class-name prompt), the same
        numbers several times faster.
        """
        clip = self.clip
        eot = self.pooled_positions(tokens) if trim and clip.attn_mask is not None else None
        length = int(eot.max()) + 1 if eot is not None and len(tokens) else tokens.shape[1]
        tokens = tokens[:, :length]
        mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast)  # [T, L', width]
        n = self.cfg.n_tokens
        if self.prompts is not None:
            ctx = self.prompts[0].to(cast).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + n :]], dim=1)
        x = x + clip.positional_embedding[:length].to(cast)
        x = _run_blocks(clip.transformer, x, self.prompts, self.cfg.depth, 1, mask)
        x = clip.ln_final(x)  # [T, L, width]
        from open_clip.transformer import text_global_pool

        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1) if normalize else x


class PromptedImageEncoder(nn.Module):
    """open_clip ViT image tower with deep visual prompts.

    conv1 -> flatten -> [CLS] + patches -> + positional embedding -> append n prompt tokens ->
    ln_pre -> blocks (the last n tokens replaced before blocks 1..J-1) -> ln_post(CLS) @ proj.
    """

    def __init__(self, clip: Any, cfg: VisualPromptCfg = VisualPromptCfg()) -> None:
        super().__init__()
        visual = clip.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "class_embedding"):
            raise TypeError(f"deep visual prompts need an open_clip ViT tower, got {type(visual).__name__}")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise TypeError("deep visual prompts support class-token pooling only (no attentional / avg pool)")
        self.visual = visual
        self.cfg = cfg
        _check_depth(cfg.depth, cfg.n_tokens, len(visual.transformer.resblocks), "visual prompts")
        self.prompts: nn.Parameter | None = None
        if cfg.n_tokens:
            width = visual.class_embedding.shape[0]
            self.prompts = nn.Parameter(torch.randn(cfg.depth, cfg.n_tokens, width) * cfg.init_std)
        visual.requires_grad_(False)

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters an optimiser may update (prompt rows only)."""
        return {"prompts": self.prompts} if self.prompts is not None else {}

    def forward(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images)  # [B, width, gh, gw]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, gh*gw, width]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, 1+P, width]
        n = self.cfg.n_tokens
        if self.prompts is not None:
            x = torch.cat([x, self.prompts[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x)
        x = _run_blocks(v.transformer, x, self.prompts, self.cfg.depth, x.shape[1] - n, None)
        pooled = v.ln_post(x[:, 0]) if getattr(v, "final_ln_after_pool", False) else v.ln_post(x)[:, 0]
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled
