"""Dream decoding speed: smdlm against Fast-dLLM's and dllm's code, same weights, same settings.

    python benchmarks/peer_decode.py [--fast-dllm DIR] [--dllm DIR] [--batches 1,4] [--prompt 64]
                                     [--gen 128] [--block 32] [--threshold 0.9] [--repeats 3]
                                     [--head-scale 60] [--json FILE]

Settings: {no cache, prefix, dual} x {threshold off, 0.9} x batch sizes, argmax (T = 0), NFE budget
= generated tokens, blocks of --block. Threshold off ranks masks by entropy (Dream's alg
"entropy"); threshold on by p(x0) ("confidence_threshold"), as Fast-dLLM. One tiny Dream-layout
model with random weights (dream_decode.py's `small` shape, the LM head scaled by --head-scale so
the threshold commits several tokens per forward) is loaded into each implementation. The
implementations alternate inside every repeat, so machine noise hits all alike; medians reported.

The peers are read from checkouts of their public code, never installed as a dependency:
--fast-dllm DIR (or $FAST_DLLM_PATH) is a checkout of github.com/NVlabs/Fast-dLLM (its dream/
folder is imported), --dllm DIR (or $DLLM_PATH) one of github.com/ZHZisZZ/dllm (the package
imports trl, peft, transformers 4.57: give it its own environment, docs/performance.md shows
how). A peer that is missing or does not import is skipped with a one-line reason.

Columns: NFE (forwards), tok/s (batch x generated / wall time), ms/fwd (wall time / NFE),
"smdlm x" (the implementation's wall time / smdlm's: above 1, smdlm is faster), "per fwd" (the
same per forward: the peers' no-cache threshold commits at most its step budget, masks/NFE, per
forward, so it runs more forwards than smdlm, whose threshold only ever adds tokens), status: at batch > 1 every row must decode to what it decodes alone
(smdlm's guarantee) and no mask may be left; a crash is reported with its exception. "same" is
the share of generated tokens equal to smdlm's at batch 1 (the peers' rules differ in details:
Fast-dLLM commits each block's first token from the full forward, for example).
This is not a quality benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dream_decode import build  # noqa: E402  (the tiny model of the Dream decoding benchmark)

from smdlm_cli.core.samplers import decode  # noqa: E402

CACHES = ("none", "prefix", "dual")


class Runaway(RuntimeError):
    pass


class Counted:
    """Counts the forwards of a module (NFE), whatever calls it, and stops a decode that runs past
    `limit` forwards (a loop that never ends: dllm at batch > 1 with a threshold, for one)."""

    def __init__(self, module):
        self.n, self.limit = 0, None
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1
        if self.limit is not None and self.n > self.limit:
            raise Runaway(f"no end after {self.limit} forwards")


def smdlm_impl(model):
    # smdlm runs hidden() + head() rather than forward(): its final norm runs once per forward
    counter = Counted(model.model.norm)

    def run(prompt, gen, block, cache, threshold):
        x = torch.cat([prompt, torch.full((prompt.shape[0], gen), model.mask_id)], dim=1)
        out = decode(model, x, sampler="confidence", steps=gen, block_length=block, cache=cache,
                     threshold=threshold, generator_seeds=list(range(prompt.shape[0])))
        return out.tokens[:, prompt.shape[1]:]
    return run, counter


def _peer_model(module, config_cls, model_cls, ours):
    """A peer's DreamModel holding our weights (fp32, SDPA attention, eval mode)."""
    c = ours.config
    config = config_cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                        intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers,
                        num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, rope_theta=c.rope_theta,
                        rms_norm_eps=c.rms_norm_eps, mask_token_id=ours.mask_id,
                        pad_token_id=ours.mask_id - 1, eos_token_id=ours.mask_id - 1,
                        bos_token_id=ours.mask_id - 2, max_position_embeddings=4096,
                        tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = model_cls(config).eval()
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"{module}: weights do not fit (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]})")
    return model


