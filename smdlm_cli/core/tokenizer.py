"""Tokenizers: an HF tokenizer by name or path with MDLM's [MASK], or a BPE trained offline.

MDLM uses GPT-2's tokenizer and appends the mask as one more id (50257, vocabulary 50258);
`load_tokenizer` does the same for any tokenizer without a mask token. Offline, `train_bpe` trains
a byte-level BPE (lossless on any text, like GPT-2's) with the `tokenizers` library; the run
directory keeps it, so sampling and evaluation decode with exactly the training vocabulary.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from smdlm_cli.core import hub
from smdlm_cli.core.errors import UserError

BOUNDARY = "<|endoftext|>"  # BOS and EOS at once, as GPT-2 and MDLM's wrapped blocks use it
MASK = "[MASK]"
# Mask tokens that tokenizers hold without declaring them as mask_token: LLaDA's (id 126336).
UNDECLARED_MASKS = ("<|mdm_mask|>",)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    """A local tokenizer directory or a hub name (from the local cache when offline)."""
    # A Dream directory's config.json names a model type transformers does not know, which it
    # warns about while looking for the tokenizer class; the tokenizer never needs that config.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = hub.fetch("tokenizer", name_or_path, lambda: AutoTokenizer.from_pretrained(name_or_path),
                        "a local tokenizer directory or a cached hub name")
    finally:
        hf_logging.set_verbosity(verbosity)
    if tok.mask_token is None:
        vocab = tok.get_vocab()
        known = [m for m in UNDECLARED_MASKS if m in vocab]
        tok.add_special_tokens({"mask_token": known[0] if known else MASK})
    if tok.bos_token is None or tok.eos_token is None:
        boundary = tok.eos_token or tok.bos_token or BOUNDARY
        tok.add_special_tokens({"bos_token": boundary, "eos_token": boundary})
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with exactly `vocab_size` ids: <|endoftext|> = 0 (BOS/EOS), [MASK] = 1."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOUNDARY, MASK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    if bpe.get_vocab_size() != vocab_size:  # BPE stops early when the corpus has too few pairs
        raise UserError(f"data.vocab_size = {vocab_size}: the corpus only supports "
                        f"{bpe.get_vocab_size()} BPE tokens; expected a smaller vocab_size or more text")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOUNDARY, eos_token=BOUNDARY,
                                   mask_token=MASK)


def mask_token_id(tok) -> int:
    return tok.mask_token_id


def vocab_size(tok) -> int:
    """Ids the model needs: the base vocabulary plus added tokens such as [MASK]."""
    return len(tok)


def chat_prompt(tok, messages: list[dict], flag: str) -> str:
    """The chat template with an open assistant turn; a one-line error naming `flag` without one."""
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{flag}: the tokenizer has no chat template; expected an instruct model's "
                        f"tokenizer")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
