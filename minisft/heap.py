"""Why a CPU run's resident memory is more than its tensors, and the one setting minisft changes.

Read with lesson 11. On the CPU, PyTorch asks the C library's malloc for every tensor. A training
step allocates thousands of them: the activations one micro-batch keeps until its backward, and
short-lived temporaries (a matmul's output, a gradient on its way) between them. glibc's malloc
serves all but the largest from one heap, and a freed tensor's memory stays in that heap for the
next request instead of going back to the system. The holes between activations that are still
alive can only be reused by tensors that fit into them, so the process's resident memory (RSS,
what a laptop runs out of) grows past what its live tensors need.

The setting: huge pages for large tensors. PyTorch's own switch THP_MEM_ALLOC_ENABLE=1 makes every
CPU tensor of 2 MB or more start on a 2 MB boundary and asks Linux to back it with 2 MB pages, so
the large tensors sit in whole pages of their own and fewer small ones fill the gaps between them.
Measured in a bare training loop on SmolLM2-135M, float32, 4 x 2 micro-batches of 680 tokens, 2
cores: peak RSS 7.6 GB without, 6.8 GB with it, at the same step time (the README's benchmark
section has the trainer's numbers).
PyTorch reads the variable once, when it first allocates, so `minisft/__init__.py` sets it before
torch is imported, unless you set it yourself (THP_MEM_ALLOC_ENABLE=0 turns it off). It reaches
programs that import minisft before torch, like `python -m minisft.train`; child processes inherit
it (minisft.bench sets it to 0, PyTorch's default, for TRL's runs, which it runs as shipped).
Elsewhere than Linux the variable does nothing. It changes where tensors live, never a number they
hold.
train.sft_step does its part too: it zeroes the gradients in place rather than freeing them, so they
are made once and do not come back in the middle of a backward, into a heap the activations have cut
up.

Measured and left out, in the same setting:
  - malloc_trim(0) before every micro-batch (glibc hands the free pages inside its heap back):
    peak 5.9-6.2 GB instead of 6.7 (huge pages on in both), but 52 s a step instead of 41.5, as the
    forward then takes every page back through a page fault that zeroes it.
  - MALLOC_MMAP_THRESHOLD_=1048576 (every block of 1 MB or more mapped on its own, unmapped when
    freed): peak 5.7 GB, but every large temporary arrives as fresh zeroed pages, 9 million page
    faults a step; 35% slower with huge pages on as well.
  - MALLOC_ARENA_MAX=1: no change (the step's tensors come from one thread's heap already).
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
