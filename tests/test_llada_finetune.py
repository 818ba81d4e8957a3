"""`smdlm finetune` on LLaDA: DoRA + two-pass SM on a tiny LLaDA checkpoint, then sample and
evaluate the run through the same commands as Dream; the 8B recipe stops at once offline."""

import json

import pytest
import torch
from typer.testing import CliRunner

from llada_fixtures import write_chat_base
from smdlm_cli.cli.app import app
from smdlm_cli.core.io import load_tensors
from smdlm_cli.core.models import load_model
from smdlm_cli.core.models.llada import LLaDA
from smdlm_cli.recipe import load_recipe

runner = CliRunner()
ROWS = [{"prompt": f"Add {i} and 1.", "response": f"The sum is {i + 1}."} for i in range(40)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llada-ft")
    base = write_chat_base(root / "base")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = [f"model.init={base}", f"data.source={data}", "data.valid_fraction=0.2",
                "train.steps=4", "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
                "train.eval_batches=2", "train.log_every=1", "finetune.max_length=96",
                "finetune.pad_jitter=4"]
    result = runner.invoke(app, ["finetune", "recipes/tiny-llada.toml", "--out", str(root / "run"),
                                 "--merge", *[a for kv in settings for a in ("--set", kv)]])
    assert result.exit_code == 0, result.output
    return base, root / "run"


def test_finetune_trains_dora_adapters_on_llada_s_projections_and_omega(run):
    base, run_dir = run
    adapter = load_tensors(run_dir / "adapter" / "adapter_model.safetensors")
    tuned = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter if "lora_B" in k}
    assert tuned == {"q_proj", "k_proj", "v_proj", "attn_out"}
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert any("magnitude" in k for k in adapter)                                 # DoRA
    sm = json.loads((run_dir / "softmask.json").read_text())
    assert sm["k"] == 1
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_nll" in x] == [0, 2, 4]
    x = torch.randint(0, 290, (1, 12))
    with torch.no_grad():
        plain = load_model(str(base))(input_ids=x)
        merged = load_model(str(run_dir))
        assert isinstance(merged, LLaDA)
        out = merged(input_ids=x)
        (run_dir / "config.json").rename(run_dir / "merged-config.json")   # base.json + adapter/
        adapted = load_model(str(run_dir))(input_ids=x)
        (run_dir / "merged-config.json").rename(run_dir / "config.json")
    assert not torch.allclose(plain, out)
    torch.testing.assert_close(out, adapted, atol=1e-5, rtol=1e-5)


def test_llada_run_samples_with_llada_s_rule_and_guidance(run, tmp_path):
    _, run_dir = run
    out = runner.invoke(app, ["sample", "--ckpt", str(run_dir), "--chat", "--prompt", "Add 2 and 1.",
                              "--nfe", "8", "--length", "48", "--num-samples", "2",
                              "--sampler", "confidence", "-o", "alg=low_confidence",
                              "-o", "transfer=even", "-o", "block_length=8", "-o", "cfg_scale=0.5",
                              "-o", "cache=prefix", "--out", str(tmp_path / "s.jsonl")])
    assert out.exit_code == 0, out.output
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert rows[0]["tokens"][:10] == rows[1]["tokens"][:10]            # the prompt stays
    report = runner.invoke(app, ["evaluate", "humaneval", "--ckpt", str(run_dir), "--format",
                                 "instruct", "--limit", "1", "--max-new-tokens", "16", "--nfe", "4",
                                 "--sampler", "confidence", "-o", "alg=random", "-o",
                                 "transfer=even", "--json", "--out", str(tmp_path / "he.json")])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["samples"] == 1


def test_llada_8b_recipe_stops_at_once_offline(tmp_path):
    r = load_recipe("recipes/llada-sm.toml")
    assert r.model.init == "GSAI-ML/LLaDA-8B-Instruct" and r.softmask.k == 1
    assert r.finetune.method == "dora" and r.finetune.r == 16 and r.train.lr == 1e-5
    assert r.finetune.target_modules == ["q_proj", "k_proj", "v_proj", "attn_out"]
    result = runner.invoke(app, ["finetune", "recipes/llada-sm.toml", "--out", str(tmp_path / "8b")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "GSAI-ML/LLaDA-8B-Instruct" in result.stderr and "not in the local cache" in result.stderr
    assert not (tmp_path / "8b").exists()
