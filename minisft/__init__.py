"""minisft: a small, readable supervised fine-tuning trainer for SmolLM chat models."""
from minisft.weights import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
