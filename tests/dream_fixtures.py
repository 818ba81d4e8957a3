"""Tiny Dream-layout checkpoints written to disk as Dream-org publishes them (config.json with
model_type "Dream", sharded safetensors with Qwen2 key names), for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from smdlm_cli.core.models.dream import Dream, DreamConfig

CONFIG = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, mask_token_id=95, pad_token_id=94,
              eos_token_id=94, bos_token_id=93, rope_theta=1e6, rms_norm_eps=1e-6,
              max_position_embeddings=128, tie_word_embeddings=False, torch_dtype="bfloat16")


def random_dream(seed: int = 0, **overrides) -> Dream:
    torch.manual_seed(seed)
    model = Dream(DreamConfig(**{**CONFIG, **overrides})).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def write_checkpoint(model: Dream, path: Path, dtype=torch.bfloat16, shards: int = 2) -> Path:
    """config.json + model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    write_shards(model, path, dtype, shards)
    config = {**model.config.to_json(), "auto_map": {"AutoModel": "modeling_dream.DreamModel"},
              "use_sliding_window": False}
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_shards(model, path: Path, dtype=torch.bfloat16, shards: int = 2) -> None:
    """model-0000k-of-0000n.safetensors + model.safetensors.index.json, as on the hub."""
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_chat_base(path: Path) -> Path:
    """A tiny Dream checkpoint with a ChatML tokenizer beside it, as a Dream-Instruct directory."""
    import copy

    from runs import tokenizer
    from smdlm_cli.core.tiny_dream import CHATML

    tok = copy.deepcopy(tokenizer())
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = tok.eos_token
    tok.chat_template = CHATML
    model = random_dream(vocab_size=-(-len(tok) // 8) * 8, mask_token_id=tok.mask_token_id,
                         pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, max_position_embeddings=512)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    write_checkpoint(model, path, dtype=torch.float32)
    tok.save_pretrained(path)
    return path
