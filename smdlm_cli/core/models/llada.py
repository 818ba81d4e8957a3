"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5) behind the Denoiser interface.

LLaDA is a Llama-like transformer trained from scratch as a masked diffusion model: RMSNorm before
attention and MLP, rotary embeddings (rotate-half, computed in fp32 as its `rope_full_precision`),
a SiLU-gated MLP (`ff_out(silu(ff_proj(h)) * up_proj(h))`), no biases, attention without a causal
mask, and an untied output projection. The parameters keep the names of its checkpoints
(`model.transformer.wte`, `model.transformer.blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out,
ff_norm, ff_proj, up_proj, ff_out}`, `model.transformer.ln_f`, `model.transformer.ff_out`), so its
sharded safetensors load without a key map, without `trust_remote_code` and without its modeling
file. config.json keeps LLaDA's own field names (d_model, n_layers, mlp_hidden_size, ...).

Unlike Dream, LLaDA's logits are already aligned: row l predicts token l, so nothing is shifted.
Unlike LLaDA's own file, `attention_mask` is honoured (key padding), so padded batches and padded
fine-tuning work (LLaDA #90); gradient checkpointing is a flag (LLaDA #51); `inputs_embeds` feeds
soft-masked inputs; `cache` is the window KV cache of models/cache.py, as for Dream and the DiT.

Not here: loading files (models/__init__.py), sampling, training. Options of LLaDA's config that no
released LLaDA uses (biases, ALiBi, QK-norm, logit scaling, ...) are refused with a one-line error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models.cache import KVCache
from smdlm_cli.core.models.stack import run_blocks
from smdlm_cli.core.models.dream import RMSNorm, rotate_half

MASK_ID = 126336  # LLaDA's <|mdm_mask|>, hard-coded in its generate.py; config.json may repeat it
REQUIRED = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size")
# config.json values every released LLaDA has, and the only ones this adapter computes
FIXED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
         "alibi": False, "include_bias": False, "scale_logits": False, "input_emb_norm": False,
         "attention_layer_norm": False, "layer_norm_with_affine": True, "bias_for_layer_norm": False}


@dataclass
class LLaDAConfig:
    """The fields of a LLaDA config.json that define the network; the rest is kept as `extra`."""

    d_model: int
    n_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int | None = None     # rows of wte / ff_out when padded beyond vocab_size
    n_kv_heads: int | None = None         # None: as many as n_heads (LLaDA-8B)
    mask_token_id: int = MASK_ID
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    include_qkv_bias: bool = False
    weight_tying: bool = False
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)

    causal = False  # never: a diffusion model (the DiT's AR baseline flag, for uniform checks)

    def __post_init__(self):
        kv = self.kv_heads
        if self.d_model % self.n_heads or self.n_heads % kv:
            raise UserError(f"config.json: {self.n_heads} heads over d_model {self.d_model} and "
                            f"{kv} key/value heads do not divide evenly")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise UserError(f"config.json: embedding_size {self.embedding_size} is below vocab_size "
                            f"{self.vocab_size}; expected at least as many rows as ids")

    @property
    def kv_heads(self) -> int:
        if self.extra.get("multi_query_attention"):
            return 1
        return self.n_kv_heads or self.n_heads

    @property
    def rows(self) -> int:
        """Rows of the embedding and output matrices: the logits' width."""
        return self.embedding_size or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def model_length(self) -> int:
        return self.max_sequence_length

    @classmethod
    def from_json(cls, d: dict, where: str) -> "LLaDAConfig":
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}; expected a LLaDA config.json")
        for key, want in FIXED.items():
            if key in d and d[key] is not None and d[key] != want:
                raise UserError(f"{where}: {key} = {d[key]!r} is not supported; expected {want!r} "
                                f"as in the released LLaDA models")
        names = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**values, extra={k: v for k, v in d.items() if k not in names})

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **FIXED, "model_type": "llada", "architectures": ["LLaDAModelLM"], **out}


