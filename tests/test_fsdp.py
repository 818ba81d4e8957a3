"""train.strategy = "fsdp" on 2 CPU processes (gloo): the same weights as DDP, exact resume after a
SIGKILL from the per-rank shards, and a DoRA fine-tune.

FSDP and DDP differ only in how gradients are reduced (reduce-scatter of shards against an
all-reduce of whole tensors) and in the order of the sums of the gradient norm, so their weights
agree to float rounding, not bit for bit: 2e-5 absolute after 6 AdamW steps at lr 1e-2 (about
1.6e-6 is seen). An FSDP run resumed from its own shards repeats the same operations, so it
equals the uninterrupted FSDP run exactly.
"""

import functools
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dream_fixtures import write_chat_base
from test_trainer import _free_port, corpus, run as train_alone, setup
from smdlm_cli.core import trainer
from smdlm_cli.core.config import SoftMaskConfig
from smdlm_cli.core.data import BlockLoader
from smdlm_cli.core.distributed import distributed
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import load_tensors
from smdlm_cli.recipe import load_recipe

ROOT = Path(__file__).parents[1]

ROWS = [{"prompt": f"Write a function that returns {i}.", "response": f"def f():\n    return {i}\n"}
        for i in range(30)]  # the SFT set of the fine-tunes
# name -> (soft-masked?, train settings)
RUNS = {
    "ddp-sm": (True, {"strategy": "ddp"}),
    "fsdp-sm": (True, {"strategy": "fsdp"}),
    "ddp-binary": (False, {"strategy": "ddp", "micro_batch_size": 1}),
    "fsdp-binary": (False, {"strategy": "fsdp", "micro_batch_size": 1}),
    "fsdp-offload": (True, {"strategy": "fsdp", "fsdp_offload": True, "grad_checkpointing": True}),
    "fsdp-compiled": (True, {"strategy": "fsdp", "compile": True}),  # aot_eager: no C++ builds
}
KILL_AT = 5  # rank 0 kills itself at its step-5 log line: the state of step 3 is the last saved


def _train(name: str, out: Path, ctx, resume=False, on_step=None, sm_prob=0.5) -> None:
    """One run of RUNS into out/name: 6 steps of 4 sequences, evaluated and saved at 3 and 6."""
    sm, train = RUNS[name]
    backbone, softmask, cfg = setup(sm, steps=6, batch_size=4, eval_every=3, save_every=3, **train)
    loader = BlockLoader(corpus(), cfg.micro_batch_size or 2, cfg.seed, ctx.rank, ctx.world)
    # the second validation batch has one row: rank 1 has none of it (under FSDP it must still
    # take part in the forward)
    valid = [corpus(4).long(), corpus(1, seed=3).long()]
    compile_ = torch.compile
    if cfg.compile:
        torch.compile = functools.partial(compile_, backend="aot_eager")
    try:
        trainer.fit(backbone, softmask, cfg, SoftMaskConfig(prob=sm_prob), loader, valid,
                    out / name, ctx, resume=resume, on_step=on_step)
    finally:
        torch.compile = compile_


def _finetune(name: str, out: Path) -> None:
    """recipes/tiny-dream.toml's DoRA + SM fine-tune of the tiny Dream fixture, --merge, under the
    strategy the name ends with."""
    from smdlm_cli.commands import finetune

    base, data = out / "base" / "dream", out / "sft.jsonl"
    overrides = [f"model.init={base}", f"data.source={data}", "data.valid_fraction=0.2",
                 "train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
                 "train.eval_batches=1", "finetune.max_length=160", "finetune.pad_jitter=4",
                 f"train.strategy={name.split('-')[1]}"]
    recipe = ROOT / "recipes" / "tiny-dream.toml"
    finetune.run(load_recipe(recipe, overrides), recipe, out / name, resume=False, merge=True)


def _worker(rank: int, port: int, jobs: list[tuple[str, str, bool]], kill_at: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def kill(record: dict) -> None:
        if record["step"] == kill_at and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)

    with distributed("cpu") as ctx:
        for name, out, resume in jobs:
            if name.startswith("finetune-"):
                _finetune(name, Path(out))
            else:
                _train(name, Path(out), ctx, resume=resume, on_step=kill if kill_at else None)


