"""The regime section of the reproduction report: how sure the base model is about the
predictions soft-masking would feed back (the entropy bar), and how that falls with training.
Every figure is read from the `inspect-lambda --decode --json` reports of the entropy stage and
the runs' metrics.jsonl; the figures also go to docs/results.json.

Not here: the rest of the report (report.py).
"""

from __future__ import annotations

from smdlm_cli.core.io import read_json
from smdlm_cli.reproduce import stages as reproduce
from smdlm_cli.reproduce.outputs import missing, training_summary


def entropy_section(plan, figures: dict) -> list[str]:
    """The regime bar: how sure the base is about the predictions SM would feed back."""
    nfe, bar = plan.length // 4, reproduce.ENTROPY_BAR
    lines = ["## Is this a regime where λ can act?", ""]
    file = plan.runs / "lambda" / "base.json"
    if not file.is_file():
        return lines + [missing("entropy")]
    d = read_json(file)["decode"]
    h = d["entropy_fed_back_median"]
    figures["median_fed_back_entropy"] = h
    figures["entropy_bar"] = {"nfe": nfe, "max_nats": bar, "cleared": h is not None and h <= bar}
    verdict = "clears" if h is not None and h <= bar else "does not clear"
    lines += [
        f"The base model (binary) decoding {plan.cfg.num_samples} samples at NFE {nfe} (L/4): the "
        f"median entropy of the {d['entropy_fed_back_count']} predictions at the masks left after a "
        f"step — what soft-masking feeds back — is **{'–' if h is None else f'{h:.3f}'} nats**; "
        f"the bar is {bar:g} nat, which it {verdict}. λ = ω_s·σ(ω_a(−H − ω_b)) is near ω_s for H "
        f"well below −ω_b = {-plan.recipes['sm-iso-update'].softmask.centre:g} (the runs' start) "
        f"and near 0 far above it.", ""]
    return lines + _entropy_curve(plan, figures)


def _entropy_curve(plan, figures: dict) -> list[str]:
    """The bar's measure against training tokens: the base, then the base + its binary
    continuation (reproduce.ENTROPY_RUNS), with the quantiles of the fed-back entropies."""
    curve, tokens = [], 0
    for name in reproduce.ENTROPY_RUNS:
        file, summary = plan.runs / "lambda" / f"{name}.json", training_summary(plan, name)
        if not file.is_file() or summary is None:
            break
        tokens += summary["tokens"]  # a continuation's count adds to the base's
        d = read_json(file)["decode"]
        curve.append({"run": name, "training_tokens": tokens, "median": d["entropy_fed_back_median"],
                      "quantiles": d["entropy_fed_back_quantiles"],
                      "count": d["entropy_fed_back_count"]})
    if len(curve) < 2:
        return []
    figures["fed_back_entropy_curve"] = curve
    qs = list(curve[0]["quantiles"])
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    out = ["How it falls with training: the same measure for the binary continuation (the base "
           "trained further on the continuations' data). Entropies in nats; the quantiles are over "
           "all fed-back predictions of the samples.", "",
           "| model | training tokens | median | " + " | ".join(f"q{q}" for q in qs) + " |",
           "|---" * (3 + len(qs)) + "|"]
    for c in curve:
        out.append(f"| {c['run']} | {c['training_tokens']:,} | {fmt(c['median'])} | "
                   + " | ".join(fmt(c["quantiles"][q]) for q in qs) + " |")
    return out + [""]
