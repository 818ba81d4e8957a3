"""`smdlm evaluate sweep`: the paper's main table in one command.

Checkpoints x decodings x NFE values x sampling seeds, each cell scored with the chosen metrics:
- a diffusion run gives a "binary" row (binary decoding) and, when it has soft-masking parameters,
  an "SM" row (SM decoding): an SM model decoded both ways shows whether a gain comes from the
  weights or from the feedback;
- an AR run (trained with [model] causal = true) gives one "AR" reference row, sampled left to
  right with one forward per token whatever the NFE column (NFE = length - 1).
Metrics: genppl (under --scorer), entropy (unigram, of the samples' ids), mauve (features from
--scorer, references from the first diffusion run's validation split), elbo (validation bound of
the row's model and decoding, NFE-independent). Each (row, NFE, seed) cell is saved in
DIR/cells/ as soon as it is done, so an interrupted sweep re-run with the same command resumes.
Outputs: DIR/sweep.json (every cell, mean and standard error over seeds), DIR/sweep.md (a table per
metric) and DIR/sweep.png (metric against NFE, a line per row). With --track tensorboard/wandb the
tables and the figure also go to those trackers (logs in --track-dir, default DIR).

Not here: the metrics (evals/) or sampling (commands/sample.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from smdlm_cli.commands import evaluate, sample
from smdlm_cli.commands.evaluate import run_recipe
from smdlm_cli.core import rundir, tracking
from smdlm_cli.core.distributed import resolve_device
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_json, atomic_write_text, read_json
from smdlm_cli.evals import elbo as elbo_eval, genppl as genppl_eval, mauve as mauve_eval
from smdlm_cli.evals.report import checkpoint_info, new_report, progress, save_figure, timed
from smdlm_cli.evals.scorer import load_scorer

METRICS = ("genppl", "entropy", "mauve", "elbo")
LABELS = {"genppl": "gen-PPL", "entropy": "entropy (nats)", "mauve": "MAUVE", "elbo": "ELBO (nats/token)"}


@dataclass
class SweepSettings:
    ckpts: list[str]
    nfe: list[int]
    metrics: list[str] = field(default_factory=lambda: ["genppl", "entropy"])
    scorer: str = evaluate.DEFAULT_SCORER
    num_samples: int = 32
    length: int | None = None
    seeds: int = 1
    seed: int = 0
    sampler: str = "mdlm"
    top_p: float | None = None
    temperature: float | None = None
    options: dict = field(default_factory=dict)  # further sampler options (cache, threshold, ...)
    batch_size: int = 16
    num_refs: int = 0          # 0: as many as samples
    device: str = "auto"
    out: str = "sweep"
    track: list[str] = field(default_factory=list)  # tensorboard, wandb: log the tables there too
    track_dir: str = ""                             # their logs; empty = out


@dataclass
class Row:
    run_dir: Path
    decoding: str               # "binary", "SM" or "AR"
    run: rundir.Run = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.run_dir.name} · {self.decoding}"


def _check(w: SweepSettings) -> None:
    if not w.ckpts:
        raise UserError("--ckpt: expected at least one run directory")
    unknown = [m for m in w.metrics if m not in METRICS]
    if unknown or not w.metrics:
        raise UserError(f"--metrics {','.join(w.metrics)}: expected a comma-separated subset of "
                        f"{', '.join(METRICS)}")
    if not w.nfe or any(n < 1 for n in w.nfe):
        raise UserError(f"--nfe {','.join(map(str, w.nfe))}: expected positive integers, e.g. 8,16,32")
    for flag, value in (("--num-samples", w.num_samples), ("--seeds", w.seeds),
                        ("--batch-size", w.batch_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected an integer >= 1")
    if "mauve" in w.metrics and w.num_samples < 2:
        raise UserError(f"--num-samples {w.num_samples}: MAUVE needs at least 2 samples")
    tracking.check(w.track, "--track")


def _rows(w: SweepSettings, device) -> list[Row]:
    rows = []
    for ckpt in w.ckpts:
        run = rundir.load(rundir.resolve(ckpt), device)
        if run.model.config.causal:
            rows.append(Row(run.path, "AR", run))
            continue
        rows.append(Row(run.path, "binary", run))
        if run.softmask is not None:
            rows.append(Row(run.path, "SM", run))
    return rows


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _settings(w: SweepSettings, row: Row, nfe: int, seed_index: int) -> sample.SampleSettings:
    return sample.SampleSettings(
        ckpt=str(row.run_dir), nfe=nfe, k=0 if row.decoding == "binary" else None,
        sampler="ar" if row.decoding == "AR" else w.sampler, num_samples=w.num_samples,
        batch_size=w.batch_size, length=w.length, top_p=w.top_p, temperature=w.temperature,
        seed=w.seed + seed_index * w.num_samples, device=w.device,
        options={} if row.decoding == "AR" else dict(w.options))


def _cell(w: SweepSettings, row: Row, nfe: int, seed_index: int, scorer, ref_features,
          advance) -> dict:
    s = _settings(w, row, nfe, seed_index)
    _, records, sidecar, _ = sample.generate(s, run=row.run, on_batch=advance)
    tok = row.run.tokenizer
    texts = [tok.decode(r["tokens"], skip_special_tokens=False) for r in records]
    cell = {"nfe": records[0]["nfe"], "seed": s.seed, "k": sidecar["settings"]["k"],
            "tokens_per_s": sidecar["timing"]["tokens_per_s"]}
    if "genppl" in w.metrics:
        cell["genppl"] = genppl_eval.gen_ppl(scorer, texts, w.batch_size)["gen_ppl"]
    if "entropy" in w.metrics:
        cell["entropy"] = genppl_eval.mean_entropy([r["tokens"] for r in records])["entropy"]
    if "mauve" in w.metrics:
        q = mauve_eval.features(scorer, texts, w.batch_size)
        notes: list[str] = []
        cell["mauve"] = mauve_eval.mauve_score(ref_features, q, notes=notes)
        cell["notes"] = sorted(set(notes))
    return cell


def _elbo(row: Row, device) -> float:
    run = row.run
    sm = run.softmask.to(device) if row.decoding == "SM" else None
    return elbo_eval.elbo(run.model, sm, run.tokenizer, run_recipe(run.path), device)["nll"]


def _summarise(seeds: list[dict], metrics: list[str]) -> dict:
    summary = {"nfe": seeds[0]["nfe"], "seeds": seeds,
               # the median: one seed slowed by the machine's other work does not move it
               "tokens_per_s": float(np.median([c["tokens_per_s"] for c in seeds]))}
    for m in metrics:
        summary[m], summary[f"{m}_se"] = _mean_se([c[m] for c in seeds])
    return summary


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return mean, se


def run(w: SweepSettings) -> tuple[dict, Path]:
    _check(w)
    device = resolve_device(w.device)
    out = Path(w.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a directory for sweep.json/md/png")
    rows = _rows(w, device)
    report = new_report("sweep", asdict(w))
    report["checkpoints"] = [checkpoint_info(r.run_dir) for r in rows if r.decoding != "SM"]
    shas = {Path(c["path"]): c["sha256"] for c in report["checkpoints"]}
    scorer = ref_features = None
    if {"genppl", "mauve"} & set(w.metrics):
        scorer = load_scorer(w.scorer, device, need_lm="genppl" in w.metrics)
    if "mauve" in w.metrics:
        first = next((r for r in rows if r.decoding != "AR"), rows[0])
        refs = evaluate.references(None, first.run_dir, w.num_refs or w.num_samples)
        ref_features = mauve_eval.features(scorer, refs, w.batch_size)
        report["references"] = {"run": str(first.run_dir), "count": len(refs)}
    sample_metrics = [m for m in w.metrics if m != "elbo"]
    table = []
    n_cells = sum(1 if r.decoding == "AR" else len(w.nfe) for r in rows) * w.seeds
    with timed(report, "sweep"), progress("sweep: sample", n_cells * w.num_samples) as advance:
        for row in rows:
            entry = {"run": str(row.run_dir), "decoding": row.decoding, "label": row.label,
                     "cells": []}
            if "elbo" in w.metrics:
                entry["elbo"] = _elbo(row, device)
            for nfe in ([w.nfe[0]] if row.decoding == "AR" else w.nfe) if sample_metrics else []:
                # a cell is cached under everything that determines it, weights included
                seeds = []
                for i in range(w.seeds):
                    file = out / "cells" / f"{_key(row.label, shas[row.run_dir], nfe, i, asdict(w))}.json"
                    if file.is_file():
                        advance(w.num_samples)
                        seeds.append(read_json(file))
                        continue
                    seeds.append(_cell(w, row, nfe, i, scorer, ref_features, advance))
                    atomic_write_json(file, seeds[-1])
                entry["cells"].append(_summarise(seeds, sample_metrics))
            table.append(entry)
    report["rows"] = table
    report["notes"] = sorted({n for r in table for c in r["cells"] for s in c["seeds"]
                              for n in s.get("notes", [])})
    atomic_write_json(out / "sweep.json", report)
    atomic_write_text(out / "sweep.md", markdown(report))
    plot(report, out / "sweep.png")
    if w.track:
        track(report, tracking.Trackers(w.track, Path(w.track_dir or out), out.resolve().name))
    return report, out


def track(report: dict, trackers: tracking.Trackers) -> None:
    """Each metric's table (as sweep.md has it) and the figure, to the trackers."""
    import matplotlib.pyplot as plt

    with trackers:
        settings = report["settings"]
        for m in settings["metrics"]:
            one = {**report, "settings": {**settings, "metrics": [m]}}
            trackers.table(f"sweep/{m}", "\n".join(tables(one)[2:]))
        fig = plot_figure(report)
        trackers.figure("sweep/figure", fig, 0)
        plt.close(fig)


