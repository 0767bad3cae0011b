"""minisft's speed layer: the same model, computed with less memory and time. Lesson 11.

model.py is the model a student reads, in plain ops. Everything that exists only for speed or memory
lives here, apart from it, and is applied to a plain model by one call:

    fast.apply(model)     swaps model.py's modules for their fast twins, in place (modules.py)

The trainer calls it unless told `--no-fast`; tests/test_fast.py proves the fast model gives the same
outputs and gradients as the plain one. docs/speed.md holds the measurements.

    functions.py  hand-written backwards: RMSNormFn, NormLinearsFn, SwiGLUFn
    packed.py     packed rows attend one conversation at a time (on a CPU)
    modules.py    the fast twins of RMSNorm, Attention, MLP, Block and SmolLM, and apply()
    heap.py       the CPU huge-page switch, set before torch loads

This file imports no torch: minisft/__init__.py imports heap.py from this package before torch
allocates anything.
"""


def apply(model):
    """model (a model.SmolLM) -> the same model, its modules swapped for their fast twins (modules.apply)."""
    from minisft.fast import modules  # torch comes in here, after heap.py's switch
    return modules.apply(model)
