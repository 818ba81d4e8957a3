"""Dream-7B / Dream-Coder-7B: the Qwen2 layout, bidirectional, behind the Denoiser interface.

Dream is Qwen2.5-7B turned into a masked diffusion LM: the same modules and state-dict keys
(`model.embed_tokens`, `model.layers.N.self_attn.q_proj` with biases on q/k/v, RMSNorm, SwiGLU,
GQA, RoPE with theta 1e6, an untied `lm_head`), attention without a causal mask, and logits that
keep the AR habit of predicting the NEXT token. The adapter shifts them by one inside `forward`
(row l then predicts token l; row 0 repeats itself, it is always prompt), so SM, samplers and the
trainer see aligned logits as from every other backbone. Our own code rather than transformers'
Qwen2 made bidirectional: see the CHANGELOG for the measurement, and `cache` below for what it buys.

Cache (block-wise decoding, Fast-dLLM): see models/cache.py. The first row of a window has no
previous row to take its shifted logits from; it repeats its own, so decoding starts a window one
position before the block (samplers/blockwise.py) and never draws from that row.

Not here: loading files (models/__init__.py), sampling, training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smdlm_cli.core.diffusion import MASK_LOGIT
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.validate import check_fields
from smdlm_cli.core.models.cache import KVCache
from smdlm_cli.core.models.stack import run_blocks

USABLE_CONTEXT = 2048  # Dream was trained at 2048 tokens; max_position_embeddings is not a limit
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "mask_token_id")


@dataclass
class DreamConfig:
    """The fields of a Dream config.json that define the network; the rest is kept as `extra`."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mask_token_id: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # "keep": Dream's [MASK] logit stays in every softmax (SM entropy and top-k, the sampler's
    # candidates, the fine-tuning loss), as the official Dream code; "drop": SUBS (diffusion.py)
    mask_logit: str = "keep"
    extra: dict = field(default_factory=dict)

    causal = False  # never: a diffusion model (the DiT's AR baseline flag, for uniform checks)

    def __post_init__(self):
        if self.mask_logit not in MASK_LOGIT:
            raise UserError(f"config.json: mask_logit = {self.mask_logit!r}, expected one of "
                            f"{', '.join(MASK_LOGIT)}")
        if self.hidden_size % self.num_attention_heads or \
                self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"config.json: {self.num_attention_heads} heads over hidden size "
                            f"{self.hidden_size} and {self.num_key_value_heads} key/value heads "
                            f"do not divide evenly")

    @property
    def model_length(self) -> int:
        return min(self.max_position_embeddings, USABLE_CONTEXT)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, d: dict, where: str) -> "DreamConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        check_fields(cls, d, where, positive=REQUIRED[:-1] + ("rope_theta", "rms_norm_eps",
                                                              "max_position_embeddings"),
                     non_negative=("mask_token_id",))
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}; expected a Dream config.json")
        if d["mask_token_id"] >= d["vocab_size"]:
            raise UserError(f"{where}: mask_token_id = {d['mask_token_id']} is outside the "
                            f"vocabulary of {d['vocab_size']}")
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, "model_type": "Dream", "architectures": ["DreamModel"], **out}


class RMSNorm(nn.Module):
    """RMSNorm as Qwen2 and LLaDA compute it: normalise in fp32 (or wider: a float64 model stays
    float64), back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin for rotate-half RoPE, computed in fp32 then cast: (L, head_dim) for positions (L,),
    (B, 1, L, head_dim) for per-row positions (B, L)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)
    if emb.dim() == 3:
        emb = emb[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: DreamConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None, layer: int) -> Tensor:
        B, W, _ = h.shape
        q = self.q_proj(h).view(B, W, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, W, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, W, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.attend(layer, k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(a.transpose(1, 2).reshape(B, W, -1))


class MLP(nn.Module):
    def __init__(self, c: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DreamConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, h, cos, sin, mask, cache, layer):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Qwen2's `model.*` part: embeddings, layers, final norm."""

    def __init__(self, c: DreamConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Dream(nn.Module):
    """The Denoiser of DESIGN.md for Dream checkpoints: aligned (shifted) logits (B, W, V)."""

    wants_bos = False  # prompts come with the chat template's own tokens
    # Dream's diffusion_generate runs a forward at every step, also at one that commits nothing
    # (step 0 at one token per step): its SM feedback then feeds the next step (loop.py)
    forward_every_step = True

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.vocab_size, self.mask_id = config.vocab_size, config.mask_token_id
        self.mask_logit = config.mask_logit
        self.gradient_checkpointing = False
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embedding_weight(self) -> Tensor:
        return self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Module:  # what peft and HF utilities look for
        return self.model.embed_tokens

    def empty_cache(self) -> KVCache:
        return KVCache.empty(self.config.num_hidden_layers)

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
        """The normed final states (B, W, D), already shifted so that row l is the one that
        predicts token l: forward = head(hidden(...)). Shifting the states rather than the logits
        moves D numbers a row, not V, and lets a caller put only the rows it reads through the head."""
        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        h = run_blocks(self.model.layers, h, rope, self.config.head_dim, self.config.rope_theta,
                       attention_mask, cache, position_ids,
                       self.gradient_checkpointing and self.training)
        h = self.model.norm(h)
        return torch.cat((h[:, :1], h[:, :-1]), dim=1)  # row l predicts token l

    def head(self, h: Tensor) -> Tensor:
        """Logits (..., V) of hidden rows (..., D)."""
        return self.lm_head(h)
