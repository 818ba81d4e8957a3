"""The MDLM diffusion transformer (DiT), with the module names of the public MDLM checkpoints.

Same computation as MDLM / DUO `models/dit.py` and the HF `kuleshov-group/mdlm-owt` backbone:
bidirectional attention with GPT-NeoX RoPE, adaLN modulation from a (constant) timestep
embedding, weight-only LayerNorms in fp32, dropout only after attention and MLP. Every parameter
keeps the name it has in those checkpoints (`vocab_embed.embedding`, `blocks.3.attn_qkv.weight`,
`output_layer.linear.bias`, ...), so their `backbone.*` weights load without a key map.

Time conditioning is off in MDLM-OWT and in the SM paper: σ is zero, so the adaLN input is the
same vector for every sequence. The model still computes it (it is part of the checkpoint), once
per forward rather than per row. Attention is `F.scaled_dot_product_attention`, which picks flash
or memory-efficient kernels on GPU without the flash-attn package.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.validate import check_fields
from smdlm_cli.core.models.cache import KVCache

# (hidden_dim, n_blocks, n_heads, cond_dim); small and medium are MDLM's configs/model/*.yaml.
PRESETS = {
    "tiny": (128, 4, 4, 64),
    "small": (768, 12, 12, 128),
    "medium": (1024, 24, 16, 128),
}
FREQ_DIM = 256  # the timestep embedding width, hard-coded in MDLM's TimestepEmbedder


@dataclass
class DiTConfig:
    """config.json of an MDLM directory: the HF mdlm-owt keys plus `mask_id`."""

    vocab_size: int
    model_length: int
    hidden_dim: int
    cond_dim: int
    n_blocks: int
    n_heads: int
    dropout: float = 0.1
    time_conditioning: bool = False
    mask_id: int = -1  # -1: the last id, as MDLM appends the mask to GPT-2's vocabulary
    causal: bool = False  # the AR baseline: causal attention, row l predicts token l + 1

    def __post_init__(self):
        if self.mask_id < 0:
            self.mask_id = self.vocab_size - 1
        if self.time_conditioning:
            raise UserError("config.json: time_conditioning = true is not supported; smdlm's DiT is "
                            "time-agnostic as MDLM-OWT and the SM paper (expected false)")
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise UserError(f"model: hidden size {self.hidden_dim} must split into {self.n_heads} "
                            f"heads of an even width")

    @classmethod
    def from_json(cls, d: dict, where: str) -> "DiTConfig":
        known = {f.name for f in fields(cls)}
        sizes = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")
        check_fields(cls, d, where, positive=sizes, non_negative=("dropout",))
        missing = [k for k in sizes if k not in d]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}; expected an MDLM config.json")
        if d.get("mask_id", -1) >= d["vocab_size"]:
            raise UserError(f"{where}: mask_id = {d['mask_id']} is outside the vocabulary of "
                            f"{d['vocab_size']}")
        return cls(**{k: v for k, v in d.items() if k in known})  # HF extras (auto_map, ...) ignored

    def to_json(self) -> dict:
        return {"model_type": "mdlm", "architectures": ["MDLM"], **asdict(self)}


class LayerNorm(nn.Module):
    """LayerNorm in fp32 with a weight and no bias, as MDLM (kept out of bf16 for stability)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float())


class Rotary(nn.Module):
    """GPT-NeoX ("rotate half") rotary embedding over the full head width, base 10000."""

    def __init__(self, head_dim: int):
        super().__init__()
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq)  # persistent: MDLM checkpoints carry it

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin: (L, head_dim/2) for positions (L,), (B, 1, L, head_dim/2) for (B, L)."""
        freqs = positions.float()[..., None] * self.inv_freq
        if freqs.dim() == 3:
            freqs = freqs[:, None]
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, L, Dh): [x1 | x2] -> [x1·cos − x2·sin | x2·cos + x1·sin]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: Tensor) -> Tensor:
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=sigma.device).float() / half)
        args = sigma[:, None].float() * freqs[None]
        emb = torch.cat((args.cos(), args.sin()), dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # fp32 features, the model's dtype


class DiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(self, h: Tensor, c: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                causal: bool = False, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, L, D = h.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        qkv = self.attn_qkv(modulate(self.norm1(h), sh1, sc1))
        q, k, v = qkv.view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos.to(q.dtype), sin.to(q.dtype)), rotate(k, cos.to(k.dtype), sin.to(k.dtype))
        if cache is not None:
            k, v = cache.attend(layer, k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        a = self.attn_out(a.transpose(1, 2).reshape(B, L, D))
        p = self.dropout if self.training else 0.0
        h = h + g1 * F.dropout(a, p, self.training)
        m = self.mlp(modulate(self.norm2(h), sh2, sc2))
        return h + g2 * F.dropout(m, p, self.training)


class EmbeddingLayer(nn.Module):
    """A bare parameter, not nn.Embedding: the checkpoints name it `vocab_embed.embedding`."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embedding[input_ids]


class FinalLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, vocab_size)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class DiT(nn.Module):
    """The Denoiser of DESIGN.md: aligned logits (B, L, V) from ids or input embeddings.

    With config.causal it is instead the MDLM codebase's AR baseline: the same network with causal
    attention, trained left to right, whose row l predicts token l + 1 (next-token logits).
    """

    wants_bos = True  # trained on [BOS] ... [EOS] blocks: prompts start after a BOS
    mask_logit = "drop"  # SUBS: [MASK] is never predicted (MDLM); see diffusion.MASK_LOGIT
    forward_every_step = False  # MDLM's sampler reuses a step that changed nothing (loop.py)

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.vocab_size, self.mask_id = config.vocab_size, config.mask_id
        self.gradient_checkpointing = False
        d = config.hidden_dim
        self.vocab_embed = EmbeddingLayer(config.vocab_size, d)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        self.rotary_emb = Rotary(d // config.n_heads)
        self.blocks = nn.ModuleList(DiTBlock(d, config.n_heads, config.cond_dim, config.dropout)
                                    for _ in range(config.n_blocks))
        self.output_layer = FinalLayer(d, config.vocab_size, config.cond_dim)
        # MDLM zero-initialises every modulation and the output projection: the model starts as
        # the identity on the embeddings and predicts uniform logits.
        for lin in [b.adaLN_modulation for b in self.blocks] + [self.output_layer.adaLN_modulation,
                                                                self.output_layer.linear]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def embedding_weight(self) -> Tensor:
        return self.vocab_embed.embedding

    def empty_cache(self) -> KVCache:
        if self.config.causal:
            raise UserError("an AR (causal) model decodes left to right; expected no block cache")
        return KVCache.empty(self.config.n_blocks)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """attention_mask (B, L_total) marks real key positions; `cache` see models/cache.py;
        position_ids (B, W) the rotary positions of the given tokens (default: their columns)."""
        return self.head(self.hidden(input_ids, inputs_embeds, attention_mask, cache, position_ids))

    def hidden(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
               attention_mask: Tensor | None = None, cache: KVCache | None = None,
               position_ids: Tensor | None = None) -> Tensor:
        """The states the head reads (B, W, D), row l for token l: forward = head(hidden(...)).

        The final norm and its (constant) modulation are applied here, so `head` is one linear map
        that any subset of rows can go through alone (the callers that read few rows do)."""
        h, c = self._trunk(input_ids, inputs_embeds, attention_mask, cache, position_ids)
        shift, scale = self.output_layer.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return modulate(self.output_layer.norm_final(h), shift, scale)

    def head(self, h: Tensor) -> Tensor:
        """Logits (..., V) of hidden rows (..., D)."""
        return self.output_layer.linear(h)

    def features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The final normalised hidden states (B, L, D): what MAUVE featurises with."""
        return self.hidden(input_ids, attention_mask=attention_mask)

    def _trunk(self, input_ids, inputs_embeds, attention_mask, cache=None,
               position_ids=None) -> tuple[Tensor, Tensor]:
        h = self.vocab_embed(input_ids) if inputs_embeds is None else inputs_embeds
        L = h.shape[1]
        # σ = 0 for every row (time conditioning off): one conditioning row, broadcast over the batch.
        c = F.silu(self.sigma_map(torch.zeros(1, device=h.device)))
        if position_ids is None:
            position_ids = (cache.positions(L, h.device) if cache is not None
                            else torch.arange(L, device=h.device))
        cos, sin = self.rotary_emb(position_ids, torch.float32)
        # A padding mask (B, L) -> (B, 1, 1, L) keys to attend; None keeps the flash kernels usable.
        mask, causal = None, self.config.causal
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
            if causal:  # SDPA takes a mask or is_causal, not both
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
                causal = False
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                h = checkpoint(block, h, c, cos, sin, mask, causal, cache, i, use_reentrant=False)
            else:
                h = block(h, c, cos, sin, mask, causal, cache, i)
        return h, c


def build_dit(preset: str, vocab_size: int, mask_id: int, length: int, *, hidden_dim: int = 0,
              n_blocks: int = 0, n_heads: int = 0, cond_dim: int = 0, dropout: float = 0.1,
              causal: bool = False) -> DiT:
    """A freshly initialised DiT; a size given as 0 takes the preset's value."""
    if preset not in PRESETS:
        raise UserError(f"model.preset = {preset!r}, expected one of {', '.join(PRESETS)}")
    h, b, n, c = (given or default for given, default in
                  zip((hidden_dim, n_blocks, n_heads, cond_dim), PRESETS[preset]))
    config = DiTConfig(vocab_size=vocab_size, model_length=length, hidden_dim=h, cond_dim=c,
                       n_blocks=b, n_heads=n, dropout=dropout, mask_id=mask_id, causal=causal)
    try:
        return DiT(config)
    except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
        if isinstance(e, RuntimeError) and "allocate" not in str(e):
            raise
        billions = (2 * vocab_size * h + b * (12 * h * h + 6 * h * c)) / 1e9
        raise UserError(f"model: hidden size {h}, {b} blocks, {vocab_size} tokens (about "
                        f"{billions:.3g}G parameters) do not fit in memory; expected smaller "
                        f"model.hidden_size / n_blocks") from None
