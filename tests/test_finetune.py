"""Fine-tuning: SFT data, the SM paper's noise and loss, DoRA + SM runs on a tiny Dream checkpoint."""

import json
import os
import random
from pathlib import Path
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from dream_fixtures import random_dream, write_chat_base
from smdlm_cli.cli.app import app
from smdlm_cli.core import objectives, sft
from smdlm_cli.core.config import DataConfig, TrainConfig
from smdlm_cli.core.distributed import Dist, batch_layout
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import load_tensors
from smdlm_cli.core.models import load_model
from smdlm_cli.core.tokenizer import load_tokenizer
from smdlm_cli.recipe import load_recipe

runner = CliRunner()
ROWS = ([{"prompt": f"Write a function that returns {i}.", "response": f"def f():\n    return {i}\n"}
         for i in range(30)]
        + [{"messages": [{"role": "HUMAN", "content": f"Add {i} and 1."},
                         {"role": "ASSISTANT", "content": f"The sum is {i + 1}."}]} for i in range(30)])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_chat_base(tmp_path_factory.mktemp("base") / "dream")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    f = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


def test_examples_and_chat_tokenisation(base, data):
    tok = load_tokenizer(str(base))
    exs = list(sft.examples(DataConfig(source=str(data), valid_fraction=0.2), "train"))
    valid = list(sft.examples(DataConfig(source=str(data), valid_fraction=0.2), "valid"))
    assert len(exs) + len(valid) == 60 and 0 < len(valid) < 25
    prompt, response = sft.messages(ROWS[30], "x")
    assert prompt == [{"role": "user", "content": "Add 0 and 1."}] and response["role"] == "assistant"
    ids, n_prompt = sft.tokenize(tok, prompt, response)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert tok.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ids[n_prompt:]) == "The sum is 1.<|im_end|>\n"
    with pytest.raises(UserError, match="expected `messages` or `prompt` and `response`"):
        sft.messages({"text": "x"}, "row 3")


def test_collate_pads_to_multiples_of_8_and_never_marks_the_prompt():
    items = [([5] * 11, 4), ([6] * 3, 2)]
    for supervised in (True, False):
        b = sft.collate(items, 0, supervised, 10, random.Random(0))
        assert b.input_ids.shape[1] % 8 == 0 and b.input_ids.shape[1] >= 11
        assert not b.maskable[0, :4].any() and b.maskable[0, 4:11].all()
        assert not b.maskable[1, :2].any() and b.maskable[1, 2:3].all()
        assert (b.input_ids[1, 3:] == 0).all()  # EOS padding
        assert bool(b.maskable[1, 3:].all()) == supervised
        assert (b.attention_mask is None) == supervised


def test_sft_noise_and_loss_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    items = [(list(range(10, 40)), 12), (list(range(10, 20)), 9)]
    batch = sft.collate(items, 0, True, 0, random.Random(0))
    for t in (0.2, 0.5, 0.8):
        xt = objectives.sft_noised(batch, torch.tensor(t), 99, g)
        is_mask = xt == 99
        assert not (is_mask & ~batch.maskable).any()       # the prompt is never masked
        assert is_mask.any(-1).all()                        # every row has a mask
    big = sft.collate([(list(range(2000)), 10)], 0, True, 0, random.Random(0))
    share = (objectives.sft_noised(big, torch.tensor(0.3), 99, g) == 99).float()[0, 10:].mean()
    assert abs(share.item() - 0.3) < 0.05
    logits = torch.randn(2, batch.input_ids.shape[1], 100)
    xt = objectives.sft_noised(batch, torch.tensor(0.5), 99, g)
    loss, _ = objectives.sft_loss(logits, batch.input_ids, xt, torch.tensor(0.5), 99)
    sel = xt == 99
    direct = F.cross_entropy(logits[..., :99][sel], batch.input_ids[sel]) / 0.5
    torch.testing.assert_close(loss, direct)


def _recipe(base, data, steps=4, extra=()):
    return ["--set", f"model.init={base}", "--set", f"data.source={data}",
            "--set", "data.valid_fraction=0.2", "--set", f"train.steps={steps}",
            "--set", "train.batch_size=4", "--set", "train.eval_every=2", "--set", "train.save_every=2",
            "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--set", "finetune.max_length=160",
            "--set", "finetune.pad_jitter=4", *extra]


