"""The learning-rate schedule: linear warmup, then a half cosine down to a floor.

Lesson 5 reads this file. Fine-tuning starts from weights that already work, and Adam's early
update sizes are poorly calibrated (its moment estimates have seen few gradients), so the first
`warmup_steps` steps ramp the rate up from 0. After that the rate follows half a cosine wave from
`base_lr` down to `min_lr`, so the last steps make small, careful updates.

    step < warmup:   lr = base_lr * step / warmup
    otherwise:       progress = (step - warmup) / (total - warmup)          0 -> 1
                     cosine   = 0.5 * (1 + cos(pi * progress))               1 -> 0
                     lr       = base_lr * (cosine * (1 - r) + r),  r = min_lr / base_lr

"step" is the index (from 0) of the optimizer step that uses the rate: step 0 runs at 0 when
warmup_steps > 0, and the rate is back at base_lr exactly at step == warmup_steps. This equals,
at every step, transformers' `get_cosine_schedule_with_warmup` (min_lr == 0) and
`get_cosine_with_min_lr_schedule_with_warmup(min_lr=...)` wrapped in torch's LambdaLR after
`step` calls of scheduler.step(). Both guard the divisions with max(1, .), so warmup 0 and
warmup == total are fine. Past total_steps the cosine keeps turning and the rate rises again,
as in transformers: a training loop stops at total_steps.
"""
import functools
import math


def lr_at(step, *, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """The learning rate for optimizer step `step` (0-based), as a float."""
    if step < 0 or warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"schedule.py: step, warmup_steps and total_steps must be >= 0, got {step}, {warmup_steps}, {total_steps}")
    if base_lr < 0 or not 0 <= min_lr <= base_lr:
        raise ValueError(f"schedule.py: expected 0 <= min_lr <= base_lr, got min_lr={min_lr}, base_lr={base_lr}")
    if step < warmup_steps:
        return base_lr * (float(step) / float(max(1, warmup_steps)))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    if min_lr > 0:
        # The floor is a fraction of base_lr: the cosine now spans [min_lr/base_lr, 1] instead of [0, 1].
        floor = min_lr / base_lr
        factor = factor * (1 - floor) + floor
    return base_lr * max(0.0, factor)


def warmup_from_ratio(ratio, total_steps):
    """Warmup steps for a warmup given as a fraction of training: ceil(ratio * total_steps).

    Rounding up (transformers' convention) means any ratio > 0 gives at least one warmup step.
    """
    if not 0 <= ratio <= 1:
        raise ValueError(f"schedule.py: warmup ratio must be in [0, 1], got {ratio}")
    return math.ceil(total_steps * ratio)


def plan(cfg, steps_per_epoch):
    """A TrainConfig -> (total_steps, warmup_steps, lr_at): how long the run is, the rate of each step."""
    total_steps = cfg.max_steps or (cfg.epochs or 1) * steps_per_epoch
    warmup = cfg.warmup_steps
    if warmup is None:
        warmup = warmup_from_ratio(cfg.warmup_ratio, total_steps)
    return total_steps, warmup, functools.partial(lr_at, base_lr=cfg.lr, warmup_steps=warmup, total_steps=total_steps,
                                                  min_lr=cfg.min_lr)
