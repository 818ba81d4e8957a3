"""Sudoku: the solver and generator (unique solutions, reproducible, disjoint splits), scoring,
the data source's blocks and the prompt that is never masked, `smdlm evaluate sudoku`, and the
Sudoku reproduction chain (smoke size) with its report and JSON figures read from the outputs."""

import json
import math

import pytest
import torch

from smdlm_cli.core import sudoku
from smdlm_cli.core.config import DataConfig, TrainConfig
from smdlm_cli.core.distributed import Dist, batch_layout
from smdlm_cli.core.objectives import Diffusion

# A published puzzle with one solution (Project Euler 96, grid 01).
EULER = "..3.2.6..9..3.5..1..18.64....81.29..7.......8..67.82....26.95..8..2.3..9..5.1.3.."
EULER_SOLUTION = "483921657967345821251876493548132976729564138136798245372689514814253769695417382"


def test_solver_finds_the_one_solution_of_a_known_puzzle():
    found = sudoku.solutions(sudoku.parse(EULER), limit=2)
    assert [sudoku.text(s) for s in found] == [EULER_SOLUTION]
    assert sudoku.valid(found[0])
    # one given removed from a proper puzzle may leave several solutions; none is ever invented
    assert sudoku.solutions(sudoku.parse("11" + EULER[2:]), limit=2) == []


@pytest.mark.parametrize("givens", [36, 24])
def test_generated_puzzles_have_one_solution_and_their_givens(givens):
    for g, s in sudoku.puzzles("train", 0, 12, givens):
        grid = sudoku.parse(g)
        assert sum(1 for v in grid if v) >= givens
        found = sudoku.solutions(grid, limit=2)
        assert [sudoku.text(x) for x in found] == [s]            # unique, and it is ours
        assert all(ch == "." or ch == s[i] for i, ch in enumerate(g))  # givens from the solution


def test_generation_is_reproducible_and_splits_are_disjoint():
    a = sudoku.puzzles("train", 0, 20, 36)
    assert sudoku.puzzles("train", 5, 8, 36) == a[5:8]          # each puzzle from its own seed
    assert sudoku.generate("train", 20, 36, workers=2, pool_from=0) == a  # any number of workers
    test = sudoku.puzzles("test", 0, 20, 36)
    assert not {s for _, s in a} & {s for _, s in test}


def test_score_counts_blank_cells_and_checks_the_rules():
    assert sudoku.score(EULER, EULER_SOLUTION, EULER_SOLUTION) == {
        "solved": True, "cells_right": EULER.count("."), "blanks": EULER.count("."), "valid": True}
    first_blank = EULER.index(".")
    wrong = list(EULER_SOLUTION)
    wrong[first_blank] = "1" if wrong[first_blank] != "1" else "2"
    s = sudoku.score(EULER, EULER_SOLUTION, "".join(wrong))
    assert (s["solved"], s["cells_right"], s["valid"]) == (False, EULER.count(".") - 1, False)
    garbage = sudoku.score(EULER, EULER_SOLUTION, "<|endoftext|>")
    assert garbage["cells_right"] == 0 and not garbage["valid"] and not garbage["solved"]


def test_the_prompt_is_never_masked_and_the_elbo_is_per_solution_cell():
    cfg = TrainConfig(batch_size=8)
    ctx = Dist(device=torch.device("cpu"))
    obj = Diffusion(cfg, batch_layout(cfg, 1), ctx, mask_id=1, length=163, prompt=82)
    x0 = torch.randint(2, 20, (8, 163))
    obj.begin_step(0)
    n = obj.micro(x0, 0, 0)
    assert torch.equal(n.xt[:, :82], x0[:, :82]) and (n.xt[:, 82:] == 1).any()
    v = obj.validation_input(x0, 0, 1, seed=0)
    assert torch.equal(v.xt[:, :82], x0[:, :82])
    logits = torch.randn(8, 163, 30)
    terms = obj.terms(logits, v)
    assert terms[1].item() == 8 * 81                            # tokens scored: the solution
    loss = obj.loss(logits, n)
    assert loss.item() == pytest.approx(obj.nll(logits, n).sum().item() / (8 * 81), rel=1e-6)


def test_fed_back_entropy_of_blank_cells_leaves_out_the_given_copies():
    """evaluate sudoku's blank-cell median pools trace["entropy"] only where the givens are
    blank, at the traced rows' solution cells; NaN (nothing fed back) never counts."""
    from smdlm_cli.evals.sudoku import LENGTH, _blank_entropies
    givens = [EULER, "1" + EULER[1:]]
    start = 1 + sudoku.CELLS
    ent = torch.full((3, 2, LENGTH), float("nan"))
    ent[0, 0, start + 0] = 0.5      # row 0, cell 0: blank in EULER
    ent[1, 0, start + 2] = 0.01     # cell 2 holds the given 3: a copy, left out
    ent[2, 1, start + 0] = 1.5      # row 1, cell 0: given "1" there, left out
    ent[2, 1, start + 1] = 2.0      # row 1, cell 1: blank
    ent[0, 1, 5] = 9.0              # a prompt position: never a solution cell
    h = _blank_entropies(ent, givens, [start, start])
    assert sorted(h.tolist()) == [0.5, 2.0]


