"""Shared test fixtures: the real SmolLM2-135M-Instruct checkpoint built from ../shared.

Tests that need it take the `smollm2_dir` fixture; without ../shared they skip with the reason.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MINISFT_SHARED", ROOT.parent / "shared"))
FIXTURE_TOOL = SHARED / "tools" / "smollm2_fixture.py"
TEMPLATES = SHARED / "templates"
FIXTURE_DIR = Path(os.environ.get("MINISFT_FIXTURE_DIR", Path.home() / ".cache" / "minisft-fixtures" / "smollm2-135m-instruct"))


def _need_shared(path):
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs ../shared beside the checkout")


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder with the real SmolLM2-135M-Instruct in Hugging Face layout (float32 weights)."""
    _need_shared(FIXTURE_TOOL)
    if not (FIXTURE_DIR / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(FIXTURE_TOOL), str(FIXTURE_DIR), "--dtype", "float32"], check=True)
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def templates_dir():
    """../shared/templates: the real SmolLM chat templates (Jinja)."""
    _need_shared(TEMPLATES)
    return TEMPLATES


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (use: pytestmark = pytest.mark.usefixtures("one_thread")). A tiny
    model gains nothing from threads, and on a busy 2-core machine OpenMP's spinning threads make each
    step many times slower: one thread keeps such a file fast and steady."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
