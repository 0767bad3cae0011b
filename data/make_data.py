"""Generate minisft's shipped data: a pretraining corpus and a small chat dataset.

    python data/make_data.py [--out DIR] [--seed 0]

Writes corpus.txt (raw text, no chat markup: the default base model is pretrained on it) and
sft_train.jsonl / sft_val.jsonl / sft_test.jsonl (conversations in the "messages" format).

The world is tiny on purpose, so a model of a few million parameters learns it on a laptop CPU:
  - facts about made-up things: the capitals of fictional countries, the colours of fictional
    animals, the inventors of fictional inventions, each stated in the corpus in several phrasings;
  - small-number arithmetic (+, -, *) with short worked steps.
A quarter of the facts appear in the corpus but in NO train/val conversation: the test questions
about them ("fact_unseen") show whether fine-tuning taught a format that reaches knowledge the
model got in pretraining, or only the answers it was shown.

Everything comes from one seeded random.Random, so the same seed rebuilds the same bytes.
"""
import argparse
import json
import os
import random

SEED = 0
N_TRAIN, N_VAL, N_TEST = 3000, 200, 200
UNSEEN_FRACTION = 0.25  # share of each kind of fact kept out of every train/val conversation

# ---- the fictional world ------------------------------------------------------------------

COUNTRY_HEADS = ["Zel", "Kor", "Mel", "Tash", "Bri", "Dor", "Fen", "Gal", "Hal", "Ith", "Jor", "Lun",
                 "Nor", "Pel", "Quen", "Ros", "Sel", "Tor", "Ul", "Vel", "Wyn", "Yar", "Cal", "Ember"]
COUNTRY_TAILS = ["nia", "mar", "dova", "land", "ria", "via", "esh", "ora"]
CITY_HEADS = ["Kel", "Bram", "Dun", "Tir", "Al", "Mor", "Sar", "Eld", "Fal", "Gor", "Lin", "Nes",
              "Pra", "Rav", "Sol", "Tem", "Vos", "Hag", "Ker", "Wil"]
CITY_TAILS = ["ter", "mouth", "ford", "holm", "ven", "dale", "wick", "burg", "ton", "mere"]
ANIMAL_HEADS = ["glimmer", "dusk", "moss", "thorn", "ember", "frost", "marsh", "cinder", "velvet",
                "storm", "pebble", "bramble", "ripple", "quill", "dapple", "ash"]
ANIMAL_TAILS = ["fox", "owl", "newt", "hare", "moth", "crab", "lark", "toad", "wren", "mole", "yak", "finch"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "white", "black",
           "grey", "pink", "brown", "teal"]
THING_HEADS = ["sky", "wind", "cloud", "star", "tide", "rain", "sun", "moon", "echo", "glass", "spark", "river"]
THING_TAILS = ["loom", "lamp", "compass", "bell", "wheel", "kettle", "lens", "clock", "pump", "harp", "ladder", "sail"]
FIRST_NAMES = ["Mira", "Tobin", "Elsa", "Orrin", "Pella", "Dax", "Ilse", "Corin", "Nadia", "Bram",
               "Lio", "Sefa", "Rune", "Talia", "Ves", "Alma"]
SURNAME_HEADS = ["Tal", "Quor", "Bel", "Ash", "Dun", "Fair", "Hol", "Kes", "Lor", "Mar", "Net", "Pry"]
SURNAME_TAILS = ["ven", "row", "mont", "grove", "lock", "lin", "trel", "by"]

N_COUNTRIES, N_ANIMALS, N_INVENTIONS = 48, 40, 40


def _unique_names(rng, heads, tails, n, taken):
    """n distinct head+tail names, none already in `taken` (which is updated)."""
    pairs = [(h, t) for h in heads for t in tails]
    rng.shuffle(pairs)
    out = []
    for h, t in pairs:
        name = h + t
        if name in taken:
            continue
        taken.add(name)
        out.append(name)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct names available, wanted {n}")


