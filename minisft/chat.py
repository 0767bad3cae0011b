"""Talk to a model in the terminal, and put it beside another one. Lesson 12 uses it.

    python -m minisft.chat runs/06_sft_loop                       # a run folder: its final/ model
    python -m minisft.chat runs/06_sft_loop --compare data/base-model   # tuned and base, side by side
    python -m minisft.chat HuggingFaceTB/SmolLM2-135M-Instruct -p "What is 2 + 3?"   # answer once, exit

What it teaches:
- A chat is a list of messages that grows by two at every turn; each answer re-renders the whole
  list with the model's own template (chat_template.py) and generates from it (generate.py). The
  model remembers nothing between turns: the history is the memory, and /clear forgets it.
- Streaming is the same greedy or sampled loop as generate(), with a callback that prints each
  token as it is chosen. A token can be a piece of a UTF-8 character: the text is decoded from all
  the tokens so far and printed only once it no longer ends in half a character.
- Comparing base and tuned on the same message shows what SFT changed: the base model continues the
  text, the tuned one answers and stops at <|im_end|>.

What it reads (`load`): a run folder (its final/; without one, its best or latest checkpoint), a model
folder, a LoRA adapter folder (weights.load_pretrained applies it to its base) or a Hub id.

Commands in the session: /system TEXT, /think, /no_think, /clear, /help, /quit. Ctrl-C stops an
answer (that turn is dropped from the history) and keeps the session; Ctrl-D (end of input) exits.
/think and /no_think: SmolLM3's template has a reasoning switch (enable_thinking); the other formats
take the flag as text at the end of the system prompt, as the course data does (lesson 8).
"""
import argparse
import itertools
import os
import shutil
import sys
import textwrap

import torch

from minisft import chat_template
from minisft.generate import generate

HELP = """commands:
  /system TEXT   set the system prompt (empty: none) and start a new conversation
  /think         reasoning mode on (SmolLM3: enable_thinking; other formats: /think in the system prompt)
  /no_think      reasoning mode off
  /clear         forget the conversation (the system prompt and the mode stay)
  /quit          exit (so does Ctrl-D); Ctrl-C stops an answer"""
# The system prompt a /think or /no_think flag is appended to when the user set none (lesson 8's).
FLAG_SYSTEM = "You are a helpful assistant."


# ---- what to load ------------------------------------------------------------------------------
def _is_run_folder(path):
    return any(os.path.exists(os.path.join(path, n)) for n in ("metrics.jsonl", "checkpoints", "final"))


def _from_checkpoint(run, device, dtype):
    """A run folder without final/: the base model with the weights of its best checkpoint
    (--patience) or else of its latest one -> (model, tokenizer, what)."""
    from minisft.checkpoint import list_checkpoints, load_weights, read_state
    from minisft.lora import add_lora
    from minisft.weights import load_pretrained

    ckpts = list_checkpoints(os.path.join(run, "checkpoints"))
    if not ckpts:
        raise FileNotFoundError(f"{run}: a run folder with no final/ and no checkpoint yet: nothing to chat with")
    cfg = read_state(ckpts[-1])["config"]
    best = os.path.join(run, "checkpoints", "best.safetensors")
    weights = best if os.path.isfile(best) else os.path.join(ckpts[-1], "model.safetensors")
    model, tokenizer = load_pretrained(cfg["model"], dtype=dtype, device=device)
    if cfg.get("lora_r"):  # the checkpoint holds the adapters only
        add_lora(model, cfg["lora_r"], cfg["lora_alpha"], 0.0, cfg["lora_targets"])
    load_weights(model, weights)
    return model.eval(), tokenizer, weights


