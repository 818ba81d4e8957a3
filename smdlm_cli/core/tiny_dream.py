"""`tiny-dream`: a small, randomly initialised Dream-layout model for offline fine-tuning runs.

No Dream weights exist offline, so recipes/tiny-dream.toml fine-tunes this instead: the Qwen2 /
Dream layout and key names at 4 layers x 128, GQA, a byte-level BPE trained on the Python standard
library with the ChatML tokens and template of Qwen/Dream (the default system turn included) and
Dream's conventions (mask token in config.json, EOS as padding, vocabulary padded to a multiple of
64). It exercises every path a 7B checkpoint takes; with random weights it learns only what its
adapters can, so it is a test bed, not a coder.

Not here: the Dream network itself (dream.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from smdlm_cli.core.config import DataConfig
from smdlm_cli.core.data import stdlib_files
from smdlm_cli.core.models.dream import Dream, DreamConfig

TINY_DREAM = "tiny-dream"
CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
          "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int):
    """Byte-level BPE on stdlib files + <|im_start|>, <|im_end|> and the ChatML template."""
    from smdlm_cli.core.tokenizer import train_bpe

    files = stdlib_files()[::4]
    tok = train_bpe((p.read_text(errors="replace") for p in files), vocab_size)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = tok.eos_token
    tok.chat_template = CHATML
    return tok


def build_tiny_dream(path: Path, data: DataConfig, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer of a fresh tiny Dream to `path`."""
    from smdlm_cli.core.models import save_model

    tok = tiny_tokenizer(data.vocab_size)
    torch.manual_seed(seed)
    config = DreamConfig(vocab_size=-(-len(tok) // 64) * 64, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         mask_token_id=tok.mask_token_id, pad_token_id=tok.eos_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         max_position_embeddings=2048, torch_dtype="float32")
    model = Dream(config)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue  # RMSNorm weights start at 1
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.zeros_(p)
    save_model(model, path)
    tok.save_pretrained(path)
    return path