def test_sudoku_blocks_and_their_errors(tmp_path, monkeypatch):
    from smdlm_cli.core.data import build_corpus, iter_documents, prompt_length
    from smdlm_cli.core.errors import UserError
    from smdlm_cli.core.tokenizer import train_bpe

    monkeypatch.setenv("SMDLM_CACHE", str(tmp_path))
    cfg = DataConfig(source="sudoku", sudoku_train=6, sudoku_test=2, vocab_size=258)
    tok = train_bpe(iter_documents(cfg, "train"), 258)
    train, valid = build_corpus(cfg, tok, 163, tmp_path)
    assert train.shape == (6, 163) and valid.shape[1] == 163 and prompt_length(cfg) == 82
    g, s = sudoku.puzzles("train", 0, 1, 36)[0]
    assert tok.decode(train[0, 1:82].tolist()) == g and tok.decode(train[0, 82:].tolist()) == s
    assert train[0, 0].item() == tok.bos_token_id
    with pytest.raises(UserError, match="model.length = 128: a sudoku block is 163"):
        build_corpus(cfg, tok, 128, tmp_path)
    merged = train_bpe(iter_documents(cfg, "train"), 300)   # merges: a cell is no longer one token
    with pytest.raises(UserError, match="a sudoku cell must be one token"):
        build_corpus(cfg, merged, 163, tmp_path)


# --- the chain, once per session ----------------------------------------------------------------

@pytest.fixture(scope="module")
def chain(sudoku_chain):
    result, d = sudoku_chain
    assert result.returncode == 0, result.stderr[-3000:]
    return d / "runs" / "sudoku-smoke"


def test_every_stage_ran_and_the_report_has_its_sections(chain):
    record = json.loads((chain / "stages.json").read_text())
    assert set(record["stages"]) == {"base", "binary", "sm-iso-update", "sm-iso-compute", "sm-on",
                                     "entropy", "lambda", "solve-mdlm", "solve-confidence"}
    text = (chain / "results-sudoku.md").read_text()
    for heading in ("## Training", "## How sure is the base model", "## Solved puzzles against NFE",
                    "## Was λ on?", "## Commands"):
        assert heading in text
    assert (chain / "figures" / "results-sudoku.png").is_file()


def test_evaluate_sudoku_report_is_consistent(chain):
    rep = json.loads((chain / "solve-mdlm" / "sm-iso-update-SM.json").read_text())
    assert rep["puzzles"] == 8 and rep["k"] == 3 and rep["sampler"] == "mdlm"
    assert [r["nfe"] for r in rep["results"]] == [1, 2, 81]
    for r in rep["results"]:
        assert len(r["seeds"]) == 2
        assert r["solved"] == pytest.approx(sum(s["solved"] for s in r["seeds"]) / 2)
        for s in r["seeds"]:
            assert 0 <= s["solved"] <= s["valid"] + 1e-12 and 0 <= s["cells"] <= 1
            assert s["nfe"] <= r["nfe"] + 2                       # settle + noise removal at most
    binary = json.loads((chain / "solve-mdlm" / "binary-binary.json").read_text())
    assert binary["k"] == 0
    assert all(r["fed_back"]["lam_mean"] is None for r in binary["results"] if "fed_back" in r)


def test_json_figures_are_computed_from_the_run_outputs(chain):
    figures = json.loads((chain / "results-sudoku.json").read_text())
    base = json.loads((chain / "entropy" / "base.json").read_text())
    fb = base["results"][0]["fed_back"]
    assert figures["median_fed_back_entropy"] == fb["entropy_median_blanks"]  # the blank cells
    assert figures["median_fed_back_entropy_all_cells"] == fb["entropy_median"]
    assert 0 <= figures["median_fed_back_entropy"] <= math.log(258) + 1e-6
    assert 0 < fb["count_blanks"] < fb["count"]  # the copies of givens are left out
    for run in ("sm-iso-update", "sm-iso-compute", "sm-on"):
        rows = [json.loads(line) for line in (chain / run / "metrics.jsonl").read_text().splitlines()]
        logs = [r for r in rows if "loss" in r]
        assert figures["sm_steps"][run] == logs[-1]["sm_steps"]
        assert figures["omega_s_final"][run] == [r["scale"] for r in logs if "scale" in r][-1]
    counts = {"better": 0, "worse": 0, "same": 0}
    for samp in ("mdlm", "confidence"):
        sm = json.loads((chain / f"solve-{samp}" / "sm-iso-update-SM.json").read_text())
        binary = json.loads((chain / f"solve-{samp}" / "binary-binary.json").read_text())
        for metric in ("solved", "cells"):
            for a, b in zip(sm["results"], binary["results"]):
                if a[f"{metric}_se"] is None or b[f"{metric}_se"] is None:
                    continue
                diff = a[metric] - b[metric]
                se = math.hypot(a[f"{metric}_se"], b[f"{metric}_se"])
                counts["better" if diff > 2 * se else "worse" if diff < -2 * se else "same"] += 1
    assert figures["verdicts"] == counts


def test_bad_sudoku_evaluations_are_one_line_errors(chain, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from smdlm_cli.cli.app import app

    monkeypatch.chdir(tmp_path)  # in-process (the CLI's error path is the same as a shell's)
    for args, message in ((["--ckpt", str(chain / "binary"), "--seeds", "0"], "--seeds 0"),
                          (["--ckpt", str(chain / "binary"), "--nfe", "0"], "--nfe 0"),
                          (["--ckpt", str(chain / "binary"), "--limit", "-1"], "--limit -1")):
        r = CliRunner().invoke(app, ["evaluate", "sudoku", *args])
        assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
