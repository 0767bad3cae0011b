"""One HTML page that shows what a fine-tuning run did: `python -m minisft.report RUN`. Lesson 12 opens it.

    python -m minisft.report runs/06_sft_loop            # -> runs/06_sft_loop/report.html

The page is self-contained (the plot is an inline PNG, the styles are in the page): it opens from the
disk in any browser, with no server and no network. It shows

1. the numbers of the run: steps, final train loss, best validation loss, TRL's token accuracy and
   entropy, read from metrics.jsonl (the source of truth) and printed as they are there;
2. the curves: train and validation loss, mean token accuracy, entropy;
3. the sample answers to the fixed prompts, as they changed over training (samples.jsonl);
4. validation conversations token by token, each target token coloured by its loss before SFT (the
   base model) and after (the run's model), and the masked tokens (prompt, system: no loss) in grey.
   This view is what no tracker shows: the loss of the chat markup (<|im_end|>, the turn structure)
   falls from "never seen" to near zero, while the facts in the answer cost what pretraining made them
   cost; SFT taught the format, not the facts.

What the report needs from the run: metrics.jsonl, and for section 4 the run's settings in its last
checkpoint (base model, validation data, template, train_on) and its final/ model (chat.load).
"""
import argparse
import base64
import html
import io
import json
import os
import sys

import torch

from minisft import chat_template
from minisft.loss import IGNORE_INDEX