def fast_dllm_impl(root: Path, ours):
    """Fast-dLLM's Dream: its generation_utils (no cache) and generation_utils_block (caches)."""
    sys.path.insert(0, str(root / "dream"))
    modeling = importlib.import_module("model.modeling_dream")
    plain = importlib.import_module("model.generation_utils").DreamGenerationMixin
    block = importlib.import_module("model.generation_utils_block").DreamGenerationMixin
    model = _peer_model("Fast-dLLM", modeling.DreamConfig, modeling.DreamModel, ours)
    counter = Counted(model)

    def run(prompt, gen, block_len, cache, threshold):
        mixin = plain if cache == "none" else block
        model.diffusion_generate = types.MethodType(mixin.diffusion_generate, model)
        model._sample = types.MethodType(mixin._sample, model)
        kw = dict(max_new_tokens=gen, steps=gen, temperature=0.0, top_p=None, top_k=None,
                  alg="entropy" if threshold is None else "confidence_threshold",
                  threshold=threshold or 0.9, output_history=False,
                  return_dict_in_generate=False, mask_token_id=ours.mask_id)
        if cache != "none":
            kw.update(block_length=block_len, dual_cache=cache == "dual")
        with torch.no_grad():
            out = model.diffusion_generate(prompt, **kw)
        return out[:, prompt.shape[1]:]
    return run, counter


def dllm_impl(root: Path, ours):
    """dllm's Fast-dLLM Dream sampler (pipelines/fastdllm/dream): none, prefix and dual caches."""
    sys.path.insert(0, str(root))
    with contextlib.redirect_stdout(io.StringIO()):  # its import prints banners
        pkg = importlib.import_module("dllm.pipelines.fastdllm.dream")
    model = _peer_model("dllm", pkg.FastdLLMDreamConfig, pkg.FastdLLMDreamModel, ours)
    counter = Counted(model)
    tok = types.SimpleNamespace(mask_token_id=ours.mask_id, eos_token_id=ours.mask_id - 1)
    sampler = pkg.FastdLLMDreamSampler(model=model, tokenizer=tok)

    def run(prompt, gen, block_len, cache, threshold):
        config = pkg.FastdLLMDreamSamplerConfig(
            max_new_tokens=gen, steps=gen, temperature=0.0, top_p=None, top_k=None,
            alg="entropy" if threshold is None else "confidence_threshold", threshold=threshold,
            use_cache=None if cache == "none" else cache, block_size=block_len)
        out = sampler.sample(list(prompt), config)
        return out[:, prompt.shape[1]:]
    return run, counter


PEERS = {"Fast-dLLM": (fast_dllm_impl, "fast_dllm", "FAST_DLLM_PATH"),
         "dllm": (dllm_impl, "dllm", "DLLM_PATH")}


def load_peers(args, ours) -> dict:
    found = {}
    for name, (make, flag, env) in PEERS.items():
        path = getattr(args, flag) or os.environ.get(env)
        if not path:
            print(f"skipped {name}: no checkout given (--{flag.replace('_', '-')} DIR or ${env})")
            continue
        try:
            found[name] = make(Path(path), ours)
        except Exception as e:  # any import or build failure of someone else's code: skip it
            print(f"skipped {name}: {path} does not load ({type(e).__name__}: {e})".splitlines()[0])
    return found