def load(spec, device=None, dtype=None):
    """A run folder, model folder, adapter folder or Hub id -> (model, tokenizer, what was loaded).

    Raises FileNotFoundError / ValueError with a one-line message for anything else."""
    from minisft.weights import load_pretrained

    path = os.path.expanduser(spec)
    first = path.split("/")[0]
    if not os.path.exists(path) and (path.startswith((".", "/")) or (first and os.path.isdir(first))):
        raise FileNotFoundError(f"{spec}: no such folder")  # a path under a local folder, not a Hub id
    if os.path.isdir(path) and _is_run_folder(path):
        final = os.path.join(path, "final")
        if not os.path.isdir(final):
            return _from_checkpoint(path, device, dtype)
        path = final
    model, tokenizer = load_pretrained(path, dtype=dtype, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{spec}: no tokenizer.json next to the weights (a chat needs the tokenizer)")
    return model, tokenizer, path


def label_of(spec):
    """A short name for a column header: the last two parts of a path, or the Hub id."""
    parts = os.path.normpath(spec).split(os.sep)
    return "/".join(parts[-2:]) if len(parts) > 1 else spec


# ---- one model's side of a conversation --------------------------------------------------------
class Bot:
    """A model, its tokenizer and template, and the conversation it has had so far."""

    def __init__(self, model, tokenizer, template, label):
        self.model, self.tokenizer, self.template, self.label = model, tokenizer, template, label
        self.turns = []  # user and assistant messages, alternating

    def messages(self, system, think):
        """The history as chat messages, with the system prompt and the reasoning flag applied."""
        if self.template != "smollm3" and think is not None:
            system = f"{system or FLAG_SYSTEM} {'/think' if think else '/no_think'}"
        return ([{"role": "system", "content": system}] if system else []) + self.turns

    def prompt_ids(self, system, think):
        """The token ids of the whole conversation, ending in the header of the next answer."""
        text = chat_template.render(self.messages(system, think), self.template, add_generation_prompt=True,
                                    enable_thinking=think)
        return self.tokenizer.encode(text)

    def answer(self, system, think, sampling, on_text=None):
        """Generate the next answer to the history -> its text (special tokens dropped).

        on_text(new_text) is called with each piece of text as soon as it is whole (streaming).
        A Ctrl-C (KeyboardInterrupt) propagates; the history is left unchanged then."""
        ids = self.prompt_ids(system, think)
        new, shown = [], [""]

        def on_token(_row, token):
            new.append(token)
            if on_text is None:
                return
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # not half a UTF-8 character: show what is new
                on_text(text[len(shown[0]):] if text.startswith(shown[0]) else text)
                shown[0] = text

        generate(self.model, ids, stop_ids=self.tokenizer.stop_ids(), on_token=on_token, **sampling)
        return self.tokenizer.decode(new, skip_special_tokens=True)


def columns(left, right, width):
    """Two texts side by side, each wrapped to half of `width` characters -> list of lines."""
    w = max((width - 3) // 2, 10)

    def wrap(text):
        return [piece for line in text.split("\n") for piece in (textwrap.wrap(line, w) or [""])]

    rows = itertools.zip_longest(wrap(left), wrap(right), fillvalue="")
    return [f"{a:<{w}} | {b}".rstrip() for a, b in rows]


# ---- the session -------------------------------------------------------------------------------
class Session:
    """The state the commands change (system prompt, reasoning mode) and the bots that answer."""

    def __init__(self, bots, sampling, system=None, think=None, out=sys.stdout, width=None):
        self.bots, self.sampling, self.system, self.think, self.out = bots, sampling, system, think, out
        self.width = width or shutil.get_terminal_size((100, 24)).columns

    def say(self, text=""):
        print(text, file=self.out, flush=True)

    def command(self, line):
        """A line starting with "/": change the settings; False for /quit."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/clear":
            for b in self.bots:
                b.turns = []
            self.say("(conversation cleared)")
        elif name == "/system":
            self.system = arg.strip() or None
            for b in self.bots:
                b.turns = []
            self.say(f"(system prompt: {self.system!r}; conversation cleared)")
        elif name in ("/think", "/no_think"):
            self.think = name == "/think"
            how = ("enable_thinking" if b.template == "smollm3" else "a flag in the system prompt" for b in self.bots)
            self.say(f"(reasoning {'on' if self.think else 'off'}: {', '.join(sorted(set(how)))})")
        else:
            self.say(f"unknown command {name} (/help lists them)")
        return True

    def turn(self, question):
        """Answer one user message with every bot; a Ctrl-C drops the whole turn from the history.
        Returns False when the turn was stopped (Ctrl-C) or failed."""
        for b in self.bots:
            b.turns.append({"role": "user", "content": question})
        try:
            if len(self.bots) == 1:
                text = self.bots[0].answer(self.system, self.think, self.sampling, on_text=self._stream)
                self.say()
                answers = [text]
            else:
                answers = [b.answer(self.system, self.think, self.sampling) for b in self.bots]
                lines = columns(self.bots[0].label, self.bots[1].label, self.width)
                self.say("\n".join(lines + ["-" * min(self.width, 2 * max(map(len, lines)))]))
                self.say("\n".join(columns(answers[0], answers[1], self.width)))
        except KeyboardInterrupt:
            self.say(" [stopped: this turn is not kept]")
            answers = None
        except ValueError as e:  # e.g. the conversation no longer fits in the model's context
            self.say(f"error: {e} (/clear starts a new conversation)")
            answers = None
        for b, a in zip(self.bots, answers or [None] * len(self.bots)):
            if a is None:
                b.turns.pop()
            else:
                b.turns.append({"role": "assistant", "content": a})
        return answers is not None

    def _stream(self, text):
        self.out.write(text)
        self.out.flush()

    def run(self, lines):
        """Read user lines until /quit or the end of input (Ctrl-D)."""
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.turn(line)


def read_lines(interactive):
    """The user's lines; on a terminal with a "> " prompt, where Ctrl-C clears the line instead of exiting."""
    if interactive:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
    while True:
        try:
            yield input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit exits)", flush=True)


# ---- the command line --------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog="python -m minisft.chat", description="Chat with a model in the terminal.")
    p.add_argument("model", help="run folder, model folder, LoRA adapter folder or Hub id")
    p.add_argument("--compare", metavar="OTHER", help="a second model answering each message, side by side")
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--think", dest="think", action="store_true", default=None, help="start in reasoning mode")
    mode.add_argument("--no-think", dest="think", action="store_false", help="start with reasoning off")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 to sample")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set reaching this probability")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling (repeatable answers)")
    p.add_argument("--template", choices=chat_template.TEMPLATES, help="chat format (default: the tokenizer's)")
    p.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    return p


