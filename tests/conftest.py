"""Test-wide settings: never touch the network, never write outside tmp dirs."""

import os
import sys
from pathlib import Path

import pytest

# Nothing may reach a hub from the tests: offline mode makes hub loaders fail fast instead of
# waiting on timeouts, and the loaders' one-line errors are what the tests check.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Float results depend on the thread count; training would pick it by the machine's load
# (train.threads = 0), which differs between runs that a test compares bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def pytest_configure(config):
    import tempfile

    # The data cache lives in a per-session temporary directory, not in ~/.cache.
    os.environ["SMDLM_CACHE"] = tempfile.mkdtemp(prefix="smdlm-test-cache-")


TINY = ["data.max_docs=40", "data.vocab_size=400", "model.length=48", "train.steps=6",
        "train.batch_size=4", "train.eval_every=3", "train.eval_batches=2", "train.save_every=3",
        "train.log_every=1", "train.warmup=2"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Two real, tiny runs made by `smdlm pretrain`'s code: an SM diffusion model and the AR
    baseline, on the same corpus and BPE settings (so the same tokenizer)."""
    from smdlm_cli.commands import pretrain
    from smdlm_cli.recipe import load_recipe

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, recipe in (("sm", "recipes/quickstart.toml"), ("ar", "recipes/quickstart-ar.toml")):
        loaded = load_recipe(Path(__file__).parents[1] / recipe, TINY)
        runs[name] = pretrain.run(loaded, recipe_path=Path(recipe), out=root / name, resume=False)
    return runs


SMOKE_ARGV = [sys.executable, "-m", "smdlm_cli", "reproduce", "recipes/repro/cpu", "--smoke"]


def _smoke(argv: list[str], tmp_path_factory, name: str):
    import subprocess

    d = tmp_path_factory.mktemp(name)
    (d / "recipes").symlink_to(Path(__file__).parents[1] / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=d, env=env, capture_output=True, text=True, timeout=1200), d


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory):
    """README's `smdlm reproduce recipes/repro/cpu` with --smoke, run once per session (about two
    minutes) for both tests/test_readme.py and tests/test_reproduce.py: (result, directory)."""
    return _smoke(SMOKE_ARGV, tmp_path_factory, "smoke-chain")


SUDOKU_SMOKE_ARGV = [sys.executable, "-m", "smdlm_cli", "reproduce", "recipes/sudoku", "--smoke"]


@pytest.fixture(scope="session")
def sudoku_chain(tmp_path_factory):
    """README's `smdlm reproduce recipes/sudoku` with --smoke, once per session: (result, dir)."""
    return _smoke(SUDOKU_SMOKE_ARGV, tmp_path_factory, "sudoku-chain")


GPU_CHECK_ARGV = [sys.executable, "benchmarks/gpu_check.py", "--cpu", "--tiny"]


@pytest.fixture(scope="session")
def gpu_check_cpu(tmp_path_factory):
    """README's `python benchmarks/gpu_check.py --cpu --tiny`, run once per session for both
    tests/test_readme.py and tests/test_gpu_check.py: (result, directory, seconds)."""
    import subprocess
    import time

    d = tmp_path_factory.mktemp("gpu-check")
    for name in ("benchmarks", "recipes"):
        (d / name).symlink_to(Path(__file__).parents[1] / name)
    start = time.perf_counter()
    result = subprocess.run(GPU_CHECK_ARGV, cwd=d, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result, d, time.perf_counter() - start
