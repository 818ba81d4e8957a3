"""Test-wide settings: never touch the network, never write outside tmp dirs."""

import os

# Nothing may reach a hub from the tests: offline mode makes hub loaders fail fast instead of
# waiting on timeouts, and the loaders' one-line errors are what the tests check.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import tempfile

    # The data cache lives in a per-session temporary directory, not in ~/.cache.
    os.environ["SMDLM_CACHE"] = tempfile.mkdtemp(prefix="smdlm-test-cache-")
