"""smdlm: Soft-Masked Diffusion Language Models. The library's public API (see smdlm_cli/api.py):

    import smdlm
    run = smdlm.load("runs/quickstart")
    print(smdlm.generate(run, ["def add(a, b):"], nfe=32, max_new_tokens=24)[0])

The command line, the core and the evaluations live in the `smdlm_cli` package.
"""

from smdlm_cli import __version__
from smdlm_cli.api import Run, UserError, evaluate, finetune, generate, load, train

__all__ = ["__version__", "train", "finetune", "load", "generate", "evaluate", "Run", "UserError"]