def make_facts(rng):
    """-> list of fact dicts {relation, subject, answer, seen}; 'seen' = may appear in SFT train/val."""
    taken = {"Varnia", "Oster"}
    countries = ["Varnia"] + _unique_names(rng, COUNTRY_HEADS, COUNTRY_TAILS, N_COUNTRIES - 1, taken)
    cities = ["Oster"] + _unique_names(rng, CITY_HEADS, CITY_TAILS, N_COUNTRIES - 1, taken)
    animals = _unique_names(rng, ANIMAL_HEADS, ANIMAL_TAILS, N_ANIMALS, taken)
    things = _unique_names(rng, THING_HEADS, THING_TAILS, N_INVENTIONS, taken)
    # Every inventor has a surname of their own, so no two answers differ by a first name only.
    surnames = _unique_names(rng, SURNAME_HEADS, SURNAME_TAILS, N_INVENTIONS, taken)
    people = [f"{rng.choice(FIRST_NAMES)} {s}" for s in surnames]
    facts = [dict(relation="capital", subject=c, answer=x) for c, x in zip(countries, cities)]
    facts += [dict(relation="colour", subject=a, answer=rng.choice(COLOURS)) for a in animals]
    facts += [dict(relation="inventor", subject=t, answer=p) for t, p in zip(things, people)]
    # Hold out a fixed share of each relation. Varnia stays seen: it is the README's example.
    for rel in ("capital", "colour", "inventor"):
        group = [f for f in facts if f["relation"] == rel and f["subject"] != "Varnia"]
        unseen = set(f["subject"] for f in rng.sample(group, round(UNSEEN_FRACTION * len(group))))
        for f in facts:
            if f["relation"] == rel:
                f["seen"] = f["subject"] not in unseen
    return facts


# ---- sentences about a fact ----------------------------------------------------------------

CORPUS_PHRASES = {
    "capital": [
        "The capital of {s} is {a}.",
        "{a} is the capital of {s}.",
        "{s} is a country, and its capital city is {a}.",
        "The government of {s} meets in {a}, the capital.",
        "Travellers to {s} often begin in {a}, the capital city of {s}.",
        "Many people live in {a}, which is the capital of {s}.",
        "What is the capital of {s}? The capital of {s} is {a}.",
        "In {s}, the largest city is {a}, and {a} is also the capital.",
    ],
    "colour": [
        "The {s} is {a}.",
        "The colour of the {s} is {a}.",
        "A {s} is an animal with {a} fur.",
        "If you see a {a} animal in the forest, it may be a {s}.",
        "The {s} is a small animal. Its colour is {a}.",
        "What colour is the {s}? The {s} is {a}.",
        "Every {s} is {a}, from head to tail.",
        "Children like the {s} because it is {a}.",
    ],
    "inventor": [
        "The {s} was invented by {a}.",
        "{a} invented the {s}.",
        "The inventor of the {s} was {a}.",
        "{a} is famous for inventing the {s}.",
        "Who invented the {s}? The {s} was invented by {a}.",
        "Long ago, {a} built the first {s}.",
        "The first {s} was made by {a} in a small workshop.",
        "We have the {s} thanks to its inventor, {a}.",
    ],
}

QUESTIONS = {
    "capital": ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital of {s}.",
                "What's the capital city of {s}?", "Tell me the capital of {s}."],
    "colour": ["What colour is the {s}?", "What color is the {s}?", "Which colour is a {s}?",
               "Tell me the colour of the {s}.", "What is the colour of the {s}?"],
    "inventor": ["Who invented the {s}?", "Who was the inventor of the {s}?", "Who made the first {s}?",
                 "Tell me who invented the {s}.", "Name the inventor of the {s}."],
}
FOLLOW_UPS = {  # a second question about another fact of the same kind
    "capital": ["And the capital of {s}?", "What about {s}?", "And what is the capital of {s}?"],
    "colour": ["And the {s}?", "What about the {s}?", "And what colour is the {s}?"],
    "inventor": ["And the {s}?", "What about the {s}?", "And who invented the {s}?"],
}
ANSWERS = {
    "capital": ["The capital of {s} is {a}.", "{a} is the capital of {s}.", "It is {a}."],
    "colour": ["The {s} is {a}.", "It is {a}.", "The colour of the {s} is {a}."],
    "inventor": ["The {s} was invented by {a}.", "{a} invented the {s}.", "It was {a}."],
}
# One think trace per kind of fact, and it names the kind before the subject. A second, shorter form
# that opened on the subject ("The {s} is an animal. Its colour is {a}.") was where the tuned model
# went wrong: over 8 runs of lesson 6's recipe, all 68 held-out answers missed in think mode had written
# that form, none the long one (README, lesson 10). Its inventor version also used a word no corpus
# sentence has ("invention"): at one seed, all 9 inventor misses in think mode garbled it ("ansion").
THOUGHTS = {
    "capital": "The question is about the country {s}. I remember that the capital of {s} is {a}.",
    "colour": "The question is about the animal called the {s}. I remember that the {s} is {a}.",
    "inventor": "The question is about the {s}. I remember that the {s} was invented by {a}.",
}


