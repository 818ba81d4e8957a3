"""Everything GPU-side in one command: training speed and MFU, Dream decoding, SM overheads, FSDP.

    python benchmarks/gpu_check.py [--json gpu_check.json]        # one H100/H200: about 3 minutes
    python benchmarks/gpu_check.py --cpu --tiny [--json FILE]     # the same code paths, tiny shapes

Prints one table and writes it as JSON (default gpu_check.json):
- train: the 169M DiT (MDLM's small preset, length 1024, V 50,258, bf16 autocast, SDPA restricted
  to the flash kernel on CUDA): tokens/s and MFU of a whole optimizer step, binary and SM, their
  ratio, and the peak memory of each. MFU counts 6N + 12·layers·L·d FLOPs per token for a binary
  step and adds a forward (2N + 4·layers·L·d) for SM's pass 1; N = the matmul parameters (the
  embedding table is a lookup). The peak is the datasheet's dense bf16 figure for known GPUs,
  else the best fp32 matmul rate measured here (so CPU figures are relative to this machine);
- dream: Dream-7B shapes (V 152,064, D 3,584, 4 of its 28 layers, random weights, bf16): the SM
  feedback's cost per decoding step as a share of a binary step (goal <= 3%), and confidence
  decoding tokens/s for {no cache, prefix, dual} x {threshold off, 0.9}, binary and SM;
- mdlm: the mdlm sampler's SM/binary time per step at V = 50,258 (small DiT, length 1024), batch
  1 and 8 (goal <= 1.03);
- fsdp: a 2-step `smdlm pretrain` under torchrun with train.strategy = fsdp when more than one GPU
  is visible (with --cpu: 2 gloo processes); skipped when this smdlm has no train.strategy.
A part that fails is reported with its error and the others still run (exit code 1 then).
The timing helpers are those of train_step.py, sample_speed.py and dream_decode.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import dream_decode  # noqa: E402
import sample_speed  # noqa: E402
import train_step  # noqa: E402

from smdlm_cli.core import diffusion  # noqa: E402
from smdlm_cli.core.config import TrainConfig  # noqa: E402
from smdlm_cli.core.models.dit import build_dit  # noqa: E402
from smdlm_cli.core.softmask import SoftMask  # noqa: E402
from smdlm_cli.core.twopass import TwoPass  # noqa: E402

ROOT = Path(__file__).parents[1]
GPT2_VOCAB = 50258  # GPT-2's 50,257 + MDLM's mask token
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12,
                  "A10": 125e12, "L4": 121e12}
# (shapes, steps) of each part: the real ones, and --tiny ones that run in seconds on a CPU
FULL = {"train": dict(preset="small", length=1024, vocab=GPT2_VOCAB, batch=16, iters=8),
        "dream": dict(shape=dict(num_hidden_layers=4), prompt=64, gen=256, block=32, repeats=2),
        "mdlm": dict(preset="small", length=1024, vocab=GPT2_VOCAB, batches=(1, 8), steps=32,
                     repeats=3)}
TINY = {"train": dict(preset="tiny", length=64, vocab=512, batch=4, iters=3, hidden=64, blocks=2,
                      heads=2),
        "dream": dict(shape=dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2), prompt=8, gen=16, block=8, repeats=1),
        "mdlm": dict(preset="tiny", length=32, vocab=512, batches=(1, 4), steps=8, repeats=2,
                     hidden=64, blocks=2, heads=2)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flash_only(device: torch.device, flash: bool):
    """SDPA restricted to the flash kernel on CUDA (it then fails loudly instead of falling back)."""
    if device.type != "cuda" or not flash:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from): a datasheet for known GPUs, else measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in DATASHEET_BF16.items():
            if key in name:
                return flops, f"{name} datasheet bf16 dense"
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best, f"measured fp32 {n}x{n} matmul on {device.type}"


def memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_peak_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory since the reset; on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def train_part(s: dict, device: torch.device, flash: bool) -> dict:
    torch.manual_seed(0)
    mask_id = s["vocab"] - 1
    backbone = build_dit(s["preset"], s["vocab"], mask_id, s["length"], dropout=0.1,
                         hidden_dim=s.get("hidden", 0), n_blocks=s.get("blocks", 0),
                         n_heads=s.get("heads", 0))
    model = TwoPass(backbone, SoftMask(k=3, scale=0.5)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, mask_id, (s["batch"], s["length"]), device=device)
    t = diffusion.sample_t(s["batch"], device=device)
    xt = diffusion.q_xt(x0, t, mask_id)
    peaks = {}
    with flash_only(device, flash):
        for mode in ("binary", "sm"):  # peak memory of each kind of step, measured apart
            memory_reset(device)
            train_step.make_step(model, opt, x0, xt, t)(mode == "sm")
            peaks[mode] = memory_peak_gb(device)
        binary, sm = train_step.time_steps(model, opt, x0, xt, t, s["iters"])
    b, m = statistics.median(binary), statistics.median(sm)
    c = backbone.config
    n = sum(p.numel() for p in backbone.parameters()) - backbone.embedding_weight().numel()
    attn = c.n_blocks * s["length"] * c.hidden_dim
    per_token = {"binary": 6 * n + 12 * attn, "sm": 6 * n + 12 * attn + 2 * n + 4 * attn}
    tokens = s["batch"] * s["length"]
    peak, source = peak_flops(device)
    out = {"params_M": sum(p.numel() for p in backbone.parameters()) / 1e6,
           "batch": s["batch"], "length": s["length"], "vocab": s["vocab"], "peak_source": source}
    for mode, wall in (("binary", b), ("sm", m)):
        out[f"{mode}_tokens_per_s"] = tokens / wall
        out[f"{mode}_mfu"] = tokens / wall * per_token[mode] / peak
        out[f"{mode}_peak_memory_gb"] = peaks[mode]
    out["sm_binary_step_ratio"] = m / b
    return out


def dream_part(s: dict, device: torch.device, flash: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = dream_decode.build("7b", 60.0, device, dtype, **s["shape"])
    softmask = SoftMask(k=1, scale=0.5, centre=-4.0, steepness=2.0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, model.vocab_size - 1, (1, s["prompt"]), generator=g),
                   torch.full((1, s["gen"]), model.mask_id)], dim=1).to(device)
    # `flash` is ignored: the cached windows attend through a mask, which flash lacks
    results = dream_decode.time_settings(model, x, softmask, s["gen"], s["block"], 0.9,
                                         s["repeats"])
    out = {"sdpa": "default (masked cache windows)", "vocab": model.vocab_size,
           "hidden": model.config.hidden_size,
           "layers": model.config.num_hidden_layers, "prompt": s["prompt"], "gen": s["gen"],
           "sm_feedback_share": dream_decode.step_ratio(results) - 1.0}
    for r in results:
        key = f"{r['cache']}_thr{'off' if r['threshold'] is None else r['threshold']}_{r['mode']}"
        out[f"{key}_tokens_per_s"] = s["gen"] / r["wall"]
        out[f"{key}_nfe"] = r["nfe"]
    return out


def mdlm_part(s: dict, device: torch.device, flash: bool) -> dict:
    torch.manual_seed(0)
    model = build_dit(s["preset"], s["vocab"], s["vocab"] - 1, s["length"], dropout=0.0,
                      hidden_dim=s.get("hidden", 0), n_blocks=s.get("blocks", 0),
                      n_heads=s.get("heads", 0)).to(device).eval()
    softmask = SoftMask(k=3, scale=0.5, centre=-4.0, steepness=2.0).to(device)
    out = {"vocab": s["vocab"], "length": s["length"], "steps": s["steps"]}
    with flash_only(device, flash), torch.autocast(device.type, torch.bfloat16) \
            if device.type == "cuda" else nullcontext():
        for batch in s["batches"]:
            x = torch.full((batch, s["length"]), model.mask_id, dtype=torch.long, device=device)
            times, nfe = sample_speed.time_decodes(model, x, "mdlm", s["steps"], softmask,
                                                   s["repeats"])
            if nfe["binary"] != nfe["sm"]:
                raise RuntimeError(f"NFE differs: binary {nfe['binary']}, SM {nfe['sm']}")
            b, m = statistics.median(times["binary"]), statistics.median(times["sm"])
            out[f"batch{batch}_sm_binary_step_ratio"] = m / b
            out[f"batch{batch}_binary_tokens_per_s"] = batch * s["length"] / b
    return out


def fsdp_part(cpu: bool) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if "strategy" not in names:
        return {"status": "skipped: this smdlm has no train.strategy"}
    gpus = 0 if cpu else torch.cuda.device_count()
    if not cpu and gpus < 2:
        return {"status": f"skipped: {gpus} GPU(s) visible, FSDP needs 2"}
    procs = 2 if cpu else gpus
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["train.strategy=fsdp", "train.steps=2", "train.batch_size=4", "train.warmup=1",
                "train.eval_every=2", "train.eval_batches=1", "train.save_every=2",
                "data.max_docs=30", "data.vocab_size=400", "model.length=48",
                f"train.device={'cpu' if cpu else 'auto'}"]
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}", "-m", "smdlm_cli", "pretrain",
                str(ROOT / "recipes" / "quickstart.toml"), "--out", str(Path(tmp) / "run"),
                *[a for kv in sets for a in ("--set", kv)]]
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall = time.perf_counter() - start
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"torchrun exit {result.returncode}: {tail}")
        records = [json.loads(line) for line in
                   (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "loss" in r][-1]
    return {"status": "ok", "processes": procs, "steps": last["step"], "loss": last["loss"],
            "wall_s": wall}


PARTS = {"train": train_part, "dream": dream_part, "mdlm": mdlm_part}


def measure(part, shapes: dict, device: torch.device) -> dict:
    """A part with SDPA's flash kernel on CUDA; if this GPU or build has no flash kernel for it,
    the part is measured again with SDPA's own choice, and `sdpa` says so."""
    if device.type != "cuda":
        return {"sdpa": "default (CPU)", **part(shapes, device, flash=False)}
    try:
        return {"sdpa": "flash", **part(shapes, device, flash=True)}
    except RuntimeError as e:
        if "kernel" not in str(e):
            raise
        note = f"default: flash unavailable ({e})".splitlines()[0][:120]
        return {"sdpa": note, **part(shapes, device, flash=False)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is visible")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: the code paths in seconds")
    ap.add_argument("--parts", default="train,dream,mdlm,fsdp")
    ap.add_argument("--json", default="gpu_check.json", help="where the table goes as JSON")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    shapes = TINY if args.tiny else FULL
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__,
              "tiny": args.tiny, "parts": {}}
    torch.backends.cuda.matmul.allow_tf32 = True
    start = time.perf_counter()
    failed = False
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            result = (fsdp_part(device.type == "cpu") if part == "fsdp" else
                      measure(PARTS[part], shapes[part], device))
        except Exception as e:  # one broken part must not cost the other measurements
            failed = True
            result = {"status": f"error: {type(e).__name__}: {e}".splitlines()[0],
                      "traceback": traceback.format_exc(limit=4)}
        result["seconds"] = time.perf_counter() - t0
        report["parts"][part] = result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - start
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(table(report))
    print(f"written to {args.json}")
    return 1 if failed else 0


def table(report: dict) -> str:
    lines = [f"gpu_check on {report['device']} ({report['gpus_visible']} GPU(s) visible, torch "
             f"{report['torch']}{', tiny shapes' if report['tiny'] else ''}): "
             f"{report['seconds']:.0f} s", f"{'part':<6} {'measure':<40} {'value':>14}"]
    for part, values in report["parts"].items():
        for key, value in values.items():
            if key == "traceback":
                continue
            shown = (f"{value:,.4g}" if isinstance(value, float) else str(value))
            lines.append(f"{part:<6} {key:<40} {shown:>14}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
