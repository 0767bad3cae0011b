"""A thin wrapper over `tokenizers.Tokenizer` (the tokenizer.json of a Hugging Face model).

Lesson 2 uses it. What it adds to the library: special-token ids by name, the chat template
and the special-token strings from tokenizer_config.json, and no hidden BOS. `encode` never
adds a token the text did not spell: what you see rendered is exactly what gets tokenized.
"""
import json
import os

from tokenizers import Tokenizer as _HFTokenizer

CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


class Tokenizer:
    """tokenizer.json + the few fields of tokenizer_config.json that a trainer needs."""

    def __init__(self, tk, config=None):
        self.tk = tk
        self.config = dict(config or {})
        self.chat_template = self.config.get("chat_template")
        vocab = tk.get_vocab(with_added_tokens=True)
        self.eos_token = _token_str(self.config.get("eos_token")) or _first_in(vocab, ("<|im_end|>", "<|endoftext|>"))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.pad_token = _token_str(self.config.get("pad_token")) or self.eos_token
        # Strings that the tokenizer turns into one control token wherever they appear.
        self.special_tokens = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
        # Ids of every token added on top of the learned vocabulary: the chat markup (<|im_start|>,
        # <|im_end|>, <think>, ...) and other control tokens; plain text never produces them.
        self.added_ids = sorted(tk.get_added_tokens_decoder())

    # ---- loading and saving -------------------------------------------------------------
    @classmethod
    def from_dir(cls, path):
        """Load `path/tokenizer.json` (+ `tokenizer_config.json` when present)."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{tj}: no tokenizer.json in this folder")
        try:
            tk = _HFTokenizer.from_file(tj)
        except Exception as e:  # the tokenizers error names no file: add it
            raise ValueError(f"{tj}: not a valid tokenizer.json ({e})") from None
        config = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            try:
                with open(tc, encoding="utf-8") as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{tc}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return cls(tk, config)

    def save(self, out_dir, chat_template=None):
        """Write tokenizer.json and a tokenizer_config.json that `transformers.AutoTokenizer` reads."""
        self.tk.save(os.path.join(out_dir, "tokenizer.json"))
        config = dict(self.config)
        config.pop("added_tokens_decoder", None)  # rebuilt by transformers from tokenizer.json
        config.update({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
        })
        if self.bos_token:
            config["bos_token"] = self.bos_token
        template = chat_template if chat_template is not None else self.chat_template
        if template is not None:
            config["chat_template"] = template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # ---- encoding -----------------------------------------------------------------------
    def encode(self, text):
        """str -> list[int]. Special-token strings in `text` become their control ids; no BOS/EOS is added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        """str -> (ids, offsets): offsets[i] = (start, end) character span of token i in `text`."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        i = self.tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in this tokenizer's vocabulary")
        return i

    def id_to_token(self, i):
        return self.tk.id_to_token(int(i))

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self):
        return self.token_to_id(self.eos_token)

    @property
    def pad_id(self):
        return self.token_to_id(self.pad_token)

    @property
    def im_start_id(self):
        return self.token_to_id("<|im_start|>")

    @property
    def im_end_id(self):
        return self.token_to_id("<|im_end|>")

    def check_fits(self, vocab_size, source, needs=()):
        """Raise ValueError when this tokenizer cannot drive a model with `vocab_size` embedding rows.

        Checked when a model is loaded, not at the first training step: an id at or above
        vocab_size would fail deep inside the embedding lookup as a bare IndexError, and a missing
        special token (the eos or pad named in tokenizer_config.json, or `needs`, e.g. the chat
        template's <|im_start|> <|im_end|>) would fail later still. `source` names the folder."""
        vocab = self.tk.get_vocab(with_added_tokens=True)
        token, top = max(vocab.items(), key=lambda kv: kv[1])
        if top >= vocab_size:
            raise ValueError(f"{source}: tokenizer.json has token {token!r} with id {top}, but the model has only "
                             f"{vocab_size} embedding rows (config.json vocab_size): this tokenizer does not "
                             f"belong to this model")
        named = [(w, t) for w, t in (("eos_token", self.eos_token), ("pad_token", self.pad_token)) if t is not None]
        for what, tok in named + [("chat template token", t) for t in needs]:
            if tok not in vocab:
                raise ValueError(f"{source}: the {what} {tok!r} is not in tokenizer.json's vocabulary "
                                 f"(tokenizer_config.json names it, or the chat template needs it)")

    def stop_ids(self):
        """Ids that end an assistant turn: eos and `<|im_end|>` (the same id for SmolLM2)."""
        ids = {self.eos_id}
        if self.tk.token_to_id("<|im_end|>") is not None:
            ids.add(self.im_end_id)
        return sorted(ids)


def _token_str(tok):
    # tokenizer_config.json stores special tokens either as a string or as {"content": ...}.
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _first_in(vocab, names):
    for n in names:
        if n in vocab:
            return n
    return None
