"""`tiny-llada`: a small, randomly initialised LLaDA-layout model for offline fine-tuning runs.

No LLaDA weights exist offline, so recipes/tiny-llada.toml fine-tunes this instead: LLaDA's layout,
key names and config.json fields at 4 layers x 128 (multi-head attention, as LLaDA-8B), a
byte-level BPE trained on the Python standard library with LLaDA's special tokens and a chat
template in its (Llama-3) shape, and LLaDA's conventions: `<|mdm_mask|>` as the mask, held by the
tokenizer without being declared its mask token (smdlm's tokenizer loader finds it, as for the 8B
tokenizer), mask_token_id in config.json, EOS as padding, embedding rows padded to a multiple of 64.
It exercises every path an 8B checkpoint takes; with random weights it learns only what its adapters
can, so it is a test bed, not a model.

Not here: the LLaDA network itself (models/llada.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from smdlm_cli.core.config import DataConfig
from smdlm_cli.core.data import stdlib_files
from smdlm_cli.core.models.llada import LLaDA, LLaDAConfig

TINY_LLADA = "tiny-llada"
BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
TURN_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
        "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def tiny_tokenizer(vocab_size: int):
    """Byte-level BPE on stdlib files with LLaDA's BOS/EOS, turn tokens, <|mdm_mask|> and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # runs of newlines are one piece, as in Llama-3's pattern: the template's "\n\n" after a header
    # then tokenizes the same whether text follows or not (GPT-2's pattern splits it before text)
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[\r\n]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, *TURN_TOKENS, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    files = stdlib_files()[::4]
    bpe.train_from_iterator((p.read_text(errors="replace") for p in files), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                  additional_special_tokens=[*TURN_TOKENS, MASK])
    tok.chat_template = CHAT
    return tok


def build_tiny_llada(path: Path, data: DataConfig, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer of a fresh tiny LLaDA to `path`."""
    from smdlm_cli.core.models import save_model

    tok = tiny_tokenizer(data.vocab_size)
    torch.manual_seed(seed)
    config = LLaDAConfig(d_model=128, n_heads=4, n_kv_heads=4, n_layers=4, mlp_hidden_size=352,
                         vocab_size=len(tok), embedding_size=-(-len(tok) // 64) * 64,
                         mask_token_id=tok.convert_tokens_to_ids(MASK), rope_theta=500000.0,
                         max_sequence_length=1024, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    model = LLaDA(config)
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):  # RMSNorm weights start at 1
            torch.nn.init.normal_(p, std=0.02)
    save_model(model, path)
    tok.save_pretrained(path)
    return path
