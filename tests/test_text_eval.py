"""gen-PPL, entropy, MAUVE, ELBO and the sweep, on models the tests build or train."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from runs import tokenizer
from smdlm_cli.cli.app import app
from smdlm_cli.commands import sweep
from smdlm_cli.core.errors import UserError
from smdlm_cli.evals import genppl, mauve
from smdlm_cli.evals.scorer import load_scorer

runner = CliRunner()
TEXTS = ["<|endoftext|>def add(a, b):\n    return a + b\n",
         "<|endoftext|>import os\nprint(os.getcwd())<|endoftext|>x = 1",
         "<|endoftext|>class A:\n    pass\n" * 3]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 with the tests' BPE, saved as an HF directory (what a local scorer is)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2,
                                       n_head=2, bos_token_id=tok.eos_token_id,
                                       eos_token_id=tok.eos_token_id))
    d = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _direct_gen_ppl(model, tok, texts, context):
    """The protocol spelled out one text and one window at a time."""
    eos = tok.eos_token_id
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), context):
            w = torch.tensor(ids[start:start + context])
            if len(w) < 2:
                continue
            logp = model(input_ids=w[None]).logits[0].float().log_softmax(-1)
            seen_eos = False
            for t in range(1, len(w)):
                first = w[t] == eos and not seen_eos and not (w[:t] == eos).any()
                if w[t] != eos or first:
                    total -= logp[t - 1, w[t]].item()
                    count += 1
    return math.exp(total / count), count


def test_gen_ppl_equals_a_direct_computation(gpt2_dir):
    scorer = load_scorer(str(gpt2_dir), torch.device("cpu"))
    assert scorer.hf and scorer.context == 32
    totals, done = [], []
    got = genppl.gen_ppl(scorer, TEXTS, batch_size=2, on_batch=done.append, on_total=totals.append)
    want, count = _direct_gen_ppl(scorer.model, scorer.tok, TEXTS, 32)
    assert got["tokens"] == count and got["samples"] == 3
    # the progress counts windows (a long text has several), and ends at its total
    assert totals == [got["windows"]] and sum(done) == got["windows"] > got["samples"]
    assert got["gen_ppl"] == pytest.approx(want, rel=1e-4)


def test_unigram_entropy_values():
    assert genppl.unigram_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2))
    assert genppl.unigram_entropy([7] * 9) == 0.0
    out = genppl.mean_entropy([[1, 2, 3, 4], [5, 5, 5, 5]])
    assert out["entropy"] == pytest.approx(math.log(4) / 2)


def test_scorer_errors_are_one_line(trained):
    with pytest.raises(UserError, match="--scorer gpt2-large: cannot load it"):
        load_scorer("gpt2-large", torch.device("cpu"))
    with pytest.raises(UserError, match="a diffusion run; expected an AR run"):
        load_scorer(str(trained["sm"]), torch.device("cpu"))
    load_scorer(str(trained["sm"]), torch.device("cpu"), need_lm=False)  # featurising is fine


def test_ar_run_scorer_matches_its_own_nll(trained):
    scorer = load_scorer(str(trained["ar"]), torch.device("cpu"))
    ids = scorer.encode(TEXTS[:1])[0]
    x = torch.tensor([ids])
    logits = scorer.model(input_ids=x)
    nll = F.cross_entropy(logits[0, :-1], x[0, 1:])
    assert genppl.gen_ppl(scorer, TEXTS[:1])["gen_ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_mauve_identical_sets_score_one_and_unrelated_ones_lower(gpt2_dir):
    scorer = load_scorer(str(gpt2_dir), torch.device("cpu"), need_lm=False)
    from smdlm_cli.core.data import stdlib_files

    code = [f.read_text(errors="replace")[:300] for f in stdlib_files()[100:160]]
    rng = np.random.default_rng(0)
    noise = [" ".join(rng.choice(["zq", "xj", "@@", "!!", "0x", "~~"], 40)) for _ in range(60)]
    p = mauve.features(scorer, code)
    assert p.shape == (60, 32) and np.isfinite(p).all()
    same = mauve.mauve_score(p, p.copy())
    other = mauve.mauve_score(p, mauve.features(scorer, noise))
    assert same > 0.99 and other < 0.5 * same


def test_elbo_reproduces_the_runs_own_validation(trained, tmp_path):
    run = trained["sm"]
    last = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
            if "val_nll" in l][-1]
    result = runner.invoke(app, ["evaluate", "elbo", "--ckpt", str(run), "--json",
                                 "--out", str(tmp_path / "elbo.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sm"] and report["nll"] == pytest.approx(last["val_nll"], rel=1e-6)
    assert report["ppl"] == pytest.approx(math.exp(report["nll"]))
    assert report["bpd"] == pytest.approx(report["nll"] / math.log(2))
    binary = json.loads(runner.invoke(app, ["evaluate", "elbo", "--ckpt", str(run), "--binary",
                                            "--json", "--out", str(tmp_path / "b.json")]).stdout)
    assert not binary["sm"] and binary["tokens"] == report["tokens"]


def test_genppl_and_mauve_commands_offline(trained, tmp_path):
    sm, ar = str(trained["sm"]), str(trained["ar"])
    result = runner.invoke(app, ["evaluate", "genppl", "--ckpt", sm, "--scorer", ar,
                                 "--num-samples", "6", "--nfe", "8", "--batch-size", "3", "--json",
                                 "--out", str(tmp_path / "g.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 6 and report["gen_ppl"] > 1 and report["tokens"] > 6 * 20
    assert 0 < report["entropy"] <= math.log(48)
    assert report["checkpoint"]["path"] == sm and report["generation"]["k"] == 3
    result = runner.invoke(app, ["evaluate", "mauve", "--ckpt", sm, "--featurizer", ar,
                                 "--num-samples", "8", "--nfe", "8", "--json",
                                 "--out", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0 < report["mauve"] <= 1 and report["references"] == 8


def test_sweep_end_to_end_and_resumes(trained, tmp_path):
    sm, ar = str(trained["sm"]), str(trained["ar"])
    out = tmp_path / "sweep"
    args = ["evaluate", "sweep", "--ckpt", sm, "--ckpt", ar, "--nfe", "4,8",
            "--metrics", "genppl,entropy,mauve,elbo", "--scorer", ar, "--num-samples", "4",
            "--seeds", "2", "--batch-size", "4", "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["decoding"] for r in report["rows"]] == ["binary", "SM", "AR"]
    # the terminal shows every metric's table, and faiss's warning (4 samples are too few for
    # MAUVE's clusters) as a note after them, not inside the progress bar
    for title in ("## gen-PPL", "## entropy (nats)", "## MAUVE", "## ELBO (nats/token)"):
        assert title in result.stderr
    assert report["notes"] and all(n.startswith("faiss: ") for n in report["notes"])
    assert "note: faiss: clustering" in result.stderr
    for row in report["rows"]:
        assert math.isfinite(row["elbo"])
        for cell in row["cells"]:
            assert len(cell["seeds"]) == 2
            values = [s["genppl"] for s in cell["seeds"]]
            assert cell["genppl"] == pytest.approx(np.mean(values))
            assert cell["genppl_se"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
            speeds = [s["tokens_per_s"] for s in cell["seeds"]]
            assert cell["tokens_per_s"] == pytest.approx(np.median(speeds)) and min(speeds) > 0
            assert 0 < cell["mauve"] <= 1
    binary, smrow, arrow = report["rows"]
    assert [c["nfe"] for c in binary["cells"]] == [4, 8] and arrow["cells"][0]["nfe"] == 47
    assert {s["k"] for c in binary["cells"] for s in c["seeds"]} == {0}
    assert {s["k"] for c in smrow["cells"] for s in c["seeds"]} == {3}
    direct = json.loads(runner.invoke(app, ["evaluate", "elbo", "--ckpt", sm, "--binary", "--json",
                                            "--out", str(tmp_path / "e.json")]).stdout)
    assert binary["elbo"] == pytest.approx(direct["nll"], rel=1e-6)
    md = (out / "sweep.md").read_text()
    assert "| NFE 4 | NFE 8 |" in md and f"{binary['cells'][0]['genppl']:.2f}" in md
    assert (out / "sweep.png").stat().st_size > 10_000
    cells = sorted((out / "cells").iterdir())
    assert len(cells) == (2 + 2 + 1) * 2
    # a second run reads every cell back instead of sampling again: identical numbers
    stamp = {c: c.stat().st_mtime_ns for c in cells}
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["rows"] == report["rows"]
    assert {c: c.stat().st_mtime_ns for c in cells} == stamp


def test_sweep_plot_names_identical_rows(tmp_path):
    cells = [{"nfe": n, "genppl": g, "genppl_se": None} for n, g in ((4, 30.0), (8, 20.0))]
    report = {"settings": {"metrics": ["genppl"], "nfe": [4, 8]},
              "rows": [{"label": "a · binary", "decoding": "binary", "cells": cells},
                       {"label": "a · SM", "decoding": "SM", "cells": cells},
                       {"label": "b · binary", "decoding": "binary",
                        "cells": [dict(c, genppl=c["genppl"] + 1) for c in cells]}]}
    legend = sweep.plot(report, tmp_path / "s.png")
    assert legend == ["a · binary", "a · SM (identical to a · binary)", "b · binary"]


def test_sweep_bad_flags(trained, tmp_path):
    for args, message in ((["--metrics", "bleu"], "--metrics bleu: expected a comma-separated subset"),
                          (["--nfe", "0,4"], "--nfe 0,4: expected positive integers"),
                          (["--nfe", "a"], "--nfe a: expected comma-separated integers")):
        result = runner.invoke(app, ["evaluate", "sweep", "--ckpt", str(trained["sm"]), *args,
                                     "--out", str(tmp_path / "s")])
        assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_sweep_cell_speed_is_the_median_over_seeds():
    from smdlm_cli.commands.sweep import _summarise

    seeds = [{"nfe": 8, "tokens_per_s": t, "genppl": g} for t, g in ((900.0, 10.0), (300.0, 12.0),
                                                                   (1000.0, 14.0))]
    cell = _summarise(seeds, ["genppl"])
    assert cell["tokens_per_s"] == 900.0  # the seed slowed by other work does not pull it down
    assert cell["genppl"] == pytest.approx(12.0) and cell["genppl_se"] == pytest.approx(2 / 3 ** 0.5)
