"""lm-evaluation-harness on smdlm runs, offline: task YAMLs written here (local JSONL data) run
through lm-eval's own evaluator; the Monte-Carlo ELBO ranks trained text above random text; the
harness's generations are smdlm's own for the same prompts and seeds."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from smdlm_cli.cli.app import app
from smdlm_cli.core import rundir
from smdlm_cli.core.generate import choose_softmask, completion, generate
from smdlm_cli.core.twopass import TwoPass
from smdlm_cli.evals.likelihood import elbo_loglikelihood, mask_counts

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from smdlm_cli.evals.lmeval import SMDLM  # noqa: E402  (registers "smdlm")

runner = CliRunner()
SENTENCES = ["the quick brown fox jumps over the lazy dog.", "a cold wind blows across the hills.",
             "my green parrot sings every single morning.", "she reads old books by the window."]
NOISE = " qz xv jk wp zb"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SM diffusion run that has seen only SENTENCES, trained by smdlm pretrain's code."""
    from smdlm_cli.commands import pretrain
    from smdlm_cli.recipe import load_recipe

    root = tmp_path_factory.mktemp("lmeval")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES * 60))
    settings = [f"data.source={corpus}", "data.vocab_size=300", "data.valid_fraction=0.05",
                "model.length=32", "model.hidden_size=64", "model.n_blocks=2", "train.steps=150",
                "train.batch_size=16", "train.lr=3e-3", "train.warmup=10", "train.ema=0",
                "train.eval_every=150", "train.save_every=150", "train.eval_batches=1",
                "train.log_every=50"]
    recipe = load_recipe(Path(__file__).parents[1] / "recipes/quickstart.toml", settings)
    return pretrain.run(recipe, recipe_path=Path("recipes/quickstart.toml"), out=root / "run",
                        resume=False)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    data = root / "docs.jsonl"
    rows = [{"prompt": s[:15], "answer": s[15:], "choices": [s[15:], NOISE], "label": 0}
            for s in SENTENCES]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{prompt}}}}"
"""
    (root / "gen.yaml").write_text(f"""task: smdlm_tiny_gen
{common}output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
""")
    (root / "mc.yaml").write_text(f"""task: smdlm_tiny_mc
{common}output_type: multiple_choice
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    return root


def test_mask_counts_are_stratified_and_in_range():
    g = torch.Generator().manual_seed(0)
    ks = mask_counts(10, 5, g)
    assert all(1 <= k <= 10 for k in ks) and len(set(ks)) == 5
    gaps = sorted((b - a) % 10 for a, b in zip(ks, ks[1:]))
    assert gaps == [2, 2, 2, 2]                              # evenly spaced by T / n
    assert mask_counts(1, 4, g) == [1, 1, 1, 1]


def test_elbo_is_exact_for_one_token_and_ranks_trained_text_first(run):
    r = rundir.load(run)
    tok, model = r.tokenizer, r.model
    ids = tok(SENTENCES[0], add_special_tokens=False)["input_ids"]
    context, target = [tok.bos_token_id] + ids[:-1], ids[-1:]
    # one target token: every sample masks it alone, so the ELBO is log p itself
    est, _ = elbo_loglikelihood(model, r.softmask, context, target, 3, 2, torch.Generator())
    x = torch.tensor([context + [model.mask_id]])
    with torch.no_grad():
        logits = TwoPass(model, r.softmask)(x, use_sm=True)[0, -1].float()
    logits[model.mask_id] = float("-inf")
    assert est == pytest.approx(float(logits.log_softmax(-1)[target[0]]), abs=1e-5)
    trained = tok(SENTENCES[1][10:], add_special_tokens=False)["input_ids"]
    noise = tok(NOISE, add_special_tokens=False)["input_ids"]
    ctx = [tok.bos_token_id] + tok(SENTENCES[1][:10], add_special_tokens=False)["input_ids"]
    good, _ = elbo_loglikelihood(model, r.softmask, ctx, trained, 16, 8, torch.Generator().manual_seed(1))
    bad, greedy = elbo_loglikelihood(model, r.softmask, ctx, noise, 16, 8, torch.Generator().manual_seed(1))
    assert good > bad + 5 and not greedy
    # greedy: the continuation is the argmax of the forward with all of it masked
    x = torch.tensor([ctx + [model.mask_id] * 4])
    with torch.no_grad():
        logits = TwoPass(model, r.softmask)(x, use_sm=True)[0, len(ctx):].float()
    logits[:, model.mask_id] = float("-inf")
    best = logits.argmax(-1).tolist()
    assert elbo_loglikelihood(model, r.softmask, ctx, best, 2, 2, torch.Generator())[1]


