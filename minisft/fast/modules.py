"""The fast twins of model.py's modules, and `apply`, which swaps them in. Lesson 11.

Each twin is a subclass that only overrides `forward`: the same parameters, names and state_dict, so
a checkpoint, LoRA, DDP or the optimizer cannot tell the difference. What changes is how the numbers
are computed, never which numbers: tests/test_fast.py checks outputs and gradients against the plain
model, bit for bit where the maths is the same.

    FastRMSNorm    the norm as RMSNormFn when a backward will follow
    FastAttention  the block's norm and q, k, v as one NormLinearsFn; packed rows per conversation
    FastMLP        the norm and gate, up as one NormLinearsFn; silu * up and down_proj as SwiGLUFn
    FastBlock      hands each norm to the sublayer that reads it, so the two can fuse
    FastSmolLM     gives packed rows their conversation spans (CPU) or a FlexMask (CUDA), not a dense mask

Shapes as in model.py: B batch, T tokens, D hidden_size, I intermediate_size.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minisft.fast.functions import RMSNormFn, SwiGLUFn, autocast_weight, project
from minisft.fast.packed import (FlexMask, attends_per_conversation, attends_with_flex, conversation_spans, flex,
                                 flex_mask, per_conversation)
from minisft.model import MLP, Attention, Block, RMSNorm, SmolLM, right_padded


def backward_follows(*tensors):
    """Will autograd need what this op saves? (No: evaluation, generation, frozen inputs.)"""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class FastRMSNorm(RMSNorm):
    def forward(self, x):  # [..., D] -> [..., D]
        if backward_follows(x, self.weight):
            return RMSNormFn.apply(x, self.weight, self.eps)
        return super().forward(x)  # nothing to save


class FastAttention(Attention):
    def forward(self, x, cos, sin, attn_mask=None, cache=None, norm=None):
        """x [B, T, D] -> [B, T, D]; attn_mask may also be a list of conversation spans or a FlexMask
        (packed.py). norm: the block's RMSNorm, run on x first (functions.project); None when x is
        normalised already."""
        q, k, v = project(norm, (self.q_proj, self.k_proj, self.v_proj), x)
        if isinstance(attn_mask, list):
            q, k, v = self.heads(q, k, v, cos, sin)
            return self.o_proj(per_conversation(q, k, v, attn_mask))
        if isinstance(attn_mask, FlexMask):
            q, k, v = self.heads(q, k, v, cos, sin)
            return self.o_proj(flex(q, k, v, attn_mask))
        return self.attend(q, k, v, cos, sin, attn_mask, cache)


class FastMLP(MLP):
    def forward(self, x, norm=None):  # [..., D] -> [..., D]; norm as in FastAttention
        g, u = project(norm, (self.gate_proj, self.up_proj), x)  # [..., I]
        if not backward_follows(g, u):
            return self.down_proj(F.silu(g) * u)  # nothing to save
        down = self.down_proj
        if type(down) is not nn.Linear or down.bias is not None:
            return down(SwiGLUFn.apply(g, u))  # a LoRA-wrapped or biased down_proj keeps h itself
        return SwiGLUFn.apply(g, u, autocast_weight(down.weight, g))


class FastBlock(Block):
    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        # The same sums as Block.forward; each norm goes in with the layer that reads it, so the
        # two run as one Function (functions.project).
        x = x + self.self_attn(x, cos, sin, attn_mask, cache, norm=self.input_layernorm)
        return x + self.mlp(x, norm=self.post_attention_layernorm)


class FastSmolLM(SmolLM):
    def attn_mask(self, attention_mask, past, T, cache):
        """Packed rows without a cache: their conversation spans on a CPU, a FlexMask on CUDA;
        otherwise model.py's mask."""
        device = self.model.embed_tokens.weight.device  # (lm_head may be LoRA-wrapped)
        if attention_mask is not None and cache is None:
            if attends_with_flex(device):  # right padding too (data.to_device drops those masks on the host)
                return flex_mask(attention_mask)
            if attends_per_conversation(device) and not right_padded(attention_mask):
                spans = conversation_spans(attention_mask)
                if spans:  # None: an id split in two, only a mask says who sees whom
                    return spans
        return super().attn_mask(attention_mask, past, T, cache)


TWINS = {RMSNorm: FastRMSNorm, Attention: FastAttention, MLP: FastMLP, Block: FastBlock, SmolLM: FastSmolLM}


def apply(model):
    """Swap every plain module of `model` for its fast twin, in place -> model.

    Only the class changes (its forward): parameters, buffers and hooks stay as they are, so it may
    come before or after LoRA, freezing or loading weights. Idempotent.
    """
    for m in model.modules():
        if type(m) in TWINS:
            m.__class__ = TWINS[type(m)]
    return model


def is_fast(model):
    """Has apply() run on this model?"""
    return isinstance(model, FastSmolLM)