def finetune(out, base, data, *args):
    return runner.invoke(app, ["finetune", "recipes/tiny-dream.toml", "--out", str(out),
                               *_recipe(base, data), *args])


def test_finetune_run_trains_adapters_and_omega_only(tmp_path, base, data):
    result = finetune(tmp_path / "run", base, data, "--merge")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "softmask.json",
                 "transparency_config.json", "base.json", "tokenizer/tokenizer.json", "recipe.toml",
                 "metrics.jsonl", "state/latest", "config.json", "model.safetensors"):
        assert (run / name).exists(), name
    adapter = load_tensors(run / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0
    assert any("magnitude" in k for k in adapter)                                  # DoRA
    state = load_tensors(next((run / "state").glob("step-*")) / "weights.safetensors")
    assert all("lora" in k or "softmask" in k for k in state)  # the frozen base is never saved
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["r"] == 16
    assert json.loads((run / "transparency_config.json").read_text())["mixinputs_k"] == 1
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_nll" in x] == [0, 2, 4]
    # the base on disk is untouched; the run's adapted model differs from it
    x = torch.randint(0, 290, (1, 12))
    with torch.no_grad():
        plain = load_model(str(base))(input_ids=x)
        merged = load_model(str(run))(input_ids=x)                   # config.json: the --merge output
        (run / "config.json").unlink()
        adapted = load_model(str(run))(input_ids=x)                  # base.json + adapter/
    assert json.loads((run / "base.json").read_text())["path"] == str(base.resolve())
    assert not torch.allclose(plain, adapted)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_finetune_resume_equals_uninterrupted(tmp_path, base, data):
    # a constant schedule: stopping at step 2 must not change the learning rates before it
    flat = ["--set", "train.schedule=constant", "--set", "train.warmup=0"]
    assert finetune(tmp_path / "full", base, data, *flat).exit_code == 0
    short = runner.invoke(app, ["finetune", "recipes/tiny-dream.toml", "--out", str(tmp_path / "cut"),
                                *_recipe(base, data, steps=2), *flat])
    assert short.exit_code == 0, short.output
    resumed = runner.invoke(app, ["finetune", str(tmp_path / "cut" / "recipe.toml"), "--out",
                                  str(tmp_path / "cut"), "--resume", "--set", "train.steps=4"])
    assert resumed.exit_code == 0, resumed.output
    a = load_tensors(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("extra, message", [
    (["--set", "model.init="], "model.init is empty; expected the base model"),
    (["--set", "finetune.target_modules=[\"qq_proj\"]"], "finetune.target_modules: 'qq_proj' is not"),
    (["--set", "finetune.max_length=8"], "no train example fits finetune.max_length = 8"),
])
def test_finetune_bad_input_is_one_line(tmp_path, base, data, extra, message):
    result = finetune(tmp_path / "bad", base, data, *extra)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr
    assert not (tmp_path / "bad").exists()  # nothing trained, nothing left behind


def test_offline_dream_recipes_fail_fast(tmp_path):
    for name in ("dream-coder-sm", "dream-coder-binary", "dream-sm"):
        r = load_recipe(f"recipes/{name}.toml")
        assert r.finetune.method == "dora" and r.train.lr == 1e-5
        assert r.softmask.k == 1 or not r.softmask.enabled
        assert r.finetune.official_grad_scaling and r.finetune.validation == "official"
        result = runner.invoke(app, ["finetune", f"recipes/{name}.toml", "--out", str(tmp_path / name)])
        assert result.exit_code == 2 and "Dream-org/" in result.stderr, result.output
        assert not (tmp_path / name).exists()
    assert not load_recipe("recipes/dream-coder-binary.toml").softmask.enabled


def test_finetuned_run_samples_and_evaluates(tmp_path, base, data):
    assert finetune(tmp_path / "run", base, data).exit_code == 0
    out = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "--nfe", "4", "--length", "24",
                              "--num-samples", "2", "--sampler", "confidence", "--prompt", "Add 2 and 1.",
                              "-o", "block_length=8", "--option", "cache=dual", "-o", "threshold=0.9",
                              "--out", str(tmp_path / "s.jsonl")])
    assert out.exit_code == 0, out.output
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["tokens"][:5] == rows[1]["tokens"][:5]  # the prompt stays
    report = runner.invoke(app, ["evaluate", "humaneval", "--ckpt", str(tmp_path / "run"), "--format",
                                 "instruct", "--limit", "2", "--max-new-tokens", "16", "--nfe", "4",
                                 "--sampler", "confidence", "-o", "cache=prefix", "-o", "block_length=8",
                                 "--json", "--out", str(tmp_path / "he.json")])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["samples"] == 2
    chat = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "--nfe", "8", "--length", "64",
                               "--num-samples", "1", "--chat", "--prompt", "Add 2 and 1.",
                               "--out", str(tmp_path / "c.jsonl")])
    assert chat.exit_code == 0, chat.output
    row = json.loads((tmp_path / "c.jsonl").read_text())
    assert row["prompt"].endswith("<|im_start|>user\nAdd 2 and 1.<|im_end|>\n<|im_start|>assistant\n")
    # the run records the paper's Dream decoding, and evaluate uses it when no flag is given
    assert json.loads((tmp_path / "run" / "sampler.json").read_text()) == {
        "sampler": "confidence", "options": {"alg": "entropy", "temperature": 0.1, "top_p": 0.9},
        "nfe": "tokens"}
    report = runner.invoke(app, ["evaluate", "humaneval", "--ckpt", str(tmp_path / "run"), "--format",
                                 "instruct", "--limit", "1", "--max-new-tokens", "12", "--json",
                                 "--temperature", "0.2", "--out", str(tmp_path / "he2.json")])
    assert report.exit_code == 0, report.output
    generation = json.loads(report.stdout)["generation"]
    assert (generation["sampler"], generation["nfe"]) == ("confidence", 12)  # one step per token
    assert generation["sampler_options"] == {"alg": "entropy", "temperature": 0.2, "top_p": 0.9}  # flag wins
    (tmp_path / "run" / "sampler.json").write_text('{"sampler": "confidence", "options": {"alg": "x"}}')
    bad = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run")])
    assert bad.exit_code == 2 and "sampler.json: sampler confidence: alg = 'x'" in bad.stderr
    (tmp_path / "run" / "sampler.json").unlink()  # a Dream run without one: the same paper defaults
    bad = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "--sampler", "confidence",
                              "-o", "cache=disk"])
    assert bad.exit_code == 2 and "cache = 'disk', expected one of none, prefix, dual" in bad.stderr
    bad = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "run"), "-o", "threshold"])
    assert bad.exit_code == 2 and "--option threshold: expected KEY=VALUE" in bad.stderr