def fill(template, fact):
    text = template.format(s=fact["subject"], a=fact["answer"])
    return text[0].upper() + text[1:]


# ---- arithmetic ------------------------------------------------------------------------------

ADD = [(a, b) for a in range(31) for b in range(21)]
SUB = [(a, b) for a in range(31) for b in range(a + 1) if b <= 20]
MUL = [(a, b) for a in range(1, 10) for b in range(1, 10)]
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
WORDS = {"+": "plus", "-": "minus", "*": "times"}


def worked(a, op, b):
    """Short worked steps for a op b, e.g. '7 + 8: first 7 + 3 = 10, then 10 + 5 = 15.'"""
    if op == "*":
        multiples = ", ".join(str(b * k) for k in range(1, a + 1))
        return f"{a} * {b} means {a} groups of {b}. Counting by {b}: {multiples}. So {a} * {b} = {a * b}."
    sign = 1 if op == "+" else -1
    steps, x = [], a
    tens, ones = 10 * (b // 10), b % 10
    if tens:
        steps.append(f"{x} {op} {tens} = {x + sign * tens}")
        x += sign * tens
    if ones:
        # Pass through the nearest multiple of ten: 7 + 8 = 7 + 3 + 5, 15 - 8 = 15 - 5 - 3.
        gap = (10 - x % 10) % 10 if op == "+" else x % 10
        if 0 < gap < ones:
            steps.append(f"{x} {op} {gap} = {x + sign * gap}")
            x += sign * gap
            ones -= gap
        steps.append(f"{x} {op} {ones} = {x + sign * ones}")
    if len(steps) <= 1:
        return f"{a} {op} {b} = {OPS[op](a, b)}."
    return f"{a} {op} {b}: first " + ", then ".join(steps) + f". So {a} {op} {b} = {OPS[op](a, b)}."


ARITH_CORPUS = [
    "{a} {op} {b} = {r}.",
    "{a} {w} {b} is {r}.",
    "{a} {w} {b} equals {r}.",
    "What is {a} {w} {b}? It is {r}.",
]
ARITH_QUESTIONS = ["What is {a} {op} {b}?", "What is {a} {w} {b}?", "Compute {a} {op} {b}.",
                   "Calculate {a} {w} {b}.", "{a} {op} {b} = ?"]
ARITH_ANSWERS = ["{a} {op} {b} = {r}.", "The answer is {r}.", "{a} {w} {b} is {r}."]
ARITH_FOLLOW_UPS = {"+": ["Now add {b} to that.", "Add {b} to the result."],
                    "-": ["Now subtract {b} from that.", "Take {b} away from the result."]}


def arith_problem(rng):
    op = rng.choice(["+", "+", "-", "-", "*"])
    a, b = rng.choice({"+": ADD, "-": SUB, "*": MUL}[op])
    return a, op, b


def fmt_arith(template, a, op, b):
    return template.format(a=a, op=op, b=b, w=WORDS[op], r=OPS[op](a, b))


# ---- the pretraining corpus ------------------------------------------------------------------

def make_corpus(rng, facts, mentions_per_fact=40, arith_repeats=3):
    """Raw text: documents separated by a blank line. Every fact, seen or not, is stated the same
    number of times; every arithmetic problem appears as equations, words and worked steps."""
    sentences = []
    for f in facts:
        phrases = CORPUS_PHRASES[f["relation"]]
        sentences += [fill(phrases[i % len(phrases)], f) for i in range(mentions_per_fact)]
    for op, pairs in (("+", ADD), ("-", SUB), ("*", MUL)):
        for a, b in pairs:
            sentences += [fmt_arith(rng.choice(ARITH_CORPUS), a, op, b) for _ in range(arith_repeats)]
            sentences.append(worked(a, op, b))
    rng.shuffle(sentences)
    docs, i = [], 0
    while i < len(sentences):
        n = rng.randint(3, 8)
        docs.append(" ".join(sentences[i:i + n]))
        i += n
    return "\n\n".join(docs) + "\n"


# ---- conversations ---------------------------------------------------------------------------

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise assistant.", "Answer briefly and accurately.",
                  "You are a friendly tutor for geography, animals and arithmetic.", "You know many facts about the world."]


def system_message(rng, think):
    flag = "/think" if think else "/no_think"
    return {"role": "system", "content": f"{rng.choice(SYSTEM_PROMPTS)} {flag}"}


