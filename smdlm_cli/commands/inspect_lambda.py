"""`smdlm inspect-lambda`: what a checkpoint's soft-masking learned, and what it does in decoding.

λ(H) = scale · σ(steepness · (−H − centre)) over the entropy range [0, ln V] of the model's
vocabulary: as a table of ω (values and raw parameters), its key points, a terminal plot and a
PNG. `--decode` runs a sampling pass with a trace and plots λ over the decoding steps (mean and
q10–q90 over the masked positions) and the share of masks with λ > 0.1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from smdlm_cli.core import checkpoint
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import read_config
from smdlm_cli.core.runlock import check_output
from smdlm_cli.core.softmask import SoftMask

GPT2_MDLM_VOCAB = 50258  # for a bare transparency_config.json, which does not say its vocabulary
POINTS = 101
DECODE_KEYS = ("lam_mean", "lam_q10", "lam_q50", "lam_q90", "lam_share_gt_0.1")
err = Console(stderr=True, soft_wrap=True, highlight=False)


def load_target(target: str | None, decode: bool = False) -> tuple[Path, SoftMask | None, int, bool]:
    """(path, SoftMask, vocabulary size, is a run directory) for a run directory or a JSON file.
    With `decode` a binary run is allowed (SoftMask None): its decoding entropies are measured."""
    path = checkpoint.find_latest_run("runs") if target is None else Path(target)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or JSON file")
    softmask = checkpoint.load_softmask(path)
    if softmask is None and not (decode and path.is_dir()):
        raise UserError(f"{path}: no soft-masking parameters (a binary run); expected a run trained "
                        f"with [softmask] enabled = true, a softmask/transparency_config JSON, or "
                        f"--decode (a binary run's decoding entropies)")
    vocab = GPT2_MDLM_VOCAB
    if path.is_dir() and (path / "config.json").exists():
        vocab = read_config(path).vocab_size
    return path, softmask, vocab, path.is_dir()


def curve(softmask: SoftMask, vocab: int) -> list[list[float]]:
    """[entropy, λ] pairs from 0 to ln V (nats)."""
    with torch.no_grad():
        h = torch.linspace(0.0, math.log(vocab), POINTS)
        lam = softmask.lam_from_entropy(h)
    return [[float(a), float(b)] for a, b in zip(h, lam)]


def describe(softmask: SoftMask, vocab: int) -> dict:
    with torch.no_grad():
        at = lambda h: float(softmask.lam_from_entropy(torch.tensor(float(h))))  # noqa: E731
        scale, centre = float(softmask.scale), float(softmask.centre)
        temp = softmask.temperature
        return {
            "scale": scale, "centre": centre, "steepness": float(softmask.steepness),
            "k": softmask.k, "temperature": None if temp is None else float(temp),
            "raw": {name: float(p) for name, p in softmask.named_parameters()},
            "vocab_size": vocab,
            "key_points": {
                "entropy_at_half_scale": -centre,  # σ(0) = 1/2 where −H − centre = 0
                "lambda_at_zero_entropy": at(0.0),
                "lambda_at_max_entropy": at(math.log(vocab)),
            },
            "curve": curve(softmask, vocab),
        }


def text_plot(points: list[list[float]], height: int = 12, width: int = 60, top: float | None = None) -> str:
    """A column plot of y against x in block characters, y from 0 to `top` (default the max)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    top = top or max(max(ys), 1e-12)
    cols = [ys[min(len(ys) - 1, round(i * (len(ys) - 1) / (width - 1)))] for i in range(width)]
    rows = []
    for r in range(height, 0, -1):
        line = "".join("█" if y / top >= (r - 0.5) / height else " " for y in cols)
        label = f"{top:9.3g} │" if r == height else "          │"
        rows.append(label + line)
    rows.append("        0 └" + "─" * width)
    rows.append(f"          {xs[0]:<.3g}{'entropy (nats)':^{width - 8}}{xs[-1]:.3g}")
    return "\n".join(rows)