def test_resume_compares_the_finetune_table(tmp_path):
    """A changed adapter rank on --resume is a one-line error, not a RuntimeError deep in peft."""
    from smdlm_cli.commands.training import check_resume_recipe
    from smdlm_cli.recipe import dump_recipe, load_recipe

    recipe = load_recipe("recipes/tiny-dream.toml")
    (tmp_path / "recipe.toml").write_text(dump_recipe(recipe))
    check_resume_recipe(tmp_path, load_recipe("recipes/tiny-dream.toml", ["train.steps=999"]))
    for change in ("finetune.r=4", "finetune.pad_jitter=3"):
        with pytest.raises(UserError, match=f"--resume: {change.split('=')[0]} = "):
            check_resume_recipe(tmp_path, load_recipe("recipes/tiny-dream.toml", [change]))


def test_publish_never_leaves_the_run_without_an_adapter(tmp_path, monkeypatch):
    """Each file is renamed over the old one; a failure half-way keeps a complete adapter."""
    from smdlm_cli.commands import finetune

    class Adapter:
        def __init__(self, version):
            self.version = version

        def save_pretrained(self, path, safe_serialization=True):
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                (Path(path) / name).write_text(self.version)

    finetune.publish(Adapter("v1"), tmp_path)
    real = os.replace

    def fail_on_weights(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(finetune.os, "replace", fail_on_weights)
    with pytest.raises(OSError):
        finetune.publish(Adapter("v2"), tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "v1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter-")]


def test_source_segment_equals_the_standard_library_one():
    """The python-functions set splits each file once; its segments equal ast's."""
    import ast
    import io

    from smdlm_cli.core.data import stdlib_files

    checked = 0
    for path in stdlib_files()[:60:6]:  # 10 files; ast's own function is quadratic, hence few
        source = path.read_text(errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = io.StringIO(source, newline="").readlines()
        for node in tree.body:  # what the set takes (top-level), and one-line nodes among them
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.Expr)):
                assert sft.source_segment(lines, node) == ast.get_source_segment(source, node)
                checked += 1
    assert checked > 30