def test_lm_eval_evaluator_runs_generate_and_multiple_choice_tasks(run, tasks):
    from lm_eval import simple_evaluate

    args = {"ckpt": str(run), "sampler": "confidence", "nfe": 6, "k": 3, "mc_num": 8,
            "alg": "maskgit_plus", "seed": 5}
    out = simple_evaluate(model="smdlm", model_args=args, tasks=["smdlm_tiny_gen", "smdlm_tiny_mc"],
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=3,
                          device="cpu", log_samples=True)
    assert out["results"]["smdlm_tiny_mc"]["acc,none"] == 1.0   # trained text above noise, each doc
    samples = out["samples"]["smdlm_tiny_gen"]
    assert len(samples) == 4
    # the harness's generations are smdlm's own: same prompts, same seeds, same decode path
    r = rundir.load(run)
    prompts = [s["arguments"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    gen = generate(r.model, r.tokenizer, prompts, sampler="confidence", nfe=6,
                   softmask=choose_softmask(r.softmask, 3), max_new_tokens=12, seed=5, batch_size=3,
                   cut_prompts=True, options={"alg": "maskgit_plus"})
    own = [completion(r.tokenizer, gen, j).split(".")[0] for j in range(4)]
    harness = [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert harness == own and any(own)
    em = out["results"]["smdlm_tiny_gen"]["exact_match,none"]
    answers = [SENTENCES[d["doc_id"]][15:] for d in sorted(samples, key=lambda s: s["doc_id"])]
    assert em == pytest.approx(sum(h == a for h, a in zip(harness, answers)) / 4)


def test_evaluate_lm_eval_command_writes_smdlm_s_report(run, tasks, tmp_path):
    result = runner.invoke(app, ["evaluate", "lm-eval", "--ckpt", str(run), "--tasks", "smdlm_tiny_mc",
                                 "--include-path", str(tasks), "--no-builtin-tasks", "--mc-num", "4", "--k", "0",
                                 "--device", "cpu", "--json", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["task"] == "lm-eval" and report["settings"]["tasks"] == ["smdlm_tiny_mc"]
    assert report["smdlm_tiny_mc/acc"] == 1.0 and report["settings"]["model_args"]["k"] == 0
    assert json.loads((tmp_path / "r.json").read_text()) == report
    import smdlm_cli.api as api
    again = api.evaluate("lm-eval", run, tasks=["smdlm_tiny_mc"], include_path=str(tasks),
                         builtin=False, mc_num=4, k=0, device="cpu", out=str(tmp_path / "a.json"))
    assert again["smdlm_tiny_mc/acc"] == 1.0 and again["results"] == report["results"]
    bad = runner.invoke(app, ["evaluate", "lm-eval", "--ckpt", str(run), "--tasks", "no_such_task",
                              "--include-path", str(tasks), "--no-builtin-tasks"])
    assert bad.exit_code == 2 and "no_such_task" in bad.stderr and bad.stderr.count("\n") == 1



def test_rolling_loglikelihood_adds_the_elbo_of_model_length_windows(run):
    class Request:
        def __init__(self, text):
            self.args = (text,)

    lm = SMDLM(ckpt=str(run), mc_num=4, seed=3, device="cpu")
    tok, model = lm.tokenizer, lm.model
    text = " ".join(SENTENCES * 2)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    window = model.config.model_length - 2          # [BOS] + window fits the model
    assert len(ids) > window
    piece = SENTENCES[0][:15]
    short, long = lm.loglikelihood_rolling([Request(piece), Request(text)])

    def elbo(i, target):
        return elbo_loglikelihood(model, lm.softmask, [tok.bos_token_id], target, 4, 32,
                                  torch.Generator().manual_seed(3 + i))[0]

    assert len(tok(piece, add_special_tokens=False)["input_ids"]) <= window
    assert short == pytest.approx(elbo(0, tok(piece, add_special_tokens=False)["input_ids"]))
    assert long == pytest.approx(sum(elbo(1, ids[s:s + window]) for s in range(0, len(ids), window)))
    assert long < short < 0
