"""Writing files so that a crash or a power cut never leaves a half-written one behind.

Used by checkpoint.py (checkpoints), weights.py (final/, any saved model), lora.py (adapter
folders) and rundir.py (the run folder's logs and lock). Two guarantees, and what each costs:

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
import json
import os
import shutil
import uuid


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


def write_dir(out_dir, write):
    """Write the folder `out_dir` atomically and durably: write(tmp) fills a fresh temporary folder
    beside it (same file system, so the rename is atomic); every file and folder is fsynced; then
    tmp takes out_dir's place, replacing what was there. The caller checks first that out_dir may
    be replaced. A failure leaves out_dir as it was and no temporary folder; an Exception comes back
    as write_error's one-line OSError. Returns out_dir."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = fresh_name(out_dir, "tmp")
    os.mkdir(tmp)  # (not mkdtemp: that makes it private to the user, mode 0700)
    try:
        write(tmp)
        sync_tree(tmp)  # durable before the rename makes it visible
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            old = fresh_name(out_dir, "old")
            os.rename(out_dir, old)  # no OS renames a folder onto a non-empty one
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty: Windows cannot rename a folder onto one
            os.rename(tmp, out_dir)
        fsync_dir(parent)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out_dir, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fresh_name(path, what):
    """A hidden, unused path beside `path`: `.name.tmp-1a2b3c4d`."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{what}-{uuid.uuid4().hex[:8]}")


def write_json(path, obj):
    """`obj` as indented UTF-8 JSON with a final newline (config files a person may read)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


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
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
