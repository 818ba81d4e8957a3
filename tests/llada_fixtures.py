"""Tiny LLaDA-layout checkpoints written to disk as GSAI-ML publishes them (config.json with LLaDA's
field names and model_type "llada", sharded safetensors with its key names), and an independent
reference forward of the architecture, for the tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from dream_fixtures import write_shards

from smdlm_cli.core.models.llada import LLaDA, LLaDAConfig

# LLaDA-8B's config.json at toy sizes: the same keys, the flags its file reads, a padded embedding
CONFIG = dict(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48, vocab_size=92,
              embedding_size=96, mask_token_id=90, eos_token_id=89, pad_token_id=89,
              rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=128)
LLADA_EXTRAS = {"activation_type": "silu", "alibi": False, "block_type": "llama", "rope": True,
                "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
                "weight_tying": False, "scale_logits": False, "input_emb_norm": False,
                "multi_query_attention": None, "flash_attention": False, "init_device": "meta",
                "auto_map": {"AutoModel": "modeling_llada.LLaDAModelLM"}, "use_cache": False}


def random_llada(seed: int = 0, **overrides) -> LLaDA:
    torch.manual_seed(seed)
    model = LLaDA(LLaDAConfig(**{**CONFIG, **overrides})).eval()
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.2)
    return model


def write_checkpoint(model: LLaDA, path: Path, dtype=torch.bfloat16, shards: int = 3) -> Path:
    """config.json (LLaDA's keys) + model-0000k-of-0000n.safetensors + the index, as on the hub."""
    write_shards(model, path, dtype, shards)
    c = model.config
    config = {**LLADA_EXTRAS, "model_type": "llada", "architectures": ["LLaDAModelLM"],
              "d_model": c.d_model, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "n_layers": c.n_layers, "mlp_hidden_size": c.mlp_hidden_size, "mlp_ratio": 4,
              "vocab_size": c.vocab_size, "embedding_size": c.embedding_size,
              "mask_token_id": c.mask_token_id, "eos_token_id": c.eos_token_id,
              "pad_token_id": c.pad_token_id, "rope_theta": c.rope_theta,
              "rms_norm_eps": c.rms_norm_eps, "max_sequence_length": c.max_sequence_length,
              "weight_tying": c.weight_tying}
    (path / "config.json").write_text(json.dumps(config))
    return path


def reference_logits(state: dict, c: LLaDAConfig, x, keep=None, positions=None):
    """LLaDA's forward written out from the state dict: explicit RMSNorm, rotary over pairs
    (i, i + d/2), softmax attention over real keys, SiLU-gated MLP; no logits shift."""
    P = "model.transformer."
    B, L = x.shape
    hd, H, KV = c.d_model // c.n_heads, c.n_heads, c.n_kv_heads or c.n_heads
    keep = torch.ones(B, L, dtype=torch.bool) if keep is None else keep.bool()
    pos = torch.arange(L).expand(B, L) if positions is None else positions

    def rms(v, w):
        return w * (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rotary(t):  # t (B, L, heads, hd)
        freq = torch.tensor([c.rope_theta ** (-2 * i / hd) for i in range(hd // 2)], dtype=t.dtype)
        ang = pos[..., None, None].to(t.dtype) * freq            # (B, L, 1, hd/2)
        a, b = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat((a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()), -1)

    h = state[P + "wte.weight"][x]
    for i in range(c.n_layers):
        w = {k[len(f"{P}blocks.{i}."):]: v for k, v in state.items() if k.startswith(f"{P}blocks.{i}.")}
        a = rms(h, w["attn_norm.weight"])
        q = rotary((a @ w["q_proj.weight"].T).view(B, L, H, hd))
        k = rotary((a @ w["k_proj.weight"].T).view(B, L, KV, hd)).repeat_interleave(H // KV, 2)
        v = (a @ w["v_proj.weight"].T).view(B, L, KV, hd).repeat_interleave(H // KV, 2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, c.d_model)
        h = h + att @ w["attn_out.weight"].T
        f = rms(h, w["ff_norm.weight"])
        h = h + (F.silu(f @ w["ff_proj.weight"].T) * (f @ w["up_proj.weight"].T)) @ w["ff_out.weight"].T
    h = rms(h, state[P + "ln_f.weight"])
    out = state[P + "wte.weight"] if c.weight_tying else state[P + "ff_out.weight"]
    return h @ out.T


def write_chat_base(path: Path) -> Path:
    """A tiny LLaDA checkpoint with a tokenizer beside it that holds LLaDA's turn tokens and a chat
    template of its shape, as a LLaDA-Instruct directory."""
    import copy

    from runs import tokenizer
    from smdlm_cli.core.tiny_llada import CHAT, TURN_TOKENS

    tok = copy.deepcopy(tokenizer())
    tok.add_special_tokens({"additional_special_tokens": TURN_TOKENS})
    tok.chat_template = CHAT
    model = random_llada(vocab_size=len(tok), embedding_size=-(-len(tok) // 8) * 8,
                         mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id, max_sequence_length=512)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if name.endswith("norm.weight") else 0.0, std=0.05)
    write_checkpoint(model, path, dtype=torch.float32)
    tok.save_pretrained(path)
    return path
