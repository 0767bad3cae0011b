"""The model card: final/README.md, in the Hugging Face Hub's format. Lesson 12 shows one.

A model handed on without a card is a folder of numbers: nobody knows what it was trained from, on
what, how, or how well it did. The Hub reads a README.md that starts with YAML front matter

    ---
    base_model: HuggingFaceTB/SmolLM2-135M     # the model page links "fine-tuned from" to it
    datasets: [HuggingFaceTB/smoltalk2]        # and to the data
    library_name: transformers                  # (peft for a LoRA adapter): how to load it
    tags: [minisft, sft]
    pipeline_tag: text-generation
    ---

followed by Markdown. The run writes one into final/ when it ends (rundir.save_final), from what the
run folder holds: the settings of its last checkpoint and its metrics.jsonl (and, once
`python -m minisft.evaluate --model RUN/final --card` has run, its evaluation.json). The Hub accepts only Hub
ids in base_model and datasets: a local folder or file is named in the body instead.

    python -m minisft.model_card RUN       # (re)write RUN/final/README.md, e.g. for an older run
"""
import json
import os
import sys

# The settings a reader needs to repeat the run (the rest is in the checkpoint's state.json).
RECIPE_KEYS = ("template", "train_on", "max_length", "packing", "batch_size", "grad_accum", "lr", "min_lr",
               "warmup_steps", "warmup_ratio", "max_steps", "epochs", "weight_decay", "grad_clip", "seed",
               "lora_r", "lora_alpha", "lora_targets", "freeze_embeddings", "freeze_top_mlps", "dtype")


def hub_id(spec):
    """spec if it names a Hub repo ("owner/name", not a local path), else None."""
    from minisft.config import looks_like_hub_id

    return spec if isinstance(spec, str) and not os.path.exists(spec) and looks_like_hub_id(spec) else None


def _yaml_list(values):
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"  # a JSON string is a YAML string


def front_matter(cfg, adapter):
    """The YAML block: only Hub ids go into base_model and datasets."""
    lines = ["---"]
    base = hub_id(cfg.get("model"))
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    datasets = [d for d in (hub_id(cfg.get("data")), hub_id(cfg.get("val_data"))) if d]
    if datasets:
        lines.append(f"datasets: {_yaml_list(list(dict.fromkeys(datasets)))}")
    lines.append(f"library_name: {'peft' if adapter else 'transformers'}")
    lines.append(f"tags: {_yaml_list(['minisft', 'sft'] + (['lora'] if adapter else []))}")
    lines += ["pipeline_tag: text-generation", "---"]
    return lines


def results(rows):
    """metrics.jsonl rows -> [(what, value)] for the card's results table."""
    last = rows[-1]
    evals = [r for r in rows if r.get("val_loss") is not None]
    out = [("optimizer steps", last["step"] + 1), ("final train loss", f"{last['loss']:.4f}")]
    if last.get("mean_token_accuracy") is not None:
        out.append(("final train mean token accuracy", f"{last['mean_token_accuracy']:.4f}"))
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        out += [("final validation loss", f"{evals[-1]['val_loss']:.4f} (step {evals[-1]['step']})"),
                ("best validation loss", f"{best['val_loss']:.4f} (step {best['step']})")]
    if last.get("num_tokens") is not None:
        out.append(("tokens seen", f"{last['num_tokens']:,}"))
    return out


def _named(spec, what):
    """A Hub id as it is; a local path by its last part only (a card does not show the trainer's disk)."""
    if hub_id(spec):
        return f"`{spec}`"
    return f"`{os.path.basename(os.path.normpath(str(spec)))}` (local {what})"


def weights_stamp(final):
    """final/'s weights files as [[name, bytes, mtime_ns], ...]: an evaluation names the weights it scored,
    so a card never shows the results of weights that a later run replaced."""
    stats = {n: os.stat(os.path.join(final, n)) for n in sorted(os.listdir(final)) if n.endswith(".safetensors")}
    return [[n, st.st_size, st.st_mtime_ns] for n, st in stats.items()]


