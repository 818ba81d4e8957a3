"""A causal LM that scores or featurises text: a Hugging Face model, or smdlm's own AR baseline.

Gen-PPL (genppl.py) needs next-token logits and MAUVE (mauve.py) needs hidden states. Both come
from either an HF model (default gpt2-large, as the paper; any hub name or local directory) or an
smdlm run trained with `[model] causal = true`, which makes the whole protocol work offline.
For MAUVE any HF encoder serves (AutoModel); gen-PPL needs a causal LM.

Not here: the metrics themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.validate import refuse_pickled

# The paper scores 1024-token windows (eval_context_size); longer HF contexts are capped to it.
MAX_CONTEXT = 1024


@dataclass
class Scorer:
    name: str
    model: nn.Module
    tok: object
    context: int          # tokens per scored window
    eos_id: int
    hf: bool              # an HF model, rather than an smdlm AR run
    device: torch.device

    @torch.no_grad()
    def logits(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Next-token logits (B, T, V) in fp32: row t predicts token t + 1."""
        out = self.model(input_ids=ids, attention_mask=attention_mask)
        return (out.logits if self.hf else out).float()

    @torch.no_grad()
    def hidden(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The last layer's hidden states (B, T, D) in fp32."""
        if self.hf:
            out = self.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[-1].float()
        return self.model.features(ids, attention_mask).float()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text as it is (special-token strings in the text map to their ids)."""
        return self.tok(texts, add_special_tokens=False)["input_ids"]


def _smdlm_run(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("model_type", "").lower() in ("mdlm", "dit")


def load_scorer(name: str, device: torch.device, need_lm: bool = True) -> Scorer:
    """`name`: an smdlm run directory, or an HF name / directory. need_lm: next-token logits needed."""
    path = Path(name)
    if path.is_dir() and _smdlm_run(path):
        from smdlm_cli.core.models import load_model
        from smdlm_cli.core.tokenizer import load_tokenizer

        model = load_model(str(path), device=device).eval()
        if need_lm and not model.config.causal:
            raise UserError(f"--scorer {name}: a diffusion run; expected an AR run (trained with "
                            f"[model] causal = true, e.g. recipes/quickstart-ar.toml) or an HF "
                            f"causal LM")
        tok_dir = path / "tokenizer"
        tok = load_tokenizer(str(tok_dir if tok_dir.is_dir() else path))
        return Scorer(name, model, tok, model.config.model_length, tok.eos_token_id, False, device)
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    refuse_pickled(path, "--scorer")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        # safetensors only: without it transformers would unpickle pytorch_model.bin
        model = (AutoModelForCausalLM if need_lm else AutoModel).from_pretrained(
            name, use_safetensors=True)
    except (OSError, ValueError) as e:  # offline, unknown name, not a causal LM
        raise UserError(f"--scorer {name}: cannot load it as an HF {'causal LM' if need_lm else 'model'} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); expected a local "
                        f"directory, a cached hub name, or an smdlm AR run") from None
    if tok.eos_token_id is None:
        raise UserError(f"--scorer {name}: its tokenizer has no EOS token; expected a causal LM's")
    config = model.config
    context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    context = min(context or MAX_CONTEXT, MAX_CONTEXT)
    return Scorer(name, model.to(device).eval(), tok, context, tok.eos_token_id, True, device)


def windows(ids: list[list[int]], context: int) -> list[list[int]]:
    """Each sequence cut into consecutive windows of at most `context` tokens (no overlap)."""
    return [seq[i:i + context] for seq in ids for i in range(0, max(len(seq), 1), context)]


def pad_batch(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, attention_mask), both (B, T) long."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)
