"""`smdlm inspect-lambda`: the report equals the SoftMask it reads; plots are written."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from runs import make_run
from smdlm_cli.cli.app import app
from smdlm_cli.core.softmask import SoftMask

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("il") / "run",
                    SoftMask(k=2, scale=0.6, centre=-3.0, steepness=1.5))


def report(*args):
    result = runner.invoke(app, ["inspect-lambda", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_report_matches_the_softmask(run):
    info = report(str(run))
    assert (info["k"], info["temperature"]) == (2, None)
    assert info["scale"] == pytest.approx(0.6) and info["centre"] == pytest.approx(-3.0)
    assert info["steepness"] == pytest.approx(1.5)
    assert info["raw"]["raw_scale"] == pytest.approx(math.log(0.6 / 0.4), rel=1e-5)
    ref = SoftMask(k=2, scale=0.6, centre=-3.0, steepness=1.5)
    h = torch.tensor([p[0] for p in info["curve"]])
    assert h[0] == 0 and h[-1] == pytest.approx(math.log(info["vocab_size"]))
    torch.testing.assert_close(torch.tensor([p[1] for p in info["curve"]]),
                               ref.lam_from_entropy(h).detach(), rtol=1e-5, atol=1e-7)
    kp = info["key_points"]
    assert kp["entropy_at_half_scale"] == pytest.approx(3.0)
    half = ref.lam_from_entropy(torch.tensor(kp["entropy_at_half_scale"])).detach()
    assert float(half) == pytest.approx(0.3, rel=1e-5)
    assert kp["lambda_at_zero_entropy"] == pytest.approx(0.6 / (1 + math.exp(-4.5)), rel=1e-5)
    assert (run / "lambda.png").read_bytes()[:8] == PNG


def test_human_report_shows_table_and_curve(run):
    result = runner.invoke(app, ["inspect-lambda", str(run)])
    assert result.exit_code == 0, result.output
    assert "scale ω_s" in result.stdout and "0.6" in result.stdout and "█" in result.stdout
    assert "λ = scale/2 at entropy 3 nats" in result.stdout


def test_official_transparency_config(tmp_path):
    path = tmp_path / "transparency_config.json"
    path.write_text(json.dumps({"transparency_alg": "mixinputs_with_topk", "transparency_scale": 0.25,
                                "transparency_centre": -1.0, "transparency_steepness": 4.0,
                                "mixture_temp": 1.0, "mixinputs_k": 3,
                                "transparency_scheduling": "none"}))
    info = report(str(path))
    assert (info["scale"], info["k"], info["vocab_size"]) == (pytest.approx(0.25), 3, 50258)
    assert (tmp_path / "transparency_config-lambda.png").read_bytes()[:8] == PNG


def test_binary_run_is_a_one_line_error(tmp_path):
    result = runner.invoke(app, ["inspect-lambda", str(make_run(tmp_path / "b"))])
    assert result.exit_code == 2 and "binary run" in result.stderr and result.stderr.count("\n") == 1


def test_decode_traces_lambda_per_step(run, tmp_path):
    info = report(str(run), "--decode", "--nfe", "6", "--num-samples", "3",
                  "--decode-png", str(tmp_path / "d.png"))
    d = info["decode"]
    assert all(len(d[key]) == 6 for key in ("lam_mean", "lam_q10", "lam_q90", "lam_share_gt_0.1"))
    assert d["lam_mean"][0] == 0.0  # the first forward has no feedback yet
    later = [v for v in d["lam_mean"][1:] if v is not None]
    assert later and all(0 < v <= 0.6 for v in later)  # bounded by the scale
    assert all(q10 <= q90 for q10, q90 in zip(d["lam_q10"], d["lam_q90"]) if q10 is not None)
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG
    # the entropy fed back, measured at the masks a step leaves: λ of the next step's input is
    # λ(H) of those same predictions, so λ at the median H lies within that step's λ spread
    sm = SoftMask(k=2, scale=0.6, centre=-3.0, steepness=1.5)
    for i, h in enumerate(d["entropy_q50"][:-1]):
        if h is not None and d["lam_q10"][i + 1] is not None:
            lam = float(sm.lam_from_entropy(torch.tensor(h)).detach())
            assert d["lam_q10"][i + 1] - 1e-6 <= lam <= d["lam_q90"][i + 1] + 1e-6
    assert 0 <= d["entropy_fed_back_median"] <= math.log(info["vocab_size"]) + 1e-6
    assert d["entropy_fed_back_count"] > 0


def test_decode_of_a_binary_run_measures_the_entropy_fed_back(tmp_path):
    """A binary run has no λ, but --decode reports the entropy of what SM would feed back."""
    info = report(str(make_run(tmp_path / "b")), "--decode", "--nfe", "4", "--num-samples", "2",
                  "--decode-png", str(tmp_path / "d.png"))
    d = info["decode"]
    assert info["binary"] is True and all(v is None for v in d["lam_mean"])
    assert 0 <= d["entropy_fed_back_median"] <= math.log(info["vocab_size"]) + 1e-6
    qs = d["entropy_fed_back_quantiles"]
    assert list(qs) == ["0.1", "0.25", "0.5", "0.75", "0.9"] and list(qs.values()) == sorted(qs.values())
    assert qs["0.1"] <= d["entropy_fed_back_median"] <= qs["0.9"]
    assert (tmp_path / "d.png").read_bytes()[:8] == PNG


def test_ckpt_option_names_the_run_like_every_command(run):
    """--ckpt is accepted as everywhere else; the positional form stays an alias."""
    assert report("--ckpt", str(run)) == report(str(run))
    clash = runner.invoke(app, ["inspect-lambda", str(run), "--ckpt", str(run / "other")])
    assert clash.exit_code == 2 and "name the run once" in clash.stderr


def test_the_terminal_table_stays_short():
    from smdlm_cli.commands.inspect_lambda import table_steps

    assert table_steps(5) == [0, 1, 2, 3, 4]
    steps = table_steps(32)
    assert len(steps) == 12 and steps[0] == 0 and steps[-1] == 31 and steps == sorted(set(steps))
