"""smdlm as an lm-evaluation-harness model ("smdlm"): any run, any sampler, SM on or off.

    python -m smdlm_cli.evals.lmeval --model smdlm --model_args ckpt=RUN,sampler=confidence,nfe=256,k=1 --tasks gsm8k
    smdlm evaluate lm-eval --ckpt RUN --tasks gsm8k ...          (the same, with smdlm's JSON report)

Importing this module registers the model with lm-eval (`@register_model("smdlm")`), so
`lm_eval.simple_evaluate(model="smdlm", ...)` finds it. lm-eval 0.4 reads no plugin entry points,
so its own `lm_eval` console script cannot see models of other packages; `python -m
smdlm_cli.evals.lmeval` is that same command line with smdlm registered.

model_args: ckpt (a run directory; default the newest under ./runs), sampler (default mdlm, ar for
an AR run), nfe (default: one step per generated token), k (SoftMask top-k; default the run's, 0 =
binary), seed, sm_schedule, exact, mc_num (Monte-Carlo samples per loglikelihood, default 128 as
LLaDA), mc_batch_size; every other key is a sampler option (temperature, top_p, alg, block_length,
transfer, cache, threshold, cfg_scale, ...), checked when the model is built.

- generate_until: the prompts go through core/generate.py, the one prompt -> decode path of
  `smdlm sample` and `evaluate`, in batches of `batch_size`; request i of a batch of requests
  sharing (until, max_gen_toks) draws from seed + i. The text is cut at EOS and at the first stop
  sequence. Decoding settings come from model_args (a task's do_sample / temperature are greedy-AR
  notions): max_gen_toks is honoured, capped at half the model's length. For instruct models pass
  lm-eval's --apply_chat_template: it calls `apply_chat_template` below (the tokenizer's template).
- loglikelihood and loglikelihood_rolling: the Monte-Carlo ELBO of evals/likelihood.py (its cost
  is there); rolling scores a text in disjoint windows of the model's length, each given [BOS]
  only (no context across windows). Request i draws its masks from seed + i.

Not here: the ELBO (likelihood.py), decoding (core/samplers), loading runs (core/rundir.py).
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from smdlm_cli.core import rundir
from smdlm_cli.core.distributed import resolve_device
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.generate import choose_softmask, completion, generate
from smdlm_cli.core.samplers import SM_SCHEDULES, validate_sampler_args
from smdlm_cli.evals.likelihood import elbo_loglikelihood

DEFAULT_BATCH = 8


def _count(name: str, value, default: int) -> int:
    if value is None or value == "auto":  # lm-eval's --batch_size auto: no probing here
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise UserError(f"smdlm model_args {name}={value}: expected an integer >= 1")
    return number


@register_model("smdlm")
class SMDLM(TemplateLM):
    """An smdlm run behind lm-eval's LM interface; see the module docstring for the arguments."""

    def __init__(self, ckpt: str | None = None, sampler: str | None = None, nfe: int | None = None,
                 k: int | None = None, seed: int = 0, sm_schedule: str = "none", exact: bool = False,
                 mc_num: int = 128, mc_batch_size: int = 32, batch_size=None, max_batch_size=None,
                 device: str | None = None, **options):
        super().__init__()
        self.run = rundir.load(rundir.resolve(ckpt), resolve_device(device or "auto"))
        self.model, self.tokenizer = self.run.model, self.run.tokenizer
        self.softmask = choose_softmask(self.run.softmask, None if k is None else int(k))
        if self.softmask is not None:
            self.softmask = self.softmask.to(self.model.embedding_weight().device)
        self.sampler = sampler or self.run.default_sampler
        self.nfe = None if nfe is None else _count("nfe", nfe, 1)
        if sm_schedule not in SM_SCHEDULES:
            raise UserError(f"smdlm model_args sm_schedule={sm_schedule}: expected one of "
                            f"{', '.join(SM_SCHEDULES)}")
        self.sm_schedule, self.exact, self.seed = sm_schedule, bool(exact), int(seed)
        validate_sampler_args(self.sampler, steps=self.nfe or 1, **options)
        self.options = options
        self.mc_num, self.mc_batch = _count("mc_num", mc_num, 128), _count("mc_batch_size", mc_batch_size, 32)
        self.batch_size = _count("batch_size", batch_size, DEFAULT_BATCH)
        self._device = self.model.embedding_weight().device
        self.bos = [self.tokenizer.bos_token_id] if getattr(self.model, "wants_bos", True) else []

    # --- tokens -------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: [BOS] for models trained on BOS blocks, else EOS."""
        return self.bos[0] if self.bos else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    @property
    def tokenizer_name(self) -> str:
        return str(self.run.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # --- likelihoods --------------------------------------------------------------------------
    def _score(self, i: int, context: list[int], target: list[int]) -> tuple[float, bool]:
        length = self.model.config.model_length
        if not target:
            return 0.0, True
        if len(target) >= length:
            raise UserError(f"a continuation of {len(target)} tokens does not fit the model's "
                            f"{length}; expected shorter continuations")
        if self.bos and context[:1] != self.bos:
            context = self.bos + context
        context = context[max(0, len(context) + len(target) - length):]  # cut from the left
        g = torch.Generator().manual_seed(self.seed + i)
        return elbo_loglikelihood(self.model, self.softmask, context, target, self.mc_num,
                                  self.mc_batch, g)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [self._score(i, context, target) for i, (_, context, target) in enumerate(requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        window = self.model.config.model_length - len(self.bos) - 1
        out = []
        for i, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text)
            out.append(sum(self._score(i, [], ids[s:s + window])[0]
                           for s in range(0, len(ids), window)))
        return out

    # --- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            kw = req.args[1]
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kw.get("max_gen_toks", 256)), self.model.config.model_length // 2)
            groups.setdefault((tuple(until), max_new), []).append(i)
        out = [""] * len(requests)
        for (until, max_new), members in groups.items():
            texts = self.complete([requests[i].args[0] for i in members], max_new)
            for i, text in zip(members, texts):
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
        return out

    def complete(self, prompts: list[str], max_new: int) -> list[str]:
        """The completions (cut at EOS) of `prompts`, prompt j decoded with seed + j."""
        gen = generate(self.model, self.tokenizer, prompts, sampler=self.sampler,
                       nfe=self.nfe or max_new, softmask=self.softmask, max_new_tokens=max_new,
                       seed=self.seed, batch_size=self.batch_size, cut_prompts=True,
                       sm_schedule=self.sm_schedule, exact=self.exact, options=self.options)
        return [completion(self.tokenizer, gen, j) for j in range(len(prompts))]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line, with the smdlm model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
