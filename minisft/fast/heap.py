"""Why a CPU run's resident memory is more than its tensors, and the one setting minisft changes.

Lesson 11. On a CPU every tensor comes from the C library's malloc, and a freed tensor's memory stays
in its heap for the next request. A training step makes thousands of tensors, so the holes between
activations that are still alive fill with whatever fits, and the process's resident memory (what a
laptop runs out of) grows past what its live tensors need.

The setting: PyTorch's own switch THP_MEM_ALLOC_ENABLE=1 starts every CPU tensor of 2 MB or more on
a 2 MB boundary in huge pages, so the large tensors sit in whole pages of their own. It changes where
tensors live, never a number they hold. PyTorch reads it once, at its first allocation, so
`minisft/__init__.py` sets it before torch is imported, unless you set it yourself (0 turns it off);
child processes inherit it. Elsewhere than Linux it does nothing. docs/heap.md has the measurements,
and the malloc settings that were tried and left out.
"""
import os

HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # PyTorch's switch (c10's alloc_cpu reads it on its first allocation)
set_by_minisft = False  # True once use_huge_pages() set the variable (the user had not)


def use_huge_pages():
    """Turn PyTorch's huge-page allocations on, unless the environment already says either way.
    Must run before torch allocates its first tensor (minisft/__init__.py calls it first thing)."""
    global set_by_minisft
    if HUGE_PAGES not in os.environ:
        os.environ[HUGE_PAGES] = "1"
        set_by_minisft = True
