"""Where training records come from: a file, a folder of shards, or a dataset on the Hugging Face Hub.

Lesson 2 loads a .jsonl file through `conversations.load_conversations`, which reads its records here.
This module only finds and reads records; what a record must contain is checked in conversations.py.

    .jsonl     one JSON object per line; located as "path:LINE" (1-based)
    .json      one JSON list of objects; "path:LINE (record N)" (the line where record N starts)
    .parquet   a table, one record per row (needs pyarrow: `pip install pyarrow`); "path:row N" (0-based,
               the index `datasets` and pandas give the same row)
    a folder   every *.parquet and *.jsonl directly in it, in sorted name order (train-00000-of-00002,
               train-00001-of-00002, ...). A .json in a folder is left alone: folders often hold
               metadata such as dataset_info.json.
    a Hub id   "owner/name" (e.g. HuggingFaceTB/smoltalk2) with a subset (config) and a split:
               only that split's files are downloaded, into the normal Hugging Face cache, and
               located as "hf://datasets/owner/name/FILE:row N".

Subsets and splits on the Hub. `push_to_hub` writes config C, split S as C/S-00000-of-00003.parquet
(smoltalk2: SFT/smoltalk_smollm3_everyday_conversations_no_think-00000-of-00001.parquet); older
uploads use data/C/S-*.parquet (smoltalk) and the Hub's parquet conversion C/S/0000.parquet. So a file
belongs to (subset, split) when its name is S.ext or starts with "S-", or it lies in a folder named S;
and a folder above it is named C (without a subset: it lies at the top or under data/ only). The
same rule picks files in a local folder when a subset or split is given. Shards named
*-NNNNN-of-MMMMM must all be there, or the split counts as not downloaded.

Every record comes out as (location, parse): parse() returns the decoded record or raises
BadRecord, so one broken line or row costs only that record when bad records are skipped.
"""
import json
import os
import re

DATA_EXTS = (".jsonl", ".json", ".parquet")
SHARD_EXTS = (".parquet", ".jsonl")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class BadRecord(Exception):
    """One malformed record: `reason` is a short key for the stats, the message says what is wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def read_records(spec, subset=None, split=None):
    """spec (file, folder or Hub id) -> iterator of (location, parse). Raises on a bad spec."""
    path = os.path.expanduser(os.fspath(spec))
    if os.path.isfile(path):
        if subset is not None or split is not None:
            raise ValueError(f"{path}: subset/split choose files in a folder or a Hub dataset, not in one file")
        files = [(path, path)]
    elif os.path.isdir(path):
        files = [(f, f) for f in _folder_files(path, subset, split)]
    elif HUB_ID.fullmatch(path) and not path.startswith(".") and not path.lower().endswith(DATA_EXTS):
        split = split or "train"  # as the `datasets` library defaults
        folder, rels = _hub_files(path, subset, split)
        files = [(os.path.join(folder, r), f"hf://datasets/{path}/{r}") for r in rels]
    else:
        raise FileNotFoundError(f"{path}: no such dataset file or folder "
                                f"(and not a Hub dataset id like 'HuggingFaceTB/smoltalk2')")
    for file, label in files:
        ext = os.path.splitext(file)[1].lower()
        if ext not in DATA_EXTS:
            raise ValueError(f"{file}: unsupported dataset file type {ext or '(none)'!r} "
                             f"(expected .jsonl or .json or .parquet, a folder of shards, or a Hub dataset id)")
        if ext == ".parquet":
            yield from _parquet_records(file, label)
        else:
            with open(file, "rb") as f:
                raw = f.read()
            yield from (_jsonl_records if ext == ".jsonl" else _json_records)(label, raw)


# ---- folders and subset/split matching ------------------------------------------------------------
def _folder_files(folder, subset, split):
    if subset is None and split is None:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(SHARD_EXTS) and not n.startswith("."))
        files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
        if not files:
            raise FileNotFoundError(f"{folder}: no .parquet or .jsonl files in this folder "
                                    f"(expected shards such as train-00000-of-00002.parquet)")
        return files
    split = split or "train"
    rels = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rels += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
    rels = matching_files(rels, subset, split)
    if not rels:
        raise FileNotFoundError(f"{folder}: no .parquet or .jsonl files for subset {subset!r}, split {split!r} "
                                f"(expected e.g. {_patterns(subset, split)[0]})")
    return [os.path.join(folder, r) for r in rels]


def matching_files(rels, subset, split):
    """The relative paths (with "/") that hold (subset, split), sorted; see the module docstring."""
    out = []
    for rel in rels:
        *dirs, name = rel.split("/")
        if not name.lower().endswith(SHARD_EXTS) or name.startswith("."):
            continue
        if dirs and dirs[-1] == split:
            above = dirs[:-1]
        elif os.path.splitext(name)[0] == split or name.startswith(split + "-"):
            above = dirs
        else:
            continue
        if (subset in above) if subset is not None else all(d == "data" for d in above):
            out.append(rel)
    return sorted(out)


def _patterns(subset, split):
    # fnmatch patterns (as huggingface_hub applies them: `*` also crosses "/") for the download;
    # matching_files then applies the exact rule.
    if subset is None:
        return [f"{split}[-./]*", f"data/{split}[-./]*"]
    return [f"{subset}/{split}[-./]*", f"*/{subset}/{split}[-./]*"]


def _complete(folder, rels):
    """Every shard of each "NAME-NNNNN-of-MMMMM" series is present (an interrupted download is not)."""
    series = {}
    for rel in rels:
        m = re.fullmatch(r"(.*)-(\d+)-of-(\d+)(\.\w+)", rel)
        if m:
            series.setdefault((m[1], m[3], m[4]), set()).add(int(m[2]))
    return all(found == set(range(int(total))) for (_, total, _), found in series.items())


# ---- the Hub ----------------------------------------------------------------------------------------
def _cli():
    import huggingface_hub
    # huggingface_hub 1.0 replaced the huggingface-cli command with hf.
    return "huggingface-cli" if int(huggingface_hub.__version__.split(".")[0]) < 1 else "hf"


def _hub_files(repo_id, subset, split):
    """-> (snapshot folder, sorted relative paths of the split's files): from the cache, else downloaded."""
    from .weights import hub_snapshot

    patterns = _patterns(subset, split)
    what = f"subset {subset!r}, split {split!r}" if subset is not None else f"split {split!r}"

    def files_in(folder):
        rels = []
        for root, dirs, names in os.walk(folder):
            rels += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
        return matching_files(rels, subset, split)

    include = " ".join(f"--include '{p}'" for p in patterns)
    how = (f"download it where the Hub is reachable (`{_cli()} download {repo_id} --repo-type dataset {include}`, "
           f"with HF_HUB_OFFLINE unset or 0), or pass a local file or folder")
    folder = hub_snapshot(repo_id, patterns, lambda f: bool(files_in(f)) and _complete(f, files_in(f)), how,
                          repo_type="dataset", local="file or folder", missing=f"its {what} is not (fully)")
    rels = files_in(folder)
    if not rels:
        raise ValueError(f"{repo_id}: the dataset has no .parquet or .jsonl files for {what} (looked for "
                         f"{' or '.join(patterns)}); check the subset and split names on its Hub page")
    return folder, rels


# ---- reading one file ----------------------------------------------------------------------------
def _parquet_records(path, label):
    try:
        import pyarrow  # noqa: F401  (an optional extra: imported only when a .parquet is read)
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{label}: reading .parquet files needs pyarrow, which is not installed: "
                         f"pip install pyarrow") from None
    row = 0
    try:
        table = pq.ParquetFile(path)
        # Row groups one batch at a time: a big shard is never converted to Python in one go.
        for batch in table.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield f"{label}:row {row}", (lambda rec=rec: rec)
                row += 1
    except (pyarrow.ArrowException, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{label}:row {row}: cannot read this parquet file from here ({first_line}) "
                         f"(expected a valid .parquet file)") from None