def plot_curve(info: dict, file: Path) -> None:
    import matplotlib.pyplot as plt

    fig = curve_figure(info)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=120, bbox_inches="tight")
    plt.close(fig)


def curve_figure(info: dict, hint: bool = True):
    """The λ(H) plot of a `describe` report as a matplotlib figure (the PNG, and the trackers');
    `hint` adds the line that points at --decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, lam = zip(*info["curve"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(h, lam)
    ax.axvline(info["key_points"]["entropy_at_half_scale"], ls=":", c="grey", label="λ = scale/2")
    # where the model's own predictions lie: what explains a λ that stays near 0
    fed = [v for v in info.get("decode", {}).get("entropy_q50", []) if v is not None]
    if fed:
        ax.axvspan(min(fed), max(fed), color="tab:orange", alpha=0.2,
                   label="median H fed back, per decoding step")
    ax.set(xlabel="entropy of the prediction H(p) (nats)", ylabel="λ",
           title=f"scale {info['scale']:.3g}, centre {info['centre']:.3g}, "
                 f"steepness {info['steepness']:.3g}, k {info['k']}"
                 + ("" if fed or not hint else "\n(--decode also marks the entropies the model feeds back)"))
    ax.legend()
    return fig


def plot_decode(stats: dict, file: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(len(stats["lam_mean"]))
    nan = float("nan")
    get = lambda key: [nan if v is None else v for v in stats[key]]  # noqa: E731
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(7, 8.5), sharex=True)
    a.fill_between(steps, get("lam_q10"), get("lam_q90"), alpha=0.3, label="q10–q90")
    a.plot(steps, get("lam_mean"), label="mean")
    a.plot(steps, get("lam_q50"), ls="--", label="median")
    a.set(ylabel="λ over masked positions", title=title)
    positive = [v for v in get("lam_q90") if v == v and v > 0]
    if positive and max(positive) < 1e-2:  # decades, not a linear axis at "×1e-18"
        a.set_yscale("log")
    a.legend()
    b.plot(steps, get("lam_share_gt_0.1"))
    b.set(ylabel="share of masks with λ > 0.1", ylim=(0.0, 1.0))
    c.plot(steps, get("entropy_q50"), marker=".")
    c.set(xlabel="decoding step", ylabel="median H(p) fed back (nats)", ylim=(0.0, None))
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=120, bbox_inches="tight")
    plt.close(fig)


def decode_stats(run_dir: Path, sampling) -> dict:
    """λ statistics per decoding step of a sampling pass (SampleSettings), and the entropy of the
    predictions fed back (measured, not read off λ: it is defined for binary decoding too)."""
    from dataclasses import replace

    from smdlm_cli.commands.sample import generate

    settings = replace(sampling, ckpt=str(run_dir), batch_size=sampling.num_samples)
    *_, trace = generate(settings, trace=True)
    clean = lambda v: None if math.isnan(v) else v  # noqa: E731  (JSON has no NaN)
    stats = {key: [clean(v) for v in trace[key]] for key in (*DECODE_KEYS, "entropy_q50")}
    stats["forward"] = trace["forward"]
    stats["entropy_fed_back_median"] = clean(trace["entropy_fed_back_median"])
    stats["entropy_fed_back_quantiles"] = {q: clean(v) for q, v in
                                           trace["entropy_fed_back_quantiles"].items()}
    stats["entropy_fed_back_count"] = trace["entropy_fed_back_count"]
    return stats


def run(target: str | None, *, png: Path | None = None, decode: bool = False, sampling=None,
        decode_png: Path | None = None) -> tuple[dict, Path]:
    """The report (the `--json` output) and the checkpoint it describes; writes the PNGs."""
    path, softmask, vocab, is_run = load_target(target, decode)
    info = describe(softmask, vocab) if softmask is not None else {"vocab_size": vocab, "binary": True}
    base = path if is_run else path.parent
    png = check_output(png, "--png") if png else base / ("lambda.png" if is_run else
                                                           f"{path.stem}-lambda.png")
    if decode_png:
        check_output(decode_png, "--decode-png")
    if decode:
        if not is_run:
            raise UserError(f"--decode: {path} is a JSON file; expected a run directory (it samples)")
        info["decode"] = decode_stats(path, sampling)
        decode_png = decode_png or base / "lambda-decode.png"
        plot_decode(info["decode"], decode_png, f"λ while decoding {path.name}: "
                    f"{sampling.sampler or 'mdlm'} sampler, NFE {sampling.nfe}, "
                    f"{sampling.num_samples} samples")
        err.print(f"λ over decoding steps written to {decode_png}")
    if softmask is not None:
        plot_curve(info, png)
        err.print(f"λ curve written to {png}")
    return info, path


def table_steps(n: int, rows: int = 12) -> list[int]:
    """At most `rows` steps, evenly spread, first and last included."""
    if n <= rows:
        return list(range(n))
    return sorted({round(i * (n - 1) / (rows - 1)) for i in range(rows)})


def show(info: dict, path: Path, console: Console) -> None:
    """The report for people: ω table, key points, terminal curve, decoding table."""
    if not info.get("binary"):
        _show_omega(info, path, console)
    else:
        console.print(f"{path} is a binary run: no λ; the predictions soft-masking would feed back:")
    if "decode" in info:
        _show_decode(info["decode"], console)


def _show_omega(info: dict, path: Path, console: Console) -> None:
    table = Table(title=f"soft-masking of {path}")
    for col in ("ω", "value", "raw parameter"):
        table.add_column(col)
    raw = info["raw"]
    table.add_row("scale ω_s", f"{info['scale']:.6g}", f"raw_scale = {raw['raw_scale']:.6g}")
    table.add_row("centre ω_b", f"{info['centre']:.6g}", f"raw_centre = {raw['raw_centre']:.6g}")
    table.add_row("steepness ω_a", f"{info['steepness']:.6g}",
                  f"raw_steepness = {raw['raw_steepness']:.6g}")
    if info["temperature"] is not None:
        table.add_row("temperature", f"{info['temperature']:.6g}",
                      f"raw_temperature = {raw['raw_temperature']:.6g}")
    table.add_row("k", str(info["k"]), "")
    console.print(table)
    kp = info["key_points"]
    console.print(f"λ = scale/2 at entropy {kp['entropy_at_half_scale']:.4g} nats; λ at zero entropy "
                  f"{kp['lambda_at_zero_entropy']:.4g}; at ln V = {math.log(info['vocab_size']):.3g} "
                  f"nats {kp['lambda_at_max_entropy']:.3g}")
    console.print("λ against the entropy of the prediction:")
    console.print(text_plot(info["curve"], top=info["scale"] or None))


def _show_decode(d: dict, console: Console) -> None:
    steps = Table(title="λ over decoding steps (masked positions) and H(p) fed back")
    for col in ("step", "mean", "q10", "q50", "q90", "share λ>0.1", "median H fed back"):
        steps.add_column(col, justify="right")
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    shown = table_steps(len(d["lam_mean"]))
    for i in shown:
        steps.add_row(str(i), *(fmt(d[key][i]) for key in (*DECODE_KEYS, "entropy_q50")))
    console.print(steps)
    console.print(f"median entropy of the {d['entropy_fed_back_count']} predictions fed back: "
                  f"{fmt(d['entropy_fed_back_median'])} nats (quantiles "
                  + ", ".join(f"{q}: {fmt(v)}" for q, v in d["entropy_fed_back_quantiles"].items())
                  + ")")
    if len(shown) < len(d["lam_mean"]):
        console.print(f"{len(shown)} of {len(d['lam_mean'])} steps shown; --json has every step")
    top = max((v for v in d["lam_q90"] if v is not None), default=0.0)
    if top < 1e-3 and any(v is not None for v in d["lam_q90"]):
        console.print(f"λ stays below {top:.2g} at 90% of the masks: the predictions fed back "
                      f"are too unsure for this ω (see the entropies marked on the λ plot)")
