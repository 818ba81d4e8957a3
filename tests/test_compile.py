"""train.compile: compiled blocks train like eager ones, and a machine without a C compiler is
told so in one line.

torch.compile's default backend (inductor) writes and compiles C++ kernels: about a minute for
the tiny DiT on 2 busy cores, so that check is marked slow. The fast check runs the same path
(dynamo capture of every block's forward, AOT autograd, the trainer's wiring) with the
aot_eager backend, which stops short of code generation.
"""

import functools
import json
import shutil

import pytest
import torch

from test_trainer import corpus, setup
from smdlm_cli.core import compiling, trainer
from smdlm_cli.core.config import SoftMaskConfig
from smdlm_cli.core.data import BlockLoader
from smdlm_cli.core.distributed import Dist
from smdlm_cli.core.errors import UserError


def losses(run_dir, compile_: bool, sm: bool) -> list[float]:
    # no dropout: compiled code draws its random numbers differently from eager
    backbone, softmask, cfg = setup(sm, dropout=0.0, steps=3, batch_size=4, log_every=1,
                                    eval_every=100, save_every=100, compile=compile_)
    trainer.fit(backbone, softmask, cfg, SoftMaskConfig(prob=0.5), BlockLoader(corpus(), 4, 1),
                [corpus(4).long()], run_dir, Dist())
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [records[-1]["val_nll"]]


def check_same_losses(tmp_path, sm: bool) -> None:
    eager = losses(tmp_path / "eager", False, sm)
    compiled = losses(tmp_path / "compiled", True, sm)
    assert len(eager) == 4 and eager[0] != eager[1]
    # fp32 with other kernel fusions: equal up to summation order
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_compiled_blocks_train_like_eager_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    check_same_losses(tmp_path, sm=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile needs a C compiler (cc)")
def test_inductor_compiled_training_gives_the_eager_losses(tmp_path):
    check_same_losses(tmp_path, sm=False)


def test_compile_without_a_c_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="train.compile = true: no C compiler"):
        compiling.compile_blocks(setup(False)[0])


def test_compiled_decoding_samples_what_eager_decoding_samples(tmp_path, monkeypatch):
    """`sample --compile` (aot_eager here, as above) runs every block through its compiled
    forward and writes the samples eager decoding writes; a KV cache is refused in one line."""
    from typer.testing import CliRunner

    from runs import make_run
    from smdlm_cli.cli.app import app
    from smdlm_cli.core.softmask import SoftMask

    real, calls = torch.compile, []

    def counted(fn, **kwargs):
        compiled = real(fn, backend="aot_eager")

        def run(*args, **kw):
            calls.append(fn)
            return compiled(*args, **kw)
        return run
    monkeypatch.setattr(torch, "compile", counted)
    run_dir = make_run(tmp_path / "sm", SoftMask(k=3, scale=0.9, centre=-6.0, steepness=2.0))
    runner, rows = CliRunner(), {}
    for flags in ((), ("--compile",)):
        out = tmp_path / f"{len(flags)}.jsonl"
        result = runner.invoke(app, ["sample", "--ckpt", str(run_dir), "--out", str(out),
                                     "--nfe", "6", "--num-samples", "3", *flags])
        assert result.exit_code == 0, result.output
        rows[flags] = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(calls) == (0 if not flags else 2 * rows[flags][0]["nfe"])  # 2 blocks a forward
    assert [r["tokens"] for r in rows[()]] == [r["tokens"] for r in rows[("--compile",)]]
    result = runner.invoke(app, ["sample", "--ckpt", str(run_dir), "--out", str(tmp_path / "x.jsonl"),
                                 "--compile", "--sampler", "confidence", "-o", "cache=prefix"])
    assert result.exit_code == 2 and "--compile with cache = prefix" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x.jsonl").exists()
    # lm-eval decodes through its own model wrapper: it does not offer a flag it would ignore
    result = runner.invoke(app, ["evaluate", "lm-eval", "--tasks", "x", "--compile"])
    assert result.exit_code == 2 and "No such option: --compile" in result.output