def spawn(jobs: list[tuple[str, Path, bool]], kill_at: int = 0) -> None:
    """Run the (run name, directory, resume?) jobs one after the other in one pair of processes
    (their start-up is most of the time)."""
    jobs = [(name, str(out), resume) for name, out, resume in jobs]
    procs = mp.spawn(_worker, args=(_free_port(), jobs, kill_at), nprocs=2, join=False)
    # once a rank dies, the other (waiting in a collective, deaf to SIGTERM) is killed after 1 s,
    # not spawn's default 30
    while not procs.join(grace_period=1):
        pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of RUNS, and an FSDP run killed at step 5 then resumed (in "killed/")."""
    out = tmp_path_factory.mktemp("fsdp")
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        spawn([("fsdp-sm", out / "killed", False)], kill_at=KILL_AT)
    (out / "killed" / "latest-at-kill").write_text((out / "killed" / "fsdp-sm" / "state" /
                                                     "latest").read_text())
    write_chat_base(out / "base" / "dream")
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    spawn([(name, out, False) for name in RUNS if name != "fsdp-compiled"]
          + [("fsdp-sm", out / "killed", True)]
          + [(name, out, False) for name in ("finetune-ddp", "finetune-fsdp")])
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "model.safetensors")


@pytest.mark.parametrize("kind", ["sm", "binary"])
def test_fsdp_ends_with_the_weights_of_ddp(runs, kind):
    ddp, fsdp = runs / f"ddp-{kind}", runs / f"fsdp-{kind}"
    a, b = weights(ddp), weights(fsdp)
    assert a.keys() == b.keys()
    before = setup(kind == "sm")[0].state_dict()
    for k in a:
        assert a[k].shape == b[k].shape  # the published model is whole, not a shard
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
    assert not torch.allclose(a["backbone.blocks.0.attn_qkv.weight"], before["blocks.0.attn_qkv.weight"])
    logs = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ddp, fsdp)]
    assert [x["step"] for x in logs[0]] == [x["step"] for x in logs[1]]
    for x, y in zip(*logs):
        for key in ("loss", "val_nll", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    if kind == "sm":  # the omega scalars, replicated under FSDP, trained alike
        sa, sb = (json.loads((r / "softmask.json").read_text()) for r in (ddp, fsdp))
        assert sb["raw"] == pytest.approx(sa["raw"], rel=1e-6)
        assert sa["raw"]["raw_scale"] != pytest.approx(setup(True)[1].to_dict()["raw"]["raw_scale"],
                                                      rel=1e-7)
    state = runs / f"fsdp-{kind}" / "state" / "step-0000006"
    names = sorted(p.name for p in state.iterdir())
    assert names == ["ema.rank0.safetensors", "ema.rank1.safetensors", "optimizer.json",
                     "optimizer.rank0.safetensors", "optimizer.rank1.safetensors", "trainer.json",
                     "weights.rank0.safetensors", "weights.rank1.safetensors"]
    shards = [load_tensors(state / f"weights.rank{r}.safetensors") for r in (0, 1)]
    key = "backbone.blocks.0.attn_qkv.weight"  # each rank stores half of the rows
    assert shards[0][key].shape[0] + shards[1][key].shape[0] == a[key].shape[0]


def test_fsdp_offload_and_checkpointing_train_the_same_weights(runs):
    a, b = weights(runs / "fsdp-sm"), weights(runs / "fsdp-offload")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)


@pytest.mark.slow  # dynamo traces the blocks in both processes: 25 s on 2 busy cores
def test_fsdp_with_compiled_blocks_trains_the_same_weights(runs, tmp_path):
    spawn([("fsdp-compiled", tmp_path, False)])
    a, b = weights(runs / "fsdp-sm"), weights(tmp_path / "fsdp-compiled")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)


def test_fsdp_resumes_exactly_after_a_sigkill(runs):
    run = runs / "killed" / "fsdp-sm"
    assert (runs / "killed" / "latest-at-kill").read_text().strip() == "step-0000003"
    a, b = weights(runs / "fsdp-sm"), weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((run / "softmask.json").read_text()) == \
        json.loads((runs / "fsdp-sm" / "softmask.json").read_text())
    ema = [load_tensors(r / "state" / "step-0000006" / "ema.rank1.safetensors")
           for r in (runs / "fsdp-sm", run)]
    for k in ema[0]:
        assert torch.equal(ema[0][k], ema[1][k]), k
    drop = ("tokens_per_s",)
    logs = [[{k: v for k, v in json.loads(x).items() if k not in drop}
             for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (runs / "fsdp-sm", run)]
    assert logs[0] == logs[1]


def test_dora_finetune_under_fsdp_equals_ddp(runs):
    ddp, fsdp = runs / "finetune-ddp", runs / "finetune-fsdp"
    state = sorted(p.name for p in (fsdp / "state" / "step-0000002").iterdir())
    assert "weights.rank1.safetensors" in state and "weights.safetensors" not in state
    shard = load_tensors(fsdp / "state" / "step-0000002" / "weights.rank0.safetensors")
    assert shard and all("lora" in k or "softmask" in k for k in shard)  # never the frozen base
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):  # --merge's output too
        a, b = load_tensors(ddp / name), load_tensors(fsdp / name)
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
    adapter = load_tensors(fsdp / "adapter" / "adapter_model.safetensors")
    assert any("magnitude" in k for k in adapter)                                   # DoRA
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())     # it trained
    assert json.loads((fsdp / "softmask.json").read_text()) == \
        json.loads((ddp / "softmask.json").read_text())


def test_a_sharded_state_resumes_only_as_it_was_saved(runs, tmp_path):
    shutil.copytree(runs / "fsdp-sm", tmp_path / "run")
    with pytest.raises(UserError, match="was saved as 2 FSDP shards; resume it with the strategy "
                                        "and number of processes it was saved with"):
        train_alone(tmp_path / "run", True, resume=True, steps=8)
