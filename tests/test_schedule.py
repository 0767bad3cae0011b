"""schedule.lr_at equals transformers' cosine schedules (run through torch's LambdaLR) at every step."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers.optimization import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup
from transformers.training_args import TrainingArguments

from minisft.schedule import lr_at, warmup_from_ratio

BASE_LR = 3e-4
# (warmup_steps, total_steps, min_lr)
SETTINGS = [
    (0, 100, 0.0),
    (10, 100, 0.0),
    (7, 33, 0.0),
    (1, 2, 0.0),
    (50, 50, 0.0),   # warmup == total
    (0, 1, 0.0),     # one step
    (1, 1, 0.0),
    (0, 0, 0.0),
    (10, 100, 3e-5),
    (0, 40, 1e-5),
    (13, 13, 3e-5),
    (0, 1, 3e-5),
    (5, 20, BASE_LR),  # floor == base: flat after warmup
    (10, 4, 0.0),      # warmup longer than training
    (10, 4, 3e-5),
    (3, 0, 0.0),
]


def transformers_lrs(warmup, total, min_lr, n_steps):
    """lr used by optimizer step s for s in 0..n_steps-1: LambdaLR's lr after s scheduler.step() calls."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    if min_lr == 0:
        sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    else:
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total, min_lr=min_lr)
    lrs = []
    for _ in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup,total,min_lr", SETTINGS)
def test_matches_transformers_every_step(warmup, total, min_lr):
    n = 2 * total + 5  # past the end too: both keep following the cosine
    ref = transformers_lrs(warmup, total, min_lr, n)
    ours = [lr_at(s, base_lr=BASE_LR, warmup_steps=warmup, total_steps=total, min_lr=min_lr) for s in range(n)]
    for s, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-20), f"step {s}: ours {a} vs transformers {b}"


def test_shape_of_the_curve():
    kw = dict(base_lr=1.0, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == 1.0                      # peak exactly when warmup ends
    assert lr_at(60, **kw) == pytest.approx(0.5)       # half way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(110, **kw, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(60, **kw, min_lr=0.1) == pytest.approx(0.55)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.03, 0.05, 0.1, 0.25, 0.3, 0.7, 0.999])
@pytest.mark.parametrize("total", [1, 7, 10, 30, 100, 333, 1000])
def test_warmup_from_ratio_matches_transformers(ratio, total):
    # The real TrainingArguments method on a stand-in (building TrainingArguments needs accelerate).
    ref = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=ratio), total)
    assert warmup_from_ratio(ratio, total) == ref == math.ceil(ratio * total)


def test_bad_input():
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, base_lr=1e-4, warmup_steps=0, total_steps=10, min_lr=1e-3)
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, base_lr=1e-4, warmup_steps=0, total_steps=10, min_lr=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        lr_at(-1, base_lr=1e-4, warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match=">= 0"):
        lr_at(0, base_lr=1e-4, warmup_steps=-2, total_steps=10)
    with pytest.raises(ValueError, match="ratio"):
        warmup_from_ratio(1.5, 10)