def rope(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of rotate-half RoPE: (W, head_dim) for positions (W,), (B, 1, W, head_dim) for (B, W).

    In `dtype`, at least fp32 (LLaDA's rope_full_precision computes and applies them in fp32)."""
    dtype = torch.promote_types(dtype, torch.float32)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype)
                               / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]
    return emb.cos(), emb.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in the tables' precision (fp32 or wider), back to x's dtype."""
    h = x.to(cos.dtype)
    return (h * cos + rotate_half(h) * sin).to(x.dtype)


class Block(nn.Module):
    """LLaDALlamaBlock: h + attn(attn_norm(h)), then + ff_out(silu(ff_proj) * up_proj)(ff_norm(h))."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.kv_heads, c.head_dim
        kv_dim = self.n_kv * self.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=c.include_qkv_bias)
        self.k_proj = nn.Linear(c.d_model, kv_dim, bias=c.include_qkv_bias)
        self.v_proj = nn.Linear(c.d_model, kv_dim, bias=c.include_qkv_bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)  # the gate
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer: int) -> Tensor:
        B, W, D = h.shape
        a = self.attn_norm(h)
        q = self.q_proj(a).view(B, W, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(a).view(B, W, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(a).view(B, W, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.attend(layer, k, v)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.n_kv != self.n_heads)
        h = h + self.attn_out(att.transpose(1, 2).reshape(B, W, D))
        f = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(f)) * self.up_proj(f))


class Transformer(nn.Module):
    """LLaDAModel: `transformer` holds wte, blocks, ln_f and (untied) ff_out, as in the checkpoints."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        parts = {"wte": nn.Embedding(c.rows, c.d_model),
                 "blocks": nn.ModuleList(Block(c) for _ in range(c.n_layers)),
                 "ln_f": RMSNorm(c.d_model, c.rms_norm_eps)}
        if not c.weight_tying:
            parts["ff_out"] = nn.Linear(c.d_model, c.rows, bias=False)
        self.transformer = nn.ModuleDict(parts)


class LLaDA(nn.Module):
    """The Denoiser of DESIGN.md for LLaDA checkpoints: aligned logits (B, W, V), V = config.rows."""

    wants_bos = False  # prompts come with the chat template's own tokens (<|startoftext|> included)

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        self.vocab_size, self.mask_id = config.rows, config.mask_token_id
        self.gradient_checkpointing = False
        self.model = Transformer(config)

    def embedding_weight(self) -> Tensor:
        return self.model.transformer.wte.weight

    def get_input_embeddings(self) -> nn.Module:  # what peft and HF utilities look for
        return self.model.transformer.wte

    def empty_cache(self) -> KVCache:
        return KVCache.empty(self.config.n_layers)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                position_ids: Tensor | None = None) -> Tensor:
        """attention_mask (B, L_total) marks real key positions (padding anywhere); `cache` see
        models/cache.py; position_ids (B, W) the RoPE positions of the given tokens (default: their
        columns, so left padding needs them)."""
        return self.head(self.hidden(input_ids, inputs_embeds, attention_mask, cache, position_ids))

    def hidden(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
               attention_mask: Tensor | None = None, cache: KVCache | None = None,
               position_ids: Tensor | None = None) -> Tensor:
        """The normed final states (B, W, D) the output projection reads: forward = head(hidden(...))."""
        t = self.model.transformer
        h = t.wte(input_ids) if inputs_embeds is None else inputs_embeds
        h = run_blocks(t.blocks, h, rope, self.config.head_dim, self.config.rope_theta,
                       attention_mask, cache, position_ids,
                       self.gradient_checkpointing and self.training)
        return t.ln_f(h)

    def head(self, h: Tensor) -> Tensor:
        """Logits (..., V) of hidden rows (..., D)."""
        t = self.model.transformer
        return F.linear(h, t.wte.weight) if self.config.weight_tying else t.ff_out(h)
