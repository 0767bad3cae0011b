"""The optimizer and what it moves: AdamW's parameter groups, and the parts of the model that stay frozen.

    param_groups             weight decay on the linear layers' matrices only
    make_optimizer           AdamW over those groups (train.py sets each step's lr, schedule.py)
    freeze_text_embeddings   the text tokens keep their pretrained embedding rows (--freeze-embeddings)
    freeze_top_mlps          the MLPs of the last n blocks keep their pretrained weights (--freeze-top-mlps)

Lesson 6 builds the optimizer by hand; lesson 10 measures what the two freezes change. Either way
AdamW never changes a frozen weight: a zeroed gradient row keeps AdamW's moments at 0 (and the
embedding is in the group without weight decay); a parameter with requires_grad False gets no
gradient and is left out of the groups.
"""
import torch


def freeze_text_embeddings(model, trainable_ids):
    """Let only the rows `trainable_ids` of the token embedding (and of lm_head) learn. Lesson 10.

    Why: SFT asks about some subjects and not others. When every row may move, the rows of the tokens
    the SFT data uses (the names it asks about) drift towards what the chat answers need, while the
    rows of names it never shows stay where pretraining put them. The blocks then adapt to the moved
    rows, and a question about a name SFT never showed falls back on a name it did show. Frozen, every
    name keeps the representation pretraining gave it, so what the blocks learn about answering
    applies to all of them. The chat markup (<|im_start|>, <|im_end|>, <think>, ...) is new to a base
    model: its rows must learn, so they stay trainable.

    A gradient hook multiplies the [V, d] gradient by a [V, 1] mask of 0s and 1s: the other rows'
    gradient is 0, AdamW's moments stay 0 there and the embedding is in the group without weight
    decay (param_groups), so those rows never change.
    """
    for p in {id(p): p for p in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():  # tied: once
        rows = torch.zeros(p.shape[0], 1, device=p.device, dtype=p.dtype)  # [V, 1]: 1 where a row learns
        rows[[i for i in trainable_ids if i < p.shape[0]]] = 1
        p.register_hook(lambda grad, rows=rows: grad * rows)


def freeze_top_mlps(model, n):
    """Keep the MLPs of the last n decoder blocks as pretraining left them. Lesson 10.

    Why: an MLP works as a key-value memory (its first matrices match a pattern of the hidden state,
    its last one writes what goes with it), and an upper block's MLP writes close to the output.
    Trained on the same few questions again and again, the upper MLPs learn the seen answers by heart,
    whole: asked about an animal SFT never showed, the model writes the colour pretraining stored for
    it, but attached to a seen animal of that colour, whose answer sentence the MLPs now hold. Frozen,
    they keep what pretraining put there; attention and the lower blocks still learn the chat format
    and how to reach a stored fact. With lesson 6's recipe more held-out facts come out right in chat
    (docs/ablations.md has the numbers).

    Frozen weights have requires_grad False: no gradient is computed for them and AdamW never sees
    them (param_groups leaves them out).
    """
    layers = model.model.layers
    if n > len(layers):
        raise ValueError(f"--freeze-top-mlps={n}: expected at most {len(layers)} (the model has {len(layers)} decoder blocks)")
    for block in list(layers)[len(layers) - n:]:
        block.mlp.requires_grad_(False)


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on the weight matrices of the linear layers, nowhere else.

    - RMSNorm gains are scales whose natural value is 1; decay would pull them towards 0.
    - Biases (when a model has them) are offsets; decaying them buys nothing.
    - The embedding (tied to lm_head in SmolLM) is indexed by token. AdamW's decay is decoupled:
      it shrinks every row by lr * wd at every step, gradient or not. Rows of tokens the SFT data
      never uses would fade away, drifting from the pretrained model for no reason.

    Frozen parameters (the base model under LoRA) are left out: AdamW never sees them.
    """
    vocab = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters lists a tied tensor once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in vocab else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, cfg, lr, device_type):
    """AdamW over param_groups(model). On CUDA the fused kernel updates every tensor of a group in
    one launch, where PyTorch's default there would launch several kernels per step for each group;
    elsewhere PyTorch's default (on the CPU, a loop over the tensors, whose temporaries are the size
    of one tensor). The maths is the same: tests/test_train.py compares one step of each."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, fused=True if device_type == "cuda" else None)
