"""`smdlm evaluate TASK`: humaneval, mbpp, elbo, genppl, mauve and sudoku of a run (the sweep:
sweep.py).

Each task loads what it needs, runs with a Rich progress bar, and writes one JSON report
(evals/report.py) with the metrics at its top level; the CLI prints the report's path, or the
report itself with --json. Code tasks also write the samples they generated next to the report,
in the format `--samples` reads back, so a scoring can be redone without the model.

Not here: the metrics (evals/) and the decoding (core/samplers/).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from smdlm_cli.commands import sample
from smdlm_cli.core import rundir, sampler_defaults, validate
from smdlm_cli.core.distributed import resolve_device
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.generate import completion, generate
from smdlm_cli.core.io import atomic_write_text
from smdlm_cli.core.models import read_config
from smdlm_cli.core.tokenizer import load_tokenizer
from smdlm_cli.evals import code, elbo as elbo_eval, genppl as genppl_eval, humaneval
from smdlm_cli.evals import mauve as mauve_eval, mbpp
from smdlm_cli.evals.execution import Limits
from smdlm_cli.evals.report import console, new_report, progress, report_path, timed, write_report
from smdlm_cli.evals.scorer import load_scorer
from smdlm_cli.recipe import load_recipe

DEFAULT_SCORER = "gpt2-large"  # the paper's; offline, pass an AR run (recipes/quickstart-ar.toml)
FORMATS = ("base", "instruct")


# --- code benchmarks ----------------------------------------------------------------------------
@dataclass
class CodeSettings:
    samples: str | None = None        # score this JSONL instead of generating
    dataset: str | None = None        # None: the benchmark's default
    format: str = "base"
    tests: str = "3-assert"           # mbpp only
    limit: int = 0                    # first N problems; 0 = all
    n: int = 1                        # samples per problem
    pass_k: list[int] = field(default_factory=lambda: [1])
    max_new_tokens: int = 0           # 0: the benchmark's default, capped by the model's length
    timeout: float = 5.0
    memory_mb: int = 1024
    workers: int = 0
    out: str | None = None


def _problems(task: str, c: CodeSettings) -> tuple[dict[str, code.Problem], dict[str, code.Problem]]:
    """(every problem of the benchmark, the ones --limit selects)."""
    if task == "humaneval":
        problems = humaneval.load_problems(c.dataset)
    else:
        problems = mbpp.load_problems(c.dataset or mbpp.DEFAULT, c.tests)
    if c.limit < 0:
        raise UserError(f"--limit {c.limit}: expected 0 (all problems) or a positive count")
    keys = list(problems)[:c.limit or None]
    return problems, {k: problems[k] for k in keys}


def _read_samples(c: CodeSettings, task: str, every: dict, problems: dict) -> list[dict]:
    """--samples, restricted to the selected problems; a task id the benchmark lacks is an error."""
    read = code.read_samples(c.samples)
    unknown = sorted({x["task_id"] for x in read} - set(every))
    if unknown:
        raise UserError(f"--samples {c.samples}: task id {unknown[0]!r} is not a {task} problem "
                        f"({len(unknown)} unknown task id(s)); expected ids such as "
                        f"{next(iter(every))!r}")
    samples = [x for x in read if x["task_id"] in problems]
    if not samples:
        raise UserError(f"--samples {c.samples}: no sample names a task of the {len(problems)} "
                        f"{task} problems selected")
    fewest = min(Counter(x["task_id"] for x in samples).values())
    if max(c.pass_k) > fewest:
        raise UserError(f"--pass-k {max(c.pass_k)}: --samples {c.samples} has only {fewest} "
                        f"sample(s) for some task; expected k <= that")
    return samples


def _check_code(c: CodeSettings) -> None:
    if c.format not in FORMATS:
        raise UserError(f"--format {c.format}: expected base or instruct")
    if c.n < 1:
        raise UserError(f"--num-samples {c.n}: expected an integer >= 1")
    bad = [k for k in c.pass_k if k < 1 or (k > c.n and not c.samples)]
    if bad:
        raise UserError(f"--pass-k {bad[0]}: expected values from 1 to --num-samples ({c.n})")
    validate.number(c.timeout, "--timeout", lo=0, hi=3600, lo_open=True)
    if c.memory_mb < 64:
        raise UserError(f"--memory-mb {c.memory_mb}: expected at least 64 (MB)")
    if c.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {c.max_new_tokens}: expected 0 (the benchmark's "
                        f"default) or a positive count")
    if c.workers < 0:
        raise UserError(f"--workers {c.workers}: expected 0 (one per CPU) or a positive count")


def complete(s: sample.SampleSettings, run: rundir.Run, prompts: list[str], n: int, max_new: int,
             on_batch=None) -> tuple[list[list[str]], dict]:
    """n generations of at most max_new tokens for each prompt: (texts[prompt][i], info).

    A prompt longer than the model's length allows is cut from the left, as Dream's evaluation.
    Generation j of prompt i uses seed s.seed + i * n + j, whatever the batching.
    """
    steps = s.nfe or sampler_defaults.completion_steps(run.decoding, max_new)
    kw = sample.decode_settings(replace(s, nfe=steps), run)
    jobs = [p for p in prompts for _ in range(n)]
    gen = generate(run.model, run.tokenizer, jobs, max_new_tokens=max_new, cut_prompts=True,
                   on_batch=on_batch, **kw)
    texts = [completion(run.tokenizer, gen, j) for j in range(len(jobs))]
    out = [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
    info = {"run_dir": str(run.path), "sampler": kw["sampler"], "sampler_options": kw["options"],
            "nfe": kw["nfe"],
            "max_new_tokens": max_new, "prompts_cut": gen.prompts_cut // max(n, 1),
            "k": kw["softmask"].k if kw["softmask"] else 0, "model_length": run.model.config.model_length}
    return out, info


def run_recipe(run_dir: Path):
    """The recipe a run was trained with (its data split and validation settings)."""
    file = Path(run_dir) / "recipe.toml"
    if not file.is_file():
        raise UserError(f"{run_dir}: no recipe.toml, so its data split is unknown; expected a run "
                        f"directory written by smdlm pretrain")
    return load_recipe(file)


def code_task(task: str, s: sample.SampleSettings, c: CodeSettings) -> tuple[dict, Path]:
    """humaneval or mbpp: generate (or read) samples, run them in the sandbox, pass@k report."""
    _check_code(c)
    bench = humaneval if task == "humaneval" else mbpp
    every, problems = _problems(task, c)
    settings = {"sampling": asdict(s), "code": asdict(c)}
    report = new_report(task, settings, None if c.samples else rundir.resolve(s.ckpt))
    path = report_path(task, c.out, None if c.samples else report["checkpoint"]["path"])
    if c.samples:
        samples = _read_samples(c, task, every, problems)
    else:
        run = rundir.load(report["checkpoint"]["path"], resolve_device(s.device))
        # the benchmark's length, unless the model is shorter: then half of it, the rest prompt
        max_new = c.max_new_tokens or min(bench.MAX_NEW_TOKENS, run.model.config.model_length // 2)
        prompts = [bench.prompt_text(p, c.format, run.tokenizer) for p in problems.values()]
        with timed(report, "generate"), progress(f"{task}: generate", len(prompts) * c.n) as advance:
            texts, info = complete(s, run, prompts, c.n, max_new, advance)
        info["empty_completions"] = sum(not t.strip() for ts in texts for t in ts)
        report["generation"] = info
        if info["empty_completions"] == len(prompts) * c.n:
            console.print(sample.EMPTY_HINT.format(what=f"all {len(prompts) * c.n} completions"))
        samples = [bench.postprocess(p, t, c.format) for p, ts in zip(problems.values(), texts)
                   for t in ts]
        samples_file = path.with_suffix(".samples.jsonl")
        atomic_write_text(samples_file, "".join(json.dumps(x) + "\n" for x in samples))
        report["samples_file"] = str(samples_file)
    limits = Limits(timeout=c.timeout, memory_mb=c.memory_mb, workers=c.workers)
    with timed(report, "execute"), progress(f"{task}: run tests", len(samples)) as advance:
        metrics, rows = code.score(problems, samples, c.pass_k, limits, lambda i, o: advance())
    report.update(metrics)
    report["results"] = rows
    return report, write_report(report, path)


# --- ELBO ---------------------------------------------------------------------------------------
def elbo(ckpt: str | None, device: str, split: str, batch_size: int, batches: int, seed: int | None,
         binary: bool, out: str | None) -> tuple[dict, Path]:
    if batches < 0:
        raise UserError(f"--batches {batches}: expected 0 (the run's eval_batches) or a positive "
                        f"count")
    if batch_size < 0:
        raise UserError(f"--batch-size {batch_size}: expected 0 (the run's) or a positive count")
    if seed is not None:
        validate.seed(seed)
    run_dir = rundir.resolve(ckpt)
    dev = resolve_device(device)
    if split not in ("valid", "train"):
        raise UserError(f"--split {split}: expected valid or train")
    run = rundir.load(run_dir, dev)
    model, tok, softmask = run.model, run.tokenizer, run.softmask
    recipe = run_recipe(run_dir)
    settings = {"split": split, "batch_size": batch_size, "batches": batches, "seed": seed,
                "binary": binary, "device": str(dev)}
    report = new_report("elbo", settings, run_dir)
    sm = None if binary or softmask is None else softmask.to(dev)
    n = batches or recipe.train.eval_batches
    with timed(report, "elbo"), progress("elbo", n) as advance:
        report.update(elbo_eval.elbo(model, sm, tok, recipe, dev, split, batch_size, batches, seed,
                                     on_batch=advance))
    return report, write_report(report, report_path("elbo", out, run_dir))


# --- unconditional samples: gen-PPL, entropy, MAUVE ---------------------------------------------
def unconditional(s: sample.SampleSettings, samples_file: str | None, task: str):
    """(texts with special tokens kept, token ids, info) of fresh samples or of a samples JSONL."""
    if samples_file:
        records = sample_records(samples_file)
        return [r["text"] for r in records], [r.get("tokens") or [] for r in records], \
            {"samples_file": samples_file}
    with progress(f"{task}: sample", s.num_samples) as advance:
        run, records, sidecar, _ = sample.generate(s, on_batch=advance)
    texts = [run.tokenizer.decode(r["tokens"], skip_special_tokens=False) for r in records]
    return texts, [r["tokens"] for r in records], {"run_dir": str(run.path), **sidecar["timing"],
                                                   "sampler": sidecar["settings"]["sampler"],
                                                   "k": sidecar["settings"]["k"]}


def sample_records(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--samples {path}: no such file; expected a JSONL file from smdlm sample")
    records = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--samples {path}: line {n} is not JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise UserError(f"--samples {path}: line {n} has no string `text`")
            records.append(r)
    if len(records) < 2:
        raise UserError(f"--samples {path}: {len(records)} samples; expected at least 2")
    return records


def genppl(s: sample.SampleSettings, samples_file: str | None, scorer_name: str, score_batch: int,
           out: str | None) -> tuple[dict, Path]:
    report = new_report("genppl", {"sampling": asdict(s), "samples": samples_file,
                                   "scorer": scorer_name}, None if samples_file else
                        rundir.resolve(s.ckpt))
    scorer = load_scorer(scorer_name, resolve_device(s.device))
    with timed(report, "sample"):
        texts, ids, info = unconditional(s, samples_file, "genppl")
    report["generation"] = info
    with timed(report, "score"), progress("genppl: score windows", len(texts)) as advance:
        report.update(genppl_eval.gen_ppl(scorer, texts, score_batch, advance, advance.set_total))
    if all(ids):
        report.update(genppl_eval.mean_entropy(ids))
    run_dir = None if samples_file else info["run_dir"]
    return report, write_report(report, report_path("genppl", out, run_dir))


def mauve(s: sample.SampleSettings, samples_file: str | None, featurizer: str, refs_file: str | None,
          num_refs: int, score_batch: int, out: str | None) -> tuple[dict, Path]:
    device = resolve_device(s.device)
    report = new_report("mauve", {"sampling": asdict(s), "samples": samples_file,
                                  "featurizer": featurizer, "refs": refs_file,
                                  "num_refs": num_refs},
                        None if samples_file else rundir.resolve(s.ckpt))
    scorer = load_scorer(featurizer, device, need_lm=False)
    with timed(report, "sample"):
        texts, _, info = unconditional(s, samples_file, "mauve")
    report["generation"] = info
    refs = references(refs_file, None if samples_file else Path(info["run_dir"]), num_refs or len(texts))
    with timed(report, "featurize"), progress("mauve: featurize", len(refs) + len(texts)) as advance:
        p = mauve_eval.features(scorer, refs, score_batch, advance)
        q = mauve_eval.features(scorer, texts, score_batch, advance)
    notes: list[str] = []
    with timed(report, "mauve"):
        report["mauve"] = mauve_eval.mauve_score(p, q, notes=notes)
    report["references"] = len(refs)
    report["notes"] = sorted(set(notes))
    for note in report["notes"]:
        console.print(f"mauve: {note}")
    run_dir = None if samples_file else info["run_dir"]
    return report, write_report(report, report_path("mauve", out, run_dir))


def references(refs_file: str | None, run_dir: Path | None, n: int) -> list[str]:
    """Human text: a JSONL with `text`, or the validation split of the run's recipe."""
    if refs_file:
        return [r["text"] for r in sample_records(refs_file)][:n]
    if run_dir is None:
        raise UserError("--refs FILE is needed with --samples: without a run there is no data split "
                        "to take references from")
    recipe = run_recipe(run_dir)
    tok = load_tokenizer(str(run_dir / "tokenizer"))
    return mauve_eval.reference_texts(recipe.data, tok, read_config(run_dir).model_length, n)