# Colour scale of the per-token view: loss 0 -> green, loss >= MAX_LOSS nats -> red.
MAX_LOSS = 8.0
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1150px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-family: monospace; }
.tok { font-family: monospace; white-space: pre-wrap; border-radius: 2px; }
.masked { color: #aaa; background: #f3f3f3; }
.conv { border: 1px solid #ddd; padding: 6px 10px; margin: 6px 0 16px; line-height: 1.9; }
.bad { color: #b00; } .note { color: #666; font-size: 13px; }
"""


def read_jsonl(path):
    """A JSON-lines file -> list of dicts ([] when it does not exist)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(x):
    """How the page prints a number: 4 decimals for a float (4 digits below 0.01), an int as is."""
    if isinstance(x, float):  # a learning rate of 1.5e-4 would print as 0.0001 with 4 decimals
        return f"{x:.4g}" if 0 < abs(x) < 0.01 else f"{x:.4f}"
    return str(x)


def summary(rows):
    """metrics.jsonl rows -> [(label, key, value)] of the numbers the page shows at the top."""
    last = rows[-1]
    evals = [r for r in rows if r.get("val_loss") is not None]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    items = [("optimizer steps", "steps", last["step"] + 1), ("final train loss", "loss", last["loss"])]
    if best:
        items += [("best validation loss", "best_val_loss", best["val_loss"]), ("at step", "best_step", best["step"]),
                  ("last validation loss", "last_val_loss", evals[-1]["val_loss"])]
    for key in ("mean_token_accuracy", "entropy", "num_tokens", "learning_rate", "grad_norm"):
        if last.get(key) is not None:
            items.append((f"last {key}", key, last[key]))
    return items


def curves_png(rows, name):
    """The loss (train and validation), mean token accuracy and entropy -> base64 PNG."""
    from matplotlib.figure import Figure

    from minisft.plot import draw_loss, draw_panel

    panels = [(k, title) for k, title in (("mean_token_accuracy", "mean token accuracy (targets)"),
                                          ("entropy", "entropy of the predictions (nats)"))
              if any(r.get(k) is not None for r in rows)]  # a run older than these metrics has neither
    fig = Figure(figsize=(4.4 * (1 + len(panels)), 3.6))
    fig.subplots_adjust(left=0.15 / (1 + len(panels)), right=0.99, bottom=0.14, top=0.9, wspace=0.22)
    axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
    draw_loss(axes[0], [(name, rows)])
    for ax, (key, title) in zip(axes[1:], panels):
        draw_panel(ax, [(name, rows)], key, title, False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- per-token losses --------------------------------------------------------------------------
@torch.no_grad()
def token_losses(model, ids, labels):
    """ids, labels [T] (unshifted) -> list of T floats: the loss of predicting token i (None where
    labels[i] is masked, and at position 0, which nothing predicts). Same maths as loss.py's."""
    x = torch.tensor([ids])
    logits = model(x, torch.arange(len(ids))[None], None)[0, :-1].float()  # [T-1, V]
    target = torch.tensor(ids[1:])
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]
    return [None] + [float(v) if lab != IGNORE_INDEX else None for v, lab in zip(nll.tolist(), labels[1:])]


def token_texts(tokenizer, text, ids):
    """The text of each token of `text` (tokenized to `ids`), from the tokenizer's character offsets."""
    got, offsets = tokenizer.encode_with_offsets(text)
    if got != ids:  # not the same tokens (cannot happen for a rendered chat): fall back to one decode each
        return [tokenizer.decode([i]) for i in ids]
    return [text[a:b] for a, b in offsets]


def conversation_views(tokenizer, base, tuned, convs, template, train_on):
    """Each conversation -> dict(pieces [(text, before, after)], before, after): the mean target loss of
    the base model and of the tuned one; text of masked tokens has before = after = None."""
    views = []
    for messages in convs:
        ex = chat_template.tokenize_conversation(tokenizer, messages, template, train_on=train_on)
        ids, labels = ex["input_ids"], ex["labels"]
        before, after = token_losses(base, ids, labels), token_losses(tuned, ids, labels)
        texts = token_texts(tokenizer, chat_template.render(messages, template), ids)
        targets = [i for i, b in enumerate(before) if b is not None]
        mean = (lambda xs: sum(xs[i] for i in targets) / max(len(targets), 1))
        views.append({"pieces": list(zip(texts, before, after)), "before": mean(before), "after": mean(after),
                      "n_targets": len(targets), "markup": _split_means(texts, before, after, targets)})
    return views


def _split_means(texts, before, after, targets):
    """Mean target loss before/after over the chat markup (<|im_end|>) and over the answer text."""
    out = {}
    for kind, pick in (("markup", lambda t: t.startswith("<|")), ("text", lambda t: not t.startswith("<|"))):
        idx = [i for i in targets if pick(texts[i])]
        if idx:
            out[kind] = (sum(before[i] for i in idx) / len(idx), sum(after[i] for i in idx) / len(idx), len(idx))
    return out


def _colour(loss):
    """Loss (nats) -> a background from green (0) through yellow to red (>= MAX_LOSS)."""
    hue = 120 * (1 - min(loss, MAX_LOSS) / MAX_LOSS)
    return f"hsl({hue:.0f}, 75%, 78%)"


def tokens_html(pieces, which):
    """One conversation's tokens as spans, coloured by the loss before (which=1) or after (which=2)."""
    out = []
    for piece in pieces:
        text = html.escape(piece[0]).replace("\n", "\u21b5\n")
        loss = piece[which]
        if loss is None:
            out.append(f'<span class="tok masked">{text}</span>')
        else:
            out.append(f'<span class="tok" style="background:{_colour(loss)}" title="loss {loss:.3f}">{text}</span>')
    return "".join(out)


# ---- the page ----------------------------------------------------------------------------------
def _summary_html(rows):
    cells = "".join(f'<tr><th>{html.escape(label)}</th><td class="num" data-key="{key}">{fmt(value)}</td></tr>'
                    for label, key, value in summary(rows))
    return f"<table>{cells}</table>"


def _samples_html(samples):
    if not samples:
        return '<p class="note">No samples.jsonl in this run (--sample-every 0).</p>'
    parts = []
    for p in sorted({s["prompt"] for s in samples}):
        mine = [s for s in samples if s["prompt"] == p]
        rows = "".join(
            f'<tr><td class="num">{s["step"]}</td><td>{html.escape(s["answer"])}</td>'
            f'<td>{"" if s.get("ends_with_im_end") else "<span class=bad>no &lt;|im_end|&gt;</span>"}'
            f'{" <span class=bad>repeats itself</span>" if s.get("repetition") else ""}</td></tr>' for s in mine)
        parts.append(f"<h3>{html.escape(mine[0]['question'])}</h3><table><tr><th>step</th><th>answer</th>"
                     f"<th>flags</th></tr>{rows}</table>")
    return "".join(parts)


def _tokens_section(views, base_name, tuned_name):
    if not views:
        return '<p class="note">No validation conversations shown (the run had no --val-data, or --conversations 0).</p>'
    legend = "".join(f'<span class="tok" style="background:{_colour(v)}">&nbsp;{v:g}&nbsp;</span>'
                     for v in (0, 1, 2, 4, 6, 8))
    parts = [f'<p>Loss per token (nats): {legend} <span class="tok masked">&nbsp;masked: no loss&nbsp;</span>. '
             f"Hover a token for its loss.</p>"]
    for i, v in enumerate(views):
        split = "".join(f'<tr><td>{k}</td><td class="num">{n}</td><td class="num" data-key="conv{i}_{k}_before">'
                        f'{fmt(b)}</td><td class="num" data-key="conv{i}_{k}_after">{fmt(a)}</td></tr>'
                        for k, (b, a, n) in v["markup"].items())
        parts.append(
            f"<h3>conversation {i}</h3><table><tr><th>target tokens</th><th>n</th><th>mean loss before</th>"
            f'<th>after</th></tr><tr><td>all</td><td class="num">{v["n_targets"]}</td>'
            f'<td class="num" data-key="conv{i}_before">{fmt(v["before"])}</td>'
            f'<td class="num" data-key="conv{i}_after">{fmt(v["after"])}</td></tr>{split}</table>'
            f"<p>before SFT ({html.escape(base_name)}):</p><div class=conv>{tokens_html(v['pieces'], 1)}</div>"
            f"<p>after SFT ({html.escape(tuned_name)}):</p><div class=conv>{tokens_html(v['pieces'], 2)}</div>")
    return "".join(parts)


def page(name, rows, samples, views, base_name, tuned_name):
    """The whole HTML page as a string."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>minisft run {html.escape(name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Fine-tuning run: {html.escape(name)}</h1>"
            f"<h2>The numbers (metrics.jsonl)</h2>{_summary_html(rows)}"
            f"<h2>Curves</h2><img alt='loss curves' style='width:100%' "
            f"src='data:image/png;base64,{curves_png(rows, name)}'>"
            f"<h2>Sample answers over training</h2>{_samples_html(samples)}"
            f"<h2>Validation conversations, token by token: before and after SFT</h2>"
            f"{_tokens_section(views, base_name, tuned_name)}</body></html>")


def validation_views(run, n):
    """The per-token views of the first n validation conversations of `run` -> (views, base, tuned)."""
    from minisft.chat import label_of, load
    from minisft.conversations import load_conversations
    from minisft.rundir import saved_config
    from minisft.weights import load_pretrained

    cfg = saved_config(run)
    if not cfg.get("val_data") or n == 0:
        return [], label_of(cfg["model"]), label_of(run)
    convs = load_conversations(cfg["val_data"], cfg.get("skip_bad", False), cfg.get("data_subset"),
                               cfg.get("val_split"))[0][:n]
    tuned, tokenizer, what = load(run, device="cpu")
    base, _ = load_pretrained(cfg["model"], device="cpu")
    template = cfg.get("template") or chat_template.template_for(tokenizer)
    views = conversation_views(tokenizer, base, tuned, convs, template, cfg.get("train_on", "assistant"))
    return views, label_of(cfg["model"]), label_of(what)


def write_report(run, n_conversations=3, out=None):
    """Write RUN/report.html (or `out`); returns its path."""
    from minisft.plot import read_metrics

    rows = read_metrics(run)
    samples = read_jsonl(os.path.join(run, "samples.jsonl"))
    views, base_name, tuned_name = validation_views(run, n_conversations)
    name = os.path.basename(os.path.abspath(run))
    out = out or os.path.join(run, "report.html")
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.write(page(name, rows, samples, views, base_name, tuned_name))
    os.replace(out + ".tmp", out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.report", description="One HTML page about a training run.")
    p.add_argument("run", help="run folder written by python -m minisft.train")
    p.add_argument("--conversations", type=int, default=3, help="validation conversations to show token by token")
    p.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.run):
            raise FileNotFoundError(f"{args.run}: no such run folder")
        path = write_report(args.run, args.conversations, args.out)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