def test_official_grad_scaling_and_validation_share():
    """finetune.official_grad_scaling sums the micro-batch losses (the official Trainer's
    effective scaling); finetune.validation = official soft-masks a seeded p_sm share of the
    validation batches, the same ones in every validation."""
    model = random_dream(0)
    cfg = TrainConfig(batch_size=4, micro_batch_size=1)
    layout = batch_layout(cfg, 1)
    mean = objectives.build("sft", cfg, layout, Dist(), model)
    summed = objectives.build("sft", cfg, layout, Dist(), model, {"sum_micro_batches": True})
    assert mean.keep_mask  # a Dream model keeps its [MASK] column in the loss
    x0 = torch.randint(0, 90, (1, 16))
    xt = x0.masked_fill(torch.arange(16) % 3 == 0, model.mask_id)
    n = objectives.Noised(x0, xt, torch.tensor(0.5))
    logits = model(input_ids=xt)
    torch.testing.assert_close(summed.loss(logits, n), 4 * mean.loss(logits, n))

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sm = []

        def forward(self, xt, use_sm, attention_mask=None, **targets):
            self.sm.append(use_sm)  # the logits: validation scores them itself (no nll_of)
            return model(input_ids=xt, attention_mask=attention_mask)

    ids = torch.randint(0, 90, (1, 16))
    batches = [sft.SFTBatch(ids, torch.arange(16)[None] >= 4, None)] * 40
    share = objectives.build("sft", cfg, layout, Dist(), model, {"validation_sm_share": 0.5})
    runs = []
    for _ in range(2):
        counting = Counting()
        objectives.validate(counting, share, batches, True, 7, "fp32")
        runs.append(counting.sm)
    assert runs[0] == runs[1] and 10 <= sum(runs[0]) <= 30
    counting = Counting()
    objectives.validate(counting, mean, batches, True, 7, "fp32")
    assert all(counting.sm)  # the default: every batch soft-masked


def test_mix_and_dropped_token_ids(tmp_path, base, data):
    """finetune.mix adds datasets to data.source (cut to max_docs in all after a shuffle);
    finetune.drop_token_ids drops examples holding a listed id (the paper: tool-call tags)."""
    tok = load_tokenizer(str(base))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"Say hello {i}.", "response": "Hello there, friend."})
                             + "\n" for i in range(20)))
    cfg = DataConfig(source=str(data), valid_fraction=0.01)
    alone = sft.build(cfg, tok, 512, 1, "train")
    extra = sft.build(DataConfig(source=str(other), valid_fraction=0.01), tok, 512, 1, "train")
    mixed = sft.build(cfg, tok, 512, 1, "train", mix=[str(other)])
    assert sorted(mixed) == sorted(alone + extra) and mixed != alone + extra  # all, shuffled
    assert len(sft.build(replace(cfg, max_docs=7), tok, 512, 1, "train", mix=[str(other)])) == 7
    ids, n_prompt = extra[0]
    tag = ids[n_prompt]  # the first response token of every `other` example
    kept = sft.build(cfg, tok, 512, 1, "train", mix=[str(other)], drop_ids=[tag])
    assert all(tag not in row for row, _ in kept)
    assert len(kept) == len([r for r, _ in mixed if tag not in r]) <= len(alone)


def test_keep_best_keeps_the_lowest_validation_loss_as_a_run(tmp_path, base, data):
    from smdlm_cli.core import rundir

    result = finetune(tmp_path / "run", base, data, "--set", "finetune.keep_best=true",
                      "--set", "train.steps=6", "--set", "train.save_every=6")
    assert result.exit_code == 0, result.output
    run, best = tmp_path / "run", tmp_path / "run" / "best"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {x["step"]: x["val_loss"] for x in lines if "val_loss" in x and x["step"] > 0}
    best_step = min(losses, key=losses.get)
    omega = {x["step"]: x["scale"] for x in lines if "scale" in x}
    assert json.loads((best / "softmask.json").read_text())["scale"] == pytest.approx(omega[best_step])
    a = load_tensors(best / "adapter" / "adapter_model.safetensors")
    b = load_tensors(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) == (best_step == max(losses)), losses
    loaded = rundir.load(best)  # a run of its own: base.json, tokenizer/, sampler.json
    assert loaded.softmask is not None and loaded.decoding["sampler"] == "confidence"
