"""Our Dream adapter against transformers' Qwen2 made bidirectional: same outputs, speed, memory.

    python benchmarks/dream_vs_hf.py [--layers 4] [--hidden 512] [--vocab 32768] [--batch 2]
                                     [--length 512] [--repeats 5]

Both get the same random weights. Bidirectional Qwen2 = transformers' Qwen2ForCausalLM given a
4-D all-True attention mask (then it adds no causal mask) and its logits shifted by one, as
Dream's consumers do. Reports the largest logit difference, the median forward time of each
(alternating, so machine noise hits both alike), and the peak resident memory of three forwards in
a fresh process that built only that model (Linux VmHWM, reset after building: what the forward
itself adds, through the CPU allocator as a user sees it).
Ends with `ours/hf forward time ratio: X` and `ours/hf peak memory ratio: Y`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from smdlm_cli.core.models.dream import Dream, DreamConfig


def models(args, which=("ours", "hf")):
    """{name: model} with the same random weights (HF's copied from ours when both are built)."""
    torch.manual_seed(0)
    c = DreamConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                    num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                    num_key_value_heads=max(1, args.hidden // 256), mask_token_id=args.vocab - 1)
    out = {}
    if "ours" in which:
        out["ours"] = Dream(c).eval()
        for p in out["ours"].parameters():
            torch.nn.init.normal_(p, std=0.02)
    if "hf" in which:
        out["hf"] = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
            attn_implementation="sdpa")).eval()
        if "ours" in out:
            out["hf"].load_state_dict(out["ours"].state_dict(), strict=True)
    return out


def forwards(args):
    x = torch.randint(0, args.vocab - 1, (args.batch, args.length),
                      generator=torch.Generator().manual_seed(0))
    full = torch.ones(args.batch, 1, args.length, args.length, dtype=torch.bool)

    def ours_fwd(model):
        return model(input_ids=x)

    def hf_fwd(model):
        logits = model(input_ids=x, attention_mask=full).logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return ours_fwd, hf_fwd


def child(args) -> None:
    """One implementation alone in this process: build, run three forwards, print peak RSS (MB)."""
    model = models(args, (args.child,))[args.child]
    fwd = forwards(args)[0 if args.child == "ours" else 1]
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_mb("VmHWM")
    with torch.no_grad():
        for _ in range(3):
            fwd(model)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_mb": peak, "forward_mb": peak - before}))


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"/proc/self/status has no {key} (this measurement needs Linux)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=("ours", "hf"))
    args = ap.parse_args()
    if args.child:
        return child(args)
    built = models(args)
    ours, hf = built["ours"], built["hf"]
    ours_fwd, hf_fwd = forwards(args)
    with torch.no_grad():
        diff = (ours_fwd(ours) - hf_fwd(hf)).abs().max().item()
        times = {"ours": [], "hf": []}
        for _ in range(args.repeats):
            for name, fwd, model in (("ours", ours_fwd, ours), ("hf", hf_fwd, hf)):
                start = time.perf_counter()
                fwd(model)
                times[name].append(time.perf_counter() - start)
    base = [sys.executable, __file__] + [f"--{k}={v}" for k, v in
                                        (("layers", args.layers), ("hidden", args.hidden),
                                         ("vocab", args.vocab), ("batch", args.batch),
                                         ("length", args.length))]
    mem = {name: json.loads(subprocess.run(base + ["--child", name], capture_output=True,
                                           text=True, check=True).stdout)
           for name in ("ours", "hf")}
    n = sum(p.numel() for p in ours.parameters())
    print(f"{n / 1e6:.0f}M parameters, batch {args.batch} x {args.length}, fp32 on the CPU, "
          f"median of {args.repeats}; max |logit difference| {diff:.2e}")
    for name in ("ours", "hf"):
        print(f"{name:<5} forward {statistics.median(times[name]) * 1e3:8.1f} ms   peak RSS "
              f"{mem[name]['peak_mb']:8.0f} MB (forwards add {mem[name]['forward_mb']:.0f} MB)")
    print(f"ours/hf forward time ratio: "
          f"{statistics.median(times['ours']) / statistics.median(times['hf']):.3f}")
    print(f"ours/hf peak memory ratio: {mem['ours']['peak_mb'] / mem['hf']['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
