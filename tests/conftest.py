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
