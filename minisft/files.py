"""Writing files so that a crash or a power cut never leaves a half-written one behind.

Used by checkpoint.py (checkpoints), weights.py (final/, any saved model) and rundir.py (the run
folder's logs and lock). Two guarantees, and what each costs:

- Atomic: a file or folder is written under a temporary name beside its destination and renamed
  into place with os.replace(). A reader sees the old version or the new one, never half of one;
  a process killed mid-write leaves only a temporary name, which nothing reads.
- Durable: a rename can reach the disk BEFORE the data it names. After a power cut the new name may
  then point at empty or zeroed files. So: fsync every file, then the folder that holds them (its
  list of names), then rename, then fsync the parent (which records the rename). After that, a
  checkpoint that looks complete is complete.

fsync costs a few milliseconds per file on an SSD: nothing next to a training step, which is why
only checkpoints and saved models pay it, not the per-step metrics lines.
"""
import os


def fsync_file(path):
    """Flush one file's data to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path):
    """Flush a folder's list of names (a new file, a rename) to the disk. Windows cannot open a
    folder for fsync and orders its metadata writes itself: there this does nothing."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder):
    """fsync every file below `folder`, then each folder, deepest first."""
    for here, dirs, names in os.walk(folder, topdown=False):
        for n in names:
            fsync_file(os.path.join(here, n))
        fsync_dir(here)


def write_error(path, e):
    """A failure while writing `path` -> one OSError naming it, for the CLI's one-line error. A full
    disk reaches us as OSError from open() or write(), but as RuntimeError from torch.save's zip
    writer and as safetensors' own error class from save_file, so the writers catch Exception, remove
    what they half-wrote, and raise this instead."""
    reason = " ".join(str(e).split()) or type(e).__name__
    return OSError(f"{path}: could not be written ({reason}); nothing half-written was left behind. Is the disk full?")


def commit_dir(tmp, final):
    """Make the finished temporary folder `tmp` durable and rename it to `final` (which must not
    exist, or be an empty folder on POSIX); then record the rename in the parent."""
    sync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def replace_file(tmp, final):
    """Durably rename the finished file `tmp` onto `final`."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def write_texts(folder, texts):
    """Write {name: text} as UTF-8 files into `folder` (None: nothing); the caller makes them durable."""
    for name, text in (texts or {}).items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


def read_json(path):
    """Parse a JSON file; a syntax error becomes a one-line ValueError naming the file and the line."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
