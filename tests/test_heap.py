"""fast/heap.py: the huge-page switch minisft sets before torch loads (unless the user chose), that it
reaches torch's allocator and changes no number of the training, and that the bench runs TRL without it."""
import os
import subprocess
import sys

import pytest
import torch

from minisft import bench
from minisft.fast import heap
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOW = "import minisft, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"


def run_python(code, **env):
    base = {k: v for k, v in os.environ.items() if k != heap.HUGE_PAGES}
    out = subprocess.run([sys.executable, "-c", code], env=dict(base, PYTHONPATH=ROOT, **env),
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_minisft_turns_huge_pages_on_unless_the_user_chose():
    assert run_python(SHOW) == "1"
    assert run_python(SHOW, THP_MEM_ALLOC_ENABLE="0") == "0"  # the user's choice stands


# One training step of a small model in a fresh process; prints the loss and a gradient checksum as exact floats.
STEP = """
import minisft, torch
from minisft.model import ModelConfig, SmolLM
from minisft.loss import chunked_cross_entropy
torch.manual_seed(0)
model = SmolLM(ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)).train()
ids = torch.randint(0, 512, (4, 300), generator=torch.Generator().manual_seed(1))
loss, n = chunked_cross_entropy(model.hidden_states(ids), model.lm_head.weight, ids)
(loss / n).backward()
print(float(loss).hex(), float(sum(p.grad.double().square().sum() for p in model.parameters())).hex())
"""


def test_huge_pages_change_no_number_of_a_training_step():
    # Its [4, 300, 1024] MLP activations (4.9 MB) are large enough to take the huge-page path.
    assert run_python(STEP) == run_python(STEP, THP_MEM_ALLOC_ENABLE="0")


def test_use_huge_pages_records_whether_it_set_the_variable(monkeypatch):
    monkeypatch.delenv(heap.HUGE_PAGES, raising=False)
    monkeypatch.setattr(heap, "set_by_minisft", False)
    heap.use_huge_pages()
    assert os.environ[heap.HUGE_PAGES] == "1" and heap.set_by_minisft
    monkeypatch.setenv(heap.HUGE_PAGES, "0")
    monkeypatch.setattr(heap, "set_by_minisft", False)
    heap.use_huge_pages()
    assert os.environ[heap.HUGE_PAGES] == "0" and not heap.set_by_minisft


@pytest.mark.parametrize("set_by_minisft, as_shipped, expected", [
    (True, True, "0"),  # TRL as shipped: PyTorch's default, and its runner's own import of minisft keeps it
    (True, False, "1"),  # minisft's own runs keep it
    (False, True, "1"),  # the user set it: every run gets it
])
def test_bench_runs_other_trainers_without_the_switch(tmp_path, monkeypatch, set_by_minisft, as_shipped, expected):
    monkeypatch.setenv(heap.HUGE_PAGES, "1")
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the child imports minisft from this checkout
    monkeypatch.setattr(heap, "set_by_minisft", set_by_minisft)
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-c", SHOW]  # imports minisft first, as bench.trl_side does
    rc, _, rss = bench.run_process(cmd, str(log), as_shipped=as_shipped)
    assert rc == 0 and rss > 0
    assert log.read_text().strip() == expected
