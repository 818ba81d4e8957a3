"""The λ section of the reproduction report: does ω_s move, is λ on while decoding, and did SM
change the weights. Every figure is read from the run outputs (metrics.jsonl, the
`inspect-lambda --decode --json` reports, model.safetensors).

Not here: the rest of the report (report.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from smdlm_cli.core.io import read_json
from smdlm_cli.evals.report import save_figure
from smdlm_cli.reproduce.outputs import training_summary
from smdlm_cli.reproduce import stages as reproduce


def lambda_section(plan, figures: Path) -> list[str]:
    lines = ["## λ behaviour", "",
             "Does ω_s grow from its initial value, as the paper reports? ω_s = sigmoid(raw), and "
             "Adam moves raw by about its learning rate per update while the gradient's sign holds; "
             "ω receives a gradient only in SM steps (Adam's momentum still moves it in the binary "
             "steps between them, so a run can exceed lr × SM steps). The table gives the move of "
             "raw the run made, lr × SM steps, and the move that ω_s = 1/2 needs (−logit(initial "
             "scale)). ω_s is not the only gate: λ/ω_s is ½ at entropy H = −ω_b and falls "
             "steeply above it, so predictions of high entropy are fed back with λ ≈ 0 whatever "
             "ω_s. The median entropy of the masked predictions fed back while decoding is "
             "measured at the masks each step leaves for a later forward (inspect-lambda "
             "--decode).", "",
             "| run | ω_s initial → final | ω_b | ω_a | raw move: made / lr × SM steps / needed "
             f"| λ at H = 0 | mean λ over masks, NFE {plan.length // 16} | share of masks with "
             "λ > 0.1 | median H while decoding (nats) |", "|---|---|---|---|---|---|---|---|---|"]
    found = {}
    for name in reproduce.SM_RUNS:
        s = training_summary(plan, name)
        file = plan.runs / "lambda" / f"{name}.json"
        if s is None or not s["omega"]["scale"]:
            lines.append(f"| {name} | not trained yet ||||||||")
            continue
        sm = s["recipe"].softmask
        reach = None if s["sm_steps"] is None else sm.lr * s["sm_steps"]
        need = -_logit(sm.scale) if 0 < sm.scale < 0.5 else 0.0
        made = _logit(s["omega"]["scale"][-1]) - _logit(sm.scale)
        info = read_json(file) if file.is_file() else None
        found[name] = (s, info)
        cols = [f"{sm.scale:.3g} → {s['omega']['scale'][-1]:.3g}",
                f"{s['omega']['centre'][-1]:.3g}", f"{s['omega']['steepness'][-1]:.3g}",
                f"{made:.3g} / {'–' if reach is None else f'{reach:.3g}'} / {need:.3g}"]
        if info is None:
            cols += ["*stage `lambda` not run yet*", "", "", ""]
        else:
            d = info["decode"]
            mean = [v for v in d["lam_mean"] if v is not None]
            share = [v for v in d["lam_share_gt_0.1"] if v is not None]
            h = _median_entropy(info)
            cols += [f"{info['key_points']['lambda_at_zero_entropy']:.3g}",
                     f"{sum(mean) / max(len(mean), 1):.3g}", f"{sum(share) / max(len(share), 1):.3g}",
                     "–" if h is None else f"{h:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    diff = _weight_difference(plan.runs / "sm-iso-update", plan.runs / "binary")
    if diff is not None:
        lines += ["", f"Largest difference between the weights of sm-iso-update and of the binary "
                      f"continuation (same base, same batches): {diff[0]:.3g}, against a largest "
                      f"weight magnitude of {diff[1]:.3g}. How to read it: with λ near 0 the "
                      f"soft-masked input equals the [MASK] embedding to float precision, so the two "
                      f"runs can differ by rounding only; a difference of the order of the weights "
                      f"means soft-masking changed what was learned."]
    if found:
        png = figures / f"{Path(plan.cfg.report).stem}-lambda.png"
        _plot_lambda(found, png)
        lines += ["", f"![ω_s over training, λ(H), λ over decoding steps](figures/{png.name})"]
    return lines + [""]


def _weight_difference(a: Path, b: Path) -> tuple[float, float] | None:
    """(max |a - b| over the published backbone weights, max |b|), or None if either is missing."""
    if not ((a / "model.safetensors").is_file() and (b / "model.safetensors").is_file()):
        return None
    from smdlm_cli.core.io import load_tensors

    wa, wb = load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors")
    return (max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wb),
            max(float(w.float().abs().max()) for w in wb.values()))


def _median_entropy(info: dict) -> float | None:
    """The median entropy of the masked predictions fed back while decoding, pooled over steps and
    positions, as inspect-lambda measured it."""
    return info["decode"].get("entropy_fed_back_median")


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _plot_lambda(found: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for name, (s, info) in found.items():
        axes[0].plot(s["omega_steps"], s["omega"]["scale"], label=name)
        if info is not None:
            h, lam = zip(*info["curve"])
            axes[1].plot(h, lam, label=name)
            steps = range(len(info["decode"]["lam_mean"]))
            axes[2].plot(steps, [float("nan") if v is None else v
                                 for v in info["decode"]["lam_mean"]], marker="o", label=name)
    axes[0].set(xlabel="training step", ylabel="ω_s (scale)", yscale="log", title="ω_s over training")
    axes[1].set(xlabel="entropy of the prediction H(p) (nats)", ylabel="λ", title="learned λ(H)")
    axes[2].set(xlabel="decoding step", ylabel="mean λ over masked positions",
                title="λ while decoding (low NFE)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