def make_bot(spec, args):
    model, tokenizer, _ = load(spec, device=args.device, dtype=args.dtype)
    template = args.template
    if template is None:
        try:
            template = chat_template.template_for(tokenizer)
        except ValueError:
            raise ValueError(f"{spec}: its chat template is not SmolLM2, SmolLM3 or ChatML; choose one with "
                             f"--template ({', '.join(chat_template.TEMPLATES)})") from None
    return Bot(model, tokenizer, template, label_of(spec))


def main(argv=None):
    args = build_parser().parse_args(argv)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    try:
        for what, bad in (("--temperature", args.temperature < 0), ("--max-new-tokens", args.max_new_tokens < 1),
                          ("--top-k", args.top_k is not None and args.top_k < 1),
                          ("--top-p", args.top_p is not None and not 0 < args.top_p <= 1)):
            if bad:
                raise ValueError(f"{what}: out of range (temperature >= 0, max-new-tokens >= 1, top-k >= 1, "
                                 f"0 < top-p <= 1)")
        bots = [make_bot(s, args) for s in [args.model] + ([args.compare] if args.compare else [])]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    session = Session(bots, sampling, system=args.system, think=args.think)
    if args.prompt is not None:
        return 0 if session.turn(args.prompt) else 1
    interactive = sys.stdin.isatty()
    names = " and ".join(f"{b.label} ({b.template})" for b in bots)
    print(f"chatting with {names}. /help lists the commands; Ctrl-D exits.", file=sys.stderr, flush=True)
    torch.set_grad_enabled(False)
    session.run(read_lines(interactive))
    return 0


if __name__ == "__main__":
    sys.exit(main())