def evaluation_lines(evaluation):
    """RUN/evaluation.json (python -m minisft.evaluate --card) -> the card's evaluation section."""
    lines = ["", "## Evaluation", "",
             f"`python -m minisft.evaluate` on {_named(evaluation['data'], 'file')}: the model answers each "
             "test conversation's last turn greedily; the rules are in minisft's evaluate.py.", "",
             "| metric | rate | of |", "|---|---:|---:|"]
    for what, (rate, n) in evaluation["metrics"].items():
        what = what.replace("|", "\\|")  # <|im_end|>'s bars would split the table's cells
        lines.append(f"| {what} | {'-' if rate is None else f'{100 * rate:.1f}%'} | {n} |")
    return lines


def card(cfg, rows, adapter, name, evaluation=None):
    """The whole README.md text of a run's final model. evaluation: RUN/evaluation.json's content, or None."""
    lines = front_matter(cfg, adapter) + ["", f"# {name}", ""]
    base = cfg.get("model")
    lines.append(f"Supervised fine-tuning of {_named(base, 'model folder')} with minisft, on "
                 f"{_named(cfg.get('data'), 'file')}" +
                 (f"; validation: {_named(cfg['val_data'], 'file')}." if cfg.get("val_data") else "."))
    if adapter:
        lines += ["", f"This folder is a LoRA adapter (rank {cfg.get('lora_r')}): load it with peft on top of the "
                      f"base model, or merge it with `python -m minisft.lora merge`."]
    if cfg.get("patience"):
        lines += ["", "Early stopping was on: the weights are those of the best validation loss."]
    lines += ["", "## Results", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in results(rows)]
    if evaluation:
        lines += evaluation_lines(evaluation)
    lines += ["", "## Training recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{cfg[k]}` |" for k in RECIPE_KEYS if k in cfg and cfg[k] is not None]
    lines += ["", "## Use", "", "```bash", "python -m minisft.chat THIS_FOLDER", "```", ""]
    return "\n".join(lines)


def card_text(run, adapter, evaluated=True):
    """The card of run folder `run` (adapter: final/ is a LoRA adapter), from the settings of its last
    checkpoint and its metrics.jsonl. rundir.save_final writes it into final/ with the weights, with
    evaluated=False: the new weights have no evaluation yet. Otherwise RUN/evaluation.json comes in when
    it scored the weights final/ holds now (weights_stamp)."""
    from minisft.checkpoint import list_checkpoints, read_state
    from minisft.files import read_json
    from minisft.plot import read_metrics

    ckpts = list_checkpoints(os.path.join(run, "checkpoints"))
    if not ckpts:
        raise FileNotFoundError(f"{run}: no checkpoint in {os.path.join(run, 'checkpoints')} (its settings make the card)")
    evaluation = os.path.join(run, "evaluation.json")  # python -m minisft.evaluate --card
    evaluation = read_json(evaluation) if evaluated and os.path.isfile(evaluation) else None
    if evaluation and evaluation.get("weights") != weights_stamp(os.path.join(run, "final")):
        evaluation = None  # it scored weights that final/ no longer holds
    return card(read_state(ckpts[-1])["config"], read_metrics(run), adapter, os.path.basename(os.path.abspath(run)),
                evaluation)


def write_card(run):
    """Write RUN/final/README.md (replacing one) -> its path. For a run older than the cards."""
    from minisft.files import replace_file

    final = os.path.join(run, "final")
    if not os.path.isdir(final):
        raise FileNotFoundError(f"{final}: no such folder (the run has not finished)")
    text = card_text(run, os.path.isfile(os.path.join(final, "adapter_config.json")))
    path = os.path.join(final, "README.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    replace_file(path + ".tmp", path)
    return path


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m minisft.model_card RUN", file=sys.stderr)
        return 2
    try:
        print(f"wrote {write_card(args[0])}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
