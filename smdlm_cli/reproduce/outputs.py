"""Reading the outputs of a reproduction chain's training stages (metrics.jsonl, recipe.toml),
and the line every report section writes for a stage that has not run.

Every count comes from what the trainer recorded (steps, forwards, SM steps, tokens), never
re-derived from the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

from smdlm_cli.recipe import load_recipe


def missing(stage: str) -> str:
    """A report section's line for a stage (or stages) without outputs yet."""
    return f"*Not run yet: stage `{stage}`.*\n"


def _metrics(run_dir: Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def training_summary(plan, name: str) -> dict | None:
    """Steps, forwards, SM steps, tokens, validation ELBO first and last, final omega of a run."""
    run_dir = plan.runs / name
    records = _metrics(run_dir)
    if not records:
        return None
    recipe = load_recipe(run_dir / "recipe.toml")
    logs = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_nll" in r]
    last = logs[-1] if logs else {}
    steps, forwards = vals[-1]["step"], vals[-1]["forwards"]
    # the final validation record counts SM steps and tokens at the last step; runs written before
    # it did fall back to the last logged step (`counted_at` says which)
    counts = vals[-1] if "sm_steps" in vals[-1] else last
    return {"recipe": recipe, "steps": steps, "forwards": forwards,
            "sm_steps": counts.get("sm_steps"), "tokens": counts.get("tokens"),
            "counted_at": counts.get("step", steps),
            "tokens_per_s": last.get("tokens_per_s"), "first_val": vals[0]["val_nll"],
            "last_val": vals[-1]["val_nll"],
            "omega": {k: [r[k] for r in logs if k in r] for k in ("scale", "centre", "steepness")},
            "omega_steps": [r["step"] for r in logs if "scale" in r]}
