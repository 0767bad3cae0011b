"""What watches a fine-tuning run: validation loss, sample answers, early stopping, over-fitting.

Lesson 6 shows all four. The training loss alone cannot tell you whether fine-tuning works:

- Validation loss, on conversations the model never trains on, measured every --eval-every steps.
  It is token-weighted like the training loss: (sum of token losses) / (number of targets).
- Early stopping (--patience N): after N evaluations without a better validation loss the run
  stops, and final/ gets the weights of the best evaluation, not the last.
- The over-fitting warning: the gap val_loss - train_loss grows while the train loss keeps
  falling -- the model is learning its training answers by heart instead of the task.
- Sample answers to a few fixed validation prompts every --sample-every steps, checked for the two
  ways a chat model visibly fails: it never writes <|im_end|> (it does not stop), or it ends in a
  loop repeating itself. A loss curve hides both.

train.py calls `Watch.after_step` once per optimizer step; it returns what it measured, and
rundir.py writes it down. What must survive a resume lives in the run's `state` dict.
"""
from contextlib import nullcontext

import torch

from minisft import data
from minisft.distributed import all_reduce_sum
from minisft.generate import generate
from minisft.loss import batch_loss


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device, *, chunked=True, autocast=nullcontext, rank=0, world=1):
    """Token-weighted loss over `examples`: (sum of token losses) / (number of targets), all processes.
    Returns (loss, n_targets)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # little padding
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)][rank::world]
    total, n = 0.0, 0
    for idx in batches:
        batch = data.to_device(data.collate([examples[i] for i in idx], pad_id), device)
        with autocast():
            loss_sum, count = batch_loss(model, batch, chunked)
        total, n = total + float(loss_sum), n + count
    model.train()
    total, n = all_reduce_sum([total, n], device)
    return total / max(n, 1), int(n)


def overfitting(gaps, n):
    """True when the gap val_loss - train_loss grew at each of the last n evaluations AND val loss
    is now above train loss. Early in a run the gap is negative and shrinks towards 0 (the train
    loss averages steps the model has since improved on): growing, but not memorising."""
    gaps = gaps[-(n + 1):]
    return n > 0 and len(gaps) == n + 1 and gaps[-1] > 0 and all(a < b for a, b in zip(gaps, gaps[1:]))


def repetition_loop(ids, min_repeats=3, min_span=8):
    """True when the tokens end in a block repeated back to back (>= min_repeats times, >= min_span
    tokens in all): the model is stuck in a loop. A word or phrase that merely recurs ("29 + 3 = 32,
    so 29 + 3 ...") is not a loop; the check looks at the tail, where a loop runs until the token limit."""
    for k in range(1, len(ids) // min_repeats + 1):
        span = max(min_repeats * k, min_span)
        tail = ids[-span:]
        if len(tail) == span and tail[k:] == tail[:-k]:  # periodic with period k
            return True
    return False


def sample_answers(model, tokenizer, prompts, step, max_new_tokens, autocast=nullcontext, log=print):
    """Greedy answers to the fixed prompts, checked for format and loops -> one record per prompt.
    prompts: (question, rendered prompt text) pairs, as data.sample_prompt gives them."""
    ids = [tokenizer.encode(text) for _, text in prompts]
    with autocast():  # one batched call: generate() left-pads the prompts and uses the KV cache
        answers = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_ids=tokenizer.stop_ids(), use_cache=True)
    records = []
    for i, ((question, _), new) in enumerate(zip(prompts, answers)):
        ok_end = bool(new) and new[-1] == tokenizer.im_end_id
        loop = repetition_loop([t for t in new if t not in tokenizer.stop_ids()])
        records.append({"step": step, "prompt": i, "question": question,
                        "answer": tokenizer.decode(new), "n_tokens": len(new),
                        "ends_with_im_end": ok_end, "repetition": loop})
        flags = ("ok" if ok_end else "no <|im_end|>") + (", repeats itself" if loop else "")
        log(f"  sample {i} [{flags}]: {tokenizer.decode(new)[:160]!r}", flush=True)
    return records


class Watch:
    """Evaluation, early stopping, the over-fitting warning and samples, on the steps the settings ask.

    cfg: the TrainConfig (eval_every, patience, overfit_evals, sample_every, sample_tokens, batch_size).
    val_examples: tokenized validation examples; prompts: (question, prompt text) pairs (may be empty).
    """

    def __init__(self, cfg, model, tokenizer, template, val_examples, prompts, device, autocast,
                 rank=0, world=1, log=print):
        self.cfg, self.model, self.tokenizer, self.template = cfg, model, tokenizer, template
        self.val_examples, self.prompts = val_examples, prompts
        self.device, self.autocast, self.rank, self.world, self.log = device, autocast, rank, world, log
        if cfg.fsdp and val_examples:
            from minisft import fsdp
            fsdp.check_divides(-(-len(val_examples) // cfg.batch_size), world)

    def after_step(self, state, step, loss, n_targets, last):
        """Look at the run after optimizer step `step` (0-based; its train loss and target count).

        Updates `state` (best_val_loss, best_step, bad_evals, gaps, train_since_eval, stop_reason)
        and returns {"val_loss", "val_tokens"} on evaluation steps, {"samples": [...]} on sample
        steps and {"new_best": True} when this evaluation is the best so far."""
        cfg, done, report = self.cfg, step + 1, {}
        s, n = state["train_since_eval"]
        state["train_since_eval"] = [s + loss * n_targets, n + n_targets]
        if self.val_examples and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
            report.update(self._evaluate(state, step))
        # Under --fsdp every forward is a collective: every process generates, rank 0's are kept.
        if self.prompts and (self.rank == 0 or cfg.fsdp) and (done % cfg.sample_every == 0 or last):
            report["samples"] = sample_answers(self.model, self.tokenizer, self.prompts, step, cfg.sample_tokens,
                                               self.autocast, self.log)
        return report

    def _evaluate(self, state, step):
        cfg = self.cfg
        val_loss, val_n = evaluate(self.model, self.val_examples, cfg.batch_size, self.tokenizer.pad_id,
                                   self.device, chunked=cfg.chunked_loss, autocast=self.autocast,
                                   rank=self.rank, world=self.world)
        s, n = state["train_since_eval"]
        train_loss = s / max(n, 1)  # token-weighted train loss since the previous evaluation
        state["train_since_eval"] = [0.0, 0]
        state["gaps"] = (state["gaps"] + [val_loss - train_loss])[-(cfg.overfit_evals + 1):]
        g = state["gaps"]
        self.log(f"eval step {step}: val loss {val_loss:.4f} (train {train_loss:.4f}, gap {g[-1]:+.4f})")
        if overfitting(g, cfg.overfit_evals):
            self.log(f"warning: the val - train gap grew for {cfg.overfit_evals} evaluations in a row "
                     f"({g[0]:+.4f} -> {g[-1]:+.4f}): the model may be memorising the training set "
                     f"(fewer epochs, a lower --lr or --patience help)")
        report = {"val_loss": val_loss, "val_tokens": val_n}
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state.update(best_val_loss=val_loss, best_step=step, bad_evals=0)
            report["new_best"] = True
        else:
            state["bad_evals"] += 1
            if cfg.patience and state["bad_evals"] >= cfg.patience:
                state["stop_reason"] = "early_stopping"
                self.log(f"early stopping: no better val loss for {cfg.patience} evaluations "
                         f"(best {state['best_val_loss']:.4f} at step {state['best_step']})")
        return report
