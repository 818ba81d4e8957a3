"""The decoding a run expects when no flag says otherwise: sampler.json in the run directory.

    {"sampler": "confidence", "options": {"alg": "entropy", "temperature": 0.1, "top_p": 0.9},
     "nfe": "tokens"}

`smdlm finetune` writes it (the paper's Dream decoding: Dream's entropy-confidence sampler at
temperature 0.1 and top-p 0.9, one step per generated token); `sample`, `evaluate` and the API
read it, and every flag given on the command line wins over it. The step rule applies to
completions (`evaluate humaneval/mbpp`, the API with max_new_tokens); `sample` keeps its --nfe. A Dream-layout model without the
file (a base checkpoint, an older run) gets the same paper defaults; an MDLM run gets none (the
mdlm sampler, or ar for an AR run). "nfe": "tokens" means one step per generated token (code
evaluation's NFE 1/1); an integer is a fixed step count.

Not here: the samplers (samplers/), the flags (commands/sample.py).
"""

from __future__ import annotations

from pathlib import Path

from smdlm_cli.core.errors import UserError
from smdlm_cli.core import validate
from smdlm_cli.core.io import atomic_write_json
from smdlm_cli.core.models.dream import Dream
from smdlm_cli.core.samplers import validate_sampler_args

FILE = "sampler.json"
# The paper's code evaluation (Dream's eval_instruct: alg entropy, temperature 0.1, top_p 0.9,
# diffusion_steps = max_new_tokens)
DREAM_PAPER = {"sampler": "confidence",
               "options": {"alg": "entropy", "temperature": 0.1, "top_p": 0.9},
               "nfe": "tokens"}


def completion_steps(defaults: dict, max_new_tokens: int) -> int:
    """Steps for completions of max_new_tokens when no --nfe is given: the run's "nfe" (default
    "tokens", one step per generated token, the code evaluation's NFE 1/1)."""
    nfe = defaults.get("nfe", "tokens")
    return max_new_tokens if nfe == "tokens" else nfe


def for_model(model) -> dict:
    """The built-in defaults of a backbone: the paper's for Dream-layout models, else none."""
    return dict(DREAM_PAPER, options=dict(DREAM_PAPER["options"])) if isinstance(model, Dream) else {}


def check(d: dict, where: str) -> dict:
    """d validated (a known sampler with valid options, nfe "tokens" or a positive integer)."""
    if not isinstance(d, dict) or not isinstance(d.get("sampler"), str) \
            or not isinstance(d.get("options", {}), dict):
        raise UserError(f"{where}: expected {{\"sampler\": NAME, \"options\": {{...}}, "
                        f"\"nfe\": \"tokens\" or N}}")
    nfe = d.get("nfe", "tokens")
    if nfe != "tokens" and (isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1):
        raise UserError(f"{where}: nfe = {nfe!r}, expected \"tokens\" or an integer >= 1")
    try:
        validate_sampler_args(d["sampler"], steps=1, **d.get("options", {}))
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return {"sampler": d["sampler"], "options": dict(d.get("options", {})), "nfe": nfe}


def write(run_dir: Path, defaults: dict) -> None:
    """sampler.json, when there are defaults to record."""
    if defaults:
        atomic_write_json(Path(run_dir) / FILE, check(defaults, FILE))


def read(run_dir: Path, model) -> dict:
    """The run's sampler.json, else the backbone's built-in defaults."""
    file = Path(run_dir) / FILE
    if not file.is_file():
        return for_model(model)
    return check(validate.read_json(file), str(file))
