"""minisft: a small, readable supervised fine-tuning trainer for SmolLM chat models.

`from minisft import load_pretrained, save_pretrained` works; the import is lazy so that the pure-Python
modules (chat_template, data loading) can be used without loading torch.
"""
from minisft.fast import heap

heap.use_huge_pages()  # before torch allocates anything: large CPU tensors in 2 MB pages (fast/heap.py)

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name):
    if name in __all__:
        from minisft import weights
        return getattr(weights, name)
    raise AttributeError(f"module 'minisft' has no attribute {name!r}")