def reply(think, thought, answer):
    return f"<think>\n{thought}\n</think>\n{answer}" if think else answer


def fact_turns(rng, f, think, follow_up=False):
    q = fill(rng.choice(FOLLOW_UPS[f["relation"]] if follow_up else QUESTIONS[f["relation"]]), f)
    a = reply(think, fill(THOUGHTS[f["relation"]], f), fill(rng.choice(ANSWERS[f["relation"]]), f))
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def arith_turns(rng, a, op, b, think, question=None):
    q = question or fmt_arith(rng.choice(ARITH_QUESTIONS), a, op, b)
    ans = fmt_arith(rng.choice(ARITH_ANSWERS), a, op, b)
    return [{"role": "user", "content": q}, {"role": "assistant", "content": reply(think, worked(a, op, b), ans)}]


def conversation(rng, kind, facts, think, multi_turn):
    """-> (messages, meta); meta describes the LAST assistant turn: kind, answer, think (+ subject, relation)."""
    msgs = [system_message(rng, think)]
    if kind == "arithmetic":
        a, op, b = arith_problem(rng)
        r = OPS[op](a, b)
        if multi_turn and op in "+-" and r <= 30:
            msgs += arith_turns(rng, a, op, b, think)
            op2 = rng.choice("+-") if r > 0 else "+"
            k = rng.randint(1, 20 if op2 == "+" else min(20, r))
            a, op, b = r, op2, k
            msgs += arith_turns(rng, a, op, b, think, question=rng.choice(ARITH_FOLLOW_UPS[op]).format(b=b))
        else:
            msgs += arith_turns(rng, a, op, b, think)
        return msgs, {"kind": "arithmetic", "answer": str(OPS[op](a, b)), "think": think}
    f = rng.choice([g for g in facts if g["seen"] == (kind == "fact_seen")])
    if multi_turn:
        # The first turn is about a seen fact of the same kind: the asked one may be unseen.
        others = [g for g in facts if g["relation"] == f["relation"] and g["seen"] and g is not f]
        msgs += fact_turns(rng, rng.choice(others), think)
        msgs += fact_turns(rng, f, think, follow_up=True)
    else:
        msgs += fact_turns(rng, f, think)
    return msgs, {"kind": "fact_seen" if f["seen"] else "fact_unseen", "answer": f["answer"],
                  "subject": f["subject"], "relation": f["relation"], "think": think}


def make_split(rng, facts, n, kinds, seen_text):
    """n conversations, kinds cycling; skips any whose turns are already in seen_text (updated), so
    no test conversation repeats a train one word for word."""
    out = []
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        msgs, meta = conversation(rng, kind, facts, think=rng.random() < 0.5, multi_turn=rng.random() < 0.2)
        key = json.dumps(msgs[1:])
        if key in seen_text:
            continue
        seen_text.add(key)
        out.append((msgs, meta))
    return out


def world(seed=SEED):
    """-> the world's fact dicts, exactly the ones build(seed) writes about (the first thing its rng draws)."""
    return make_facts(random.Random(seed))


def subjects(seed=SEED):
    """-> every subject of the world (countries, animals, inventions): an answer naming one of them
    that is not the subject asked about talks about something else (minisft/evaluate.py uses this)."""
    return [f["subject"] for f in world(seed)]


def build(seed=SEED):
    """-> dict file name -> file text (all four files), deterministic in `seed`."""
    rng = random.Random(seed)
    facts = make_facts(rng)
    corpus = make_corpus(rng, facts)
    mix = ["fact_seen", "arithmetic", "fact_seen", "arithmetic", "fact_seen"]
    taken = set()
    train = make_split(rng, facts, N_TRAIN, mix, taken)
    val = make_split(rng, facts, N_VAL, mix, taken)
    test = make_split(rng, facts, N_TEST, ["arithmetic", "fact_seen", "fact_unseen"], taken)

    def jsonl(records, with_meta):
        lines = [json.dumps({"messages": m, "meta": meta} if with_meta else {"messages": m}, ensure_ascii=False)
                 for m, meta in records]
        return "\n".join(lines) + "\n"

    return {"corpus.txt": corpus, "sft_train.jsonl": jsonl(train, False), "sft_val.jsonl": jsonl(val, False),
            "sft_test.jsonl": jsonl(test, True)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder (default: data/)")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, text in build(args.seed).items():
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"wrote {path} ({len(text.encode('utf-8')):,} bytes)")


if __name__ == "__main__":
    main()