# --- Sudoku -------------------------------------------------------------------------------------
def sudoku_task(s: sample.SampleSettings, nfes: list[int], seeds: int, limit: int,
                out: str | None) -> tuple[dict, Path]:
    """Solved % and cells right of a sudoku run's held-out puzzles at each NFE, over `seeds`."""
    from smdlm_cli.evals import sudoku as sudoku_eval

    if seeds < 1:
        raise UserError(f"--seeds {seeds}: expected an integer >= 1")
    if not nfes or min(nfes) < 1:
        raise UserError(f"--nfe {','.join(map(str, nfes))}: expected positive step counts")
    run_dir = rundir.resolve(s.ckpt)
    recipe = run_recipe(run_dir)
    puzzles = sudoku_eval.test_puzzles(recipe, limit)
    run = rundir.load(run_dir, resolve_device(s.device))
    report = new_report("sudoku", {"sampling": asdict(s), "nfe": nfes, "seeds": seeds,
                                   "limit": limit}, run_dir)
    report.update(puzzles=len(puzzles), givens=recipe.data.sudoku_givens, results=[])
    with timed(report, "solve"), progress("sudoku", len(puzzles) * seeds * len(nfes)) as advance:
        for nfe in nfes:
            kw = sample.decode_settings(replace(s, nfe=nfe), run)
            report["sampler"], report["k"] = kw.pop("sampler"), (kw["softmask"].k if kw["softmask"]
                                                                 else 0)
            kw.pop("nfe")
            result = sudoku_eval.solve(run.model, run.tokenizer, puzzles, nfe, seeds,
                                       {"sampler": report["sampler"], **kw}, advance)
            report["results"].append(result)
    return report, write_report(report, report_path("sudoku", out, run_dir))