def _jsonl_records(label, raw):
    """Yield (location, parse) per non-blank line. Each line is decoded on its own, so a bad byte
    is reported on its line and, with skip_bad, costs only that line."""
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]  # a UTF-8 byte-order mark some editors write
        if not line.strip():
            continue

        def parse(line=line):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord("not_utf8", f"bytes are not UTF-8 (byte 0x{line[e.start]:02x} at byte {e.start + 1} "
                                            f"of the line) (expected UTF-8 text)") from None
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise BadRecord("bad_json", f"not valid JSON ({e.msg} at column {e.colno}) "
                                            f"(expected one JSON object per line)") from None

        yield f"{label}:{lineno}", parse


def _json_records(label, raw):
    """Yield (location, parse) per element of a .json file's top-level list. A file that is not
    UTF-8 or not JSON at all is one error for the whole file, even with skip_bad."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{label}:{line}: bytes are not UTF-8 (byte 0x{raw[e.start]:02x}) (expected UTF-8 text)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one record per line needs the .jsonl extension" if e.msg == "Extra data" else ""
        raise ValueError(f"{label}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}) "
                         f"(expected a JSON list of records{hint})") from None
    if not isinstance(data, list):
        raise ValueError(f"{label}: the top level is a JSON {type(data).__name__} (expected a JSON list of records)")
    for i, (rec, line) in enumerate(zip(data, _element_lines(text), strict=True)):
        yield f"{label}:{line} (record {i})", (lambda rec=rec: rec)


def _element_lines(text):
    """The 1-based line on which each element of a (valid) top-level JSON list starts.

    json.loads forgets where things were; walking the list once more with raw_decode recovers it,
    so a bad record in a pretty-printed file is reported at a line an editor can jump to.
    """
    decoder, lines, line, seen = json.JSONDecoder(), [], 1, 0
    skip = re.compile(r"[\s,]*")  # whitespace and the commas between elements (the text is valid JSON)
    pos = skip.match(text, text.index("[") + 1).end()
    while text[pos] != "]":
        line, seen = line + text.count("\n", seen, pos), pos
        lines.append(line)
        pos = skip.match(text, decoder.raw_decode(text, pos)[1]).end()
    return lines