def fmt(value: float | None, se: float | None) -> str:
    if value is None:
        return "–"
    digits = 2 if abs(value) >= 10 else 3
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def markdown(report: dict) -> str:
    """sweep.md: a title, what the cells are, then a table per metric."""
    title = f"# Sweep: {', '.join(report['settings']['metrics'])}"
    return "\n".join([title, "", describe(report), ""] + tables(report))


def describe(report: dict) -> str:
    w = report["settings"]
    return (f"{w['num_samples']} samples per cell, {w['seeds']} seed(s) (mean ± standard error), "
            f"sampler {w['sampler']}, scorer {w['scorer']}. AR rows decode left to right with one "
            f"forward per token whatever the column.")


def tables(report: dict, level: str = "##") -> list[str]:
    """A table per metric, from the report's data: one row per (checkpoint, decoding), one
    column per NFE; `level` is the Markdown heading of each."""
    w = report["settings"]
    nfes = w["nfe"]
    lines = []
    for m in w["metrics"]:
        lines += [f"{level} {LABELS[m]}", ""]
        if m == "elbo":
            lines += ["| run · decoding | ELBO (nats/token) |", "|---|---|"]
            lines += [f"| {r['label']} | {r['elbo']:.4f} |" for r in report["rows"]]
            lines.append("")
            continue
        lines += ["| run · decoding | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---|" * len(nfes)]
        for r in report["rows"]:
            if r["decoding"] == "AR":
                cells = [fmt(r["cells"][0][m], r["cells"][0][f"{m}_se"])] * len(nfes)
                label = f"{r['label']} (NFE {r['cells'][0]['nfe']})"
            else:
                by_nfe = {c["nfe"]: c for c in r["cells"]}
                cells = [fmt(by_nfe[n][m], by_nfe[n][f"{m}_se"]) if n in by_nfe else "–"
                         for n in nfes]
                label = r["label"]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot(report: dict, path: Path) -> list[str]:
    """Metric against NFE (log2 axis), a line per row; AR rows as dashed horizontal lines. A row
    whose curve equals an earlier one's is drawn dotted, shifted a little, and its legend entry
    says "identical to ...". Returns the first panel's legend entries."""
    fig = plot_figure(report)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    save_figure(fig, path)
    return legend


