"""benchmarks/peer_decode.py without the peers' code: they are skipped with a one-line reason, and
smdlm's own rows are measured and checked against each row decoded alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import peer_decode  # noqa: E402


def test_absent_peers_are_skipped_and_smdlm_decodes_every_row_as_alone(tmp_path):
    out = tmp_path / "peers.json"
    env = {k: v for k, v in os.environ.items() if k not in ("FAST_DLLM_PATH", "DLLM_PATH")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peer_decode.py"), "--dllm", str(tmp_path),
         "--prompt", "4", "--gen", "8", "--block", "4", "--repeats", "1", "--batches", "1,2",
         "--json", str(out)], capture_output=True, text=True, timeout=600,
        env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "skipped Fast-dLLM: no checkout given (--fast-dllm DIR or $FAST_DLLM_PATH)" in lines
    assert any(line.startswith(f"skipped dllm: {tmp_path} does not load (ModuleNotFoundError")
               for line in lines)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 * 2 and {r["impl"] for r in rows} == {"smdlm"}
    for r in rows:
        assert r["status"] == "ok" and r["same_as_smdlm"] == 1.0, r
        assert 1 <= r["nfe"] <= 8 and r["tokens_per_s"] > 0 and r["smdlm_speedup"] == 1.0


def test_status_names_crashes_leftover_masks_and_rows_that_differ_from_alone():
    mask = 9
    alone = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]])]
    assert peer_decode.status_of(torch.tensor([[1, 2], [3, 4]]), alone, alone, mask) == ("ok", 1.0)
    assert peer_decode.status_of("crash: E: x", alone, alone, mask) == ("crash: E: x", None)
    assert peer_decode.status_of(torch.tensor([[1, 2], [3, 9]]), alone, alone, mask) == \
        ("1 masks left", 0.75)
    assert peer_decode.status_of(torch.tensor([[1, 2], [4, 4]]), alone, alone, mask) == \
        ("1 of 2 rows differ from the row decoded alone", 0.75)