def timed(run, counter, *a) -> tuple[float, int, torch.Tensor | str]:
    counter.n, counter.limit = 0, 2 * a[1] + 8  # a budget of gen forwards, twice over
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Fast-dLLM prints its steps and time
            out = run(*a)
    except Exception as e:
        what = "hang" if isinstance(e, Runaway) else f"crash: {type(e).__name__}"
        return float("nan"), counter.n, f"{what}: {e}".splitlines()[0][:90]
    return time.perf_counter() - start, counter.n, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast-dllm", default=None)
    ap.add_argument("--dllm", default=None)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--head-scale", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ours = build("small", args.head_scale, torch.device("cpu"), torch.float32)
    impls = {"smdlm": smdlm_impl(ours), **load_peers(args, ours)}
    batches = [int(b) for b in args.batches.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, ours.vocab_size - 3, (max(batches), args.prompt), generator=g)
    print(f"Dream small ({sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, vocab "
          f"{ours.vocab_size}), fp32, {torch.get_num_threads()} thread(s); prompt {args.prompt} + "
          f"gen {args.gen}, block {args.block}; median of {args.repeats}")
    print(f"{'cache':<7}{'thresh':>7}{'batch':>6}  {'impl':<10}{'NFE':>5}{'tok/s':>8}"
          f"{'ms/fwd':>8}{'smdlm x':>9}{'per fwd':>8}{'same':>6}  status")
    rows = []
    for cache in CACHES:
        for threshold in (None, args.threshold):
            for batch in batches:
                setting = (args.gen, args.block, cache, threshold)
                alone = {}  # each implementation's rows decoded one at a time: the reference
                for name, (run, counter) in impls.items():
                    alone[name] = [timed(run, counter, prompts[i:i + 1], *setting)[2]
                                   for i in range(batch)]  # also the warm-up
                times = {name: [] for name in impls}
                for _ in range(args.repeats):
                    for name, (run, counter) in impls.items():
                        wall, nfe, out = timed(run, counter, prompts[:batch], *setting)
                        times[name].append(wall)
                        times[name + ":out"], times[name + ":nfe"] = out, nfe
                base = statistics.median(times["smdlm"])
                base_step = base / times["smdlm:nfe"]
                for name in impls:
                    wall, out, nfe = statistics.median(times[name]), times[name + ":out"], \
                        times[name + ":nfe"]
                    status, same = status_of(out, alone[name], alone["smdlm"], ours.mask_id)
                    ok = wall == wall  # not NaN: it ended
                    row = {"cache": cache, "threshold": threshold, "batch": batch, "impl": name,
                           "nfe": nfe, "tokens_per_s": batch * args.gen / wall if ok else None,
                           "ms_per_forward": wall / nfe * 1e3 if ok else None,
                           "smdlm_speedup": wall / base if ok else None,
                           "smdlm_step_speedup": wall / nfe / base_step if ok else None,
                           "same_as_smdlm": same, "status": status}
                    rows.append(row)
                    print(line(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))


def line(row: dict) -> str:
    def show(v, fmt: str, width: int, unit: str = "") -> str:
        return f"{'–' if v is None else format(v, fmt) + unit:>{width}}"
    return (f"{row['cache']:<7}{str(row['threshold'] or 'off'):>7}{row['batch']:>6}  "
            f"{row['impl']:<10}{row['nfe']:>5}{show(row['tokens_per_s'], ',.0f', 8)}"
            f"{show(row['ms_per_forward'], '.1f', 8)}{show(row['smdlm_speedup'], '.2f', 9, 'x')}"
            f"{show(row['smdlm_step_speedup'], '.2f', 8, 'x')}{show(row['same_as_smdlm'], '.2f', 6)}"
            f"  {row['status']}")


def status_of(out, alone: list, smdlm_alone: list, mask_id: int) -> tuple[str, float | None]:
    """('ok' or what went wrong, share of tokens equal to smdlm's decode of the same rows alone)."""
    if isinstance(out, str):
        return out, None
    if any(isinstance(a, str) for a in alone):
        return next(a for a in alone if isinstance(a, str)) + " (alone)", None
    ref = torch.cat(alone)
    same = None
    if not any(isinstance(a, str) for a in smdlm_alone):
        same = (out == torch.cat(smdlm_alone)).float().mean().item()
    if (out == mask_id).any():
        return f"{int((out == mask_id).sum())} masks left", same
    if out.shape != ref.shape or not torch.equal(out, ref):
        bad = sum(not torch.equal(o, r) for o, r in zip(out, ref))
        return f"{bad} of {len(ref)} rows differ from the row decoded alone", same
    return "ok", same


if __name__ == "__main__":
    main()