def plot_figure(report: dict):
    """The figure of `plot`, not saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in report["settings"]["metrics"] if m != "elbo"] or ["elbo"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    nfes = report["settings"]["nfe"]
    markers = "osD^vP*X"
    for ax, m in zip(axes[0], metrics):
        seen: dict[tuple, str] = {}  # curve -> the label that drew it first
        for i, r in enumerate(report["rows"]):
            if m == "elbo":
                ax.plot(nfes, [r["elbo"]] * len(nfes), label=r["label"])
                continue
            if r["decoding"] == "AR":
                ax.axhline(r["cells"][0][m], linestyle="--", color="grey", label=r["label"])
                continue
            xs = [c["nfe"] for c in r["cells"]]
            ys = [c[m] for c in r["cells"]]
            err = [c[f"{m}_se"] or 0.0 for c in r["cells"]]
            twin = seen.setdefault((tuple(xs), tuple(ys)), r["label"])
            label = r["label"] if twin == r["label"] else f"{r['label']} (identical to {twin})"
            # a small shift along the log axis keeps identical curves visible side by side
            shift = 2 ** (0.04 * (i - (len(report["rows"]) - 1) / 2))
            ax.errorbar([x * shift for x in xs], ys, yerr=err, marker=markers[i % len(markers)],
                        capsize=3, label=label, linestyle="-" if twin == r["label"] else ":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE")
        ax.set_ylabel(LABELS[m])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def summary(report: dict) -> str:
    """The console view: every metric's table (sweep.md has them too), then the notes."""
    notes = [f"note: {n}" for n in report.get("notes", [])]
    return "\n".join(tables(report) + notes).strip()
