"""The training loop: it learns (binary and SM), resumes exactly, keeps budgets, and DDP agrees."""

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from smdlm_cli.core import checkpoint, objectives, trainer
from smdlm_cli.core.twopass import TwoPass
from smdlm_cli.core.distributed import Dist, batch_layout, distributed
from smdlm_cli.core.ema import EMA
from smdlm_cli.core.config import SoftMaskConfig, TrainConfig
from smdlm_cli.core.data import BlockLoader
from smdlm_cli.core.io import atomic_save_tensors, load_tensors
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.softmask import SoftMask

V, L = 40, 16
MASK = V - 1


def corpus(n=64, seed=0):
    """Learnable blocks: each row counts upwards mod 30 from a random start."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 30, (n, 1), generator=g)
    return ((start + torch.arange(L)) % 30).to(torch.int32)


def setup(sm: bool, seed=0, dropout=0.1, **train):
    torch.manual_seed(seed)
    backbone = build_dit("tiny", V, MASK, L, hidden_dim=32, n_blocks=2, n_heads=2, cond_dim=16,
                         dropout=dropout)
    softmask = SoftMask(k=2, scale=0.05) if sm else None
    cfg = TrainConfig(**{"steps": 30, "batch_size": 8, "lr": 1e-2, "warmup": 5, "eval_every": 10,
                         "save_every": 10, "log_every": 5, "eval_batches": 2, "ema": 0.9, **train})
    return backbone, softmask, cfg


def run(tmp: Path, sm: bool, resume=False, **train):
    backbone, softmask, cfg = setup(sm, **train)
    data = corpus()
    loader = BlockLoader(data, batch_layout(cfg, 1).micro, cfg.seed)
    valid = [corpus(8, seed=1).long(), corpus(8, seed=2).long()]
    return trainer.fit(backbone, softmask, cfg, SoftMaskConfig(prob=0.8), loader, valid, tmp,
                       Dist(), resume=resume)


@pytest.mark.parametrize("sm", [False, True])
def test_training_lowers_the_validation_elbo(tmp_path, sm):
    result = run(tmp_path, sm, steps=80)
    assert result.last_val["val_nll"] < result.first_val["val_nll"] - 1.0
    assert (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "softmask.json").exists() == sm
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "val_nll" in lines[0]
    assert max(x["step"] for x in lines) == 80


def test_sm_steps_count_two_forwards_and_train_omega(tmp_path):
    result = run(tmp_path, True, steps=20, save_every=100)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sm_steps = [x for x in lines if "loss" in x]
    assert any(x["sm"] for x in sm_steps)
    assert 20 < result.forwards <= 40  # 1 forward per binary step, 2 per SM step
    saved = checkpoint.load_softmask(tmp_path)
    assert saved.scale.item() != pytest.approx(0.05, rel=1e-6)  # omega moved


def test_forward_budget_stops_early(tmp_path):
    result = run(tmp_path, True, steps=100, max_forward_passes=15, log_every=10)
    assert 15 <= result.forwards <= 16 and result.step < 15
    # the last step is logged off the log_every grid: a summary reads the run's true counts
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in logs if "loss" in x][-1]
    assert last["step"] == result.step and last["forwards"] == result.forwards


def test_resume_equals_uninterrupted(tmp_path):
    full = run(tmp_path / "full", True, steps=20)
    run(tmp_path / "part", True, steps=10)
    # A crash after step 10's save would leave these behind; resume must not be fooled by them.
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 1.0}\n{"step": 14, "lo')
    resumed = run(tmp_path / "part", True, resume=True, steps=20)
    assert resumed.step == full.step == 20
    a = load_tensors(tmp_path / "full" / "model.safetensors")
    b = load_tensors(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "full" / "softmask.json").read_text()) == \
        json.loads((tmp_path / "part" / "softmask.json").read_text())
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert 14 not in steps or steps.count(15) == 1
    assert steps == [json.loads(x)["step"] for x in
                     (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_matches_a_full_batch(tmp_path):
    """Micro-batches of 4 with accumulation 2 take the same step as one batch of 8 (no dropout)."""
    outs = []
    for micro in (0, 4):
        backbone, _, cfg = setup(False, steps=1, micro_batch_size=micro, dropout=0.0, ema=0.0,
                                 warmup=0, eval_every=100)
        torch.manual_seed(0)
        for p in backbone.parameters():  # non-zero everywhere, so every weight's update shows
            torch.nn.init.normal_(p, std=0.05)
        m = batch_layout(cfg, 1).micro
        trainer.fit(backbone, None, cfg, SoftMaskConfig(), BlockLoader(corpus(), m, 0),
                    [corpus(8).long()], tmp_path / f"m{micro}", Dist())
        outs.append({k: v.clone() for k, v in backbone.state_dict().items()})
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-6)


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup=10, schedule="cosine")
    assert trainer.lr_factor(0, cfg) == pytest.approx(0.1)
    assert trainer.lr_factor(9, cfg) == pytest.approx(1.0)
    assert trainer.lr_factor(60, cfg) == pytest.approx(0.5)
    assert trainer.lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert trainer.lr_factor(500, TrainConfig(warmup=10)) == 1.0


def test_ema_follows_the_mdlm_formula():
    p = {"w": torch.zeros(3)}
    ema = EMA(p, decay=0.9999)
    for n in range(3):
        before = ema.shadow["w"].clone()
        p["w"] = torch.full((3,), float(n + 1))
        ema.update(p)
        d = min(0.9999, (1 + n) / (10 + n))
        torch.testing.assert_close(ema.shadow["w"], d * before + (1 - d) * p["w"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with distributed("cpu") as ctx:
        assert (ctx.rank, ctx.world) == (rank, world)
        backbone, softmask, cfg = setup(True, steps=6, batch_size=4, eval_every=3, save_every=3)
        loader = BlockLoader(corpus(), 2, cfg.seed, ctx.rank, ctx.world)
        trainer.fit(backbone, softmask, cfg, SoftMaskConfig(prob=0.5), loader,
                    [corpus(4).long()], Path(out) / "run", ctx)
    assert not torch.distributed.is_initialized()  # the group it set up is taken down
    atomic_save_tensors(Path(out) / f"rank{rank}.safetensors",
                        {**{f"b.{k}": v for k, v in backbone.state_dict().items()},
                         **{f"s.{k}": v for k, v in softmask.state_dict().items()}})


def test_distributed_leaves_a_group_it_did_not_create(tmp_path):
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with distributed("cpu") as ctx:
            assert (ctx.rank, ctx.world) == (0, 1)
        assert torch.distributed.is_initialized()
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_gloo_ranks_end_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = load_tensors(tmp_path / "rank0.safetensors")
    b = load_tensors(tmp_path / "rank1.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    before = setup(True)[0].state_dict()
    assert not torch.equal(a["b.blocks.0.attn_qkv.weight"], before["blocks.0.attn_qkv.weight"])
    # validation does not depend on the number of ranks: step 0 equals a single process's
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    backbone, softmask, cfg = setup(True, steps=6, batch_size=4, eval_every=3, save_every=3)
    ctx = Dist()
    objective = objectives.build("elbo", cfg, batch_layout(cfg, 1), ctx, backbone)
    alone = objectives.validate(TwoPass(backbone, softmask), objective, [corpus(4).long()], True,
                                cfg.seed, cfg.precision)
    assert records[0]["step"] == 0
    assert records[0]["val_nll"] == pytest.approx(alone["val_nll"], rel=1e-6)
    assert math.isfinite(json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
                         ["val_nll"])


def test_validation_restores_train_mode_when_it_fails():
    backbone, softmask, cfg = setup(False)
    model = TwoPass(backbone, None).train()
    objective = objectives.build("elbo", cfg, batch_layout(cfg, 1), Dist(), backbone)
    with pytest.raises(IndexError):  # ids beyond the vocabulary fail inside the forward
        objectives.validate(model, objective, [torch.full((2, L), V + 5)], False, 0, "fp32")
    assert model.training and backbone.training


def test_the_run_records_its_sm_steps_and_batch_layout(tmp_path):
    """Counted by the trainer, not re-derived by a report: with micro-batches the forwards of a
    step are 2·accum (SM) or accum (binary), and sm_steps counts the SM steps themselves."""
    run(tmp_path, True, steps=12, log_every=1, micro_batch_size=4)
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]
    sm = sum(r["sm"] for r in logs)
    assert 0 < sm < 12 and [r["sm_steps"] for r in logs][-1] == sm
    assert logs[-1]["forwards"] == 2 * (12 + sm)  # accum = 2
    state = checkpoint.load_state(checkpoint.latest_state(tmp_path))["trainer"]
    assert state["sm_steps"] == sm
    assert state["layout"] == {"world": 1, "per_rank": 8, "micro": 4, "accum": 2}


def test_cpu_threads_leave_the_cores_other_work_uses(monkeypatch):
    from smdlm_cli.core.distributed import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cpu_threads(0) == (4, None) and cpu_threads(0, world=2) == (2, None)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.1, 0.0, 0.0))
    threads, note = cpu_threads(0)
    assert threads == 1 and "busy (load 3.1 on 4 cores)" in note and "train.threads" in note
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert cpu_threads(0, world=2)[0] == 1
    assert cpu_threads(3) == (3, None)  # a setting wins
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(0) == (0, None)  # the environment's choice is left alone
