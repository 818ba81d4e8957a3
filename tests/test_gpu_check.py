"""benchmarks/gpu_check.py in its CPU mode: the code paths a GPU run takes, on tiny shapes."""

from __future__ import annotations

import json
import math


def numbers(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def check(result, directory) -> dict:
    """The run's JSON: every part measured, every figure finite and positive; the table shows it."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((directory / "gpu_check.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"train", "dream", "mdlm", "fsdp"}
    train, dream, mdlm = parts["train"], parts["dream"], parts["mdlm"]
    for mode in ("binary", "sm"):
        for key in ("tokens_per_s", "mfu", "peak_memory_gb"):
            assert f"{mode}_{key}" in train
        assert 0 < train[f"{mode}_mfu"] < 1
    assert train["sm_binary_step_ratio"] > 0
    for cache in ("none", "prefix", "dual"):
        for thr in ("off", "0.9"):
            for mode in ("binary", "SM"):
                assert dream[f"{cache}_thr{thr}_{mode}_tokens_per_s"] > 0
                assert 1 <= dream[f"{cache}_thr{thr}_{mode}_nfe"] <= dream["gen"]
    assert dream["vocab"] == 512 and "sm_feedback_share" in dream
    assert {"batch1_sm_binary_step_ratio", "batch4_sm_binary_step_ratio"} <= set(mdlm)
    for key, value in numbers(parts):
        assert math.isfinite(value), key
        # SM's share of a step may come out below 0 on a noisy CPU, never below -100%
        assert value > (-1 if key.endswith("_share") else 0), (key, value)
    fsdp = parts["fsdp"]
    assert fsdp["status"] == "ok" or fsdp["status"].startswith("skipped: this smdlm has no"), fsdp
    assert f"{train['sm_binary_step_ratio']:,.4g}" in result.stdout  # the table shows the JSON
    assert "error" not in json.dumps(report)
    return report


def test_cpu_tiny_mode_measures_every_part_with_finite_positive_figures(gpu_check_cpu):
    result, directory, seconds = gpu_check_cpu
    check(result, directory)
    assert seconds < 240  # < 2 min on an idle machine; the suite shares the cores
