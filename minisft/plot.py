"""Training curves from metrics.jsonl: one run, or several side by side.

Lesson 6 uses it (train.py refreshes the plots of a run while it trains). Reading the curves is
half of training: the loss should fall fast then flatten, the validation loss should follow it
(a widening gap is memorisation), the learning rate should show its warmup and cosine, and the
gradient norm should settle; spikes there come before a loss blow-up.

    python -m minisft.plot runs/sft                       # -> runs/sft/loss.png, runs/sft/metrics.png
    python -m minisft.plot runs/a runs/b --out cmp.png    # several runs compared, legend by run name
    python -m minisft.plot runs/sft --live                # a window that refreshes while training runs

The PNGs are drawn on a bare matplotlib Figure (the Agg renderer), never through pyplot, so
plotting touches no global state and needs no display; only --live opens a window.
"""
import argparse
import json
import math
import os
import sys

PANELS = (  # (metrics key, panel title, log scale)
    ("loss", "loss (token-weighted)", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm (before clipping)", True),
    ("tokens_per_sec", "tokens / s", False),
    ("peak_mem_mb", "peak memory (MB)", False),
    ("tokens", "target tokens per step", False),
)


def read_metrics(run_dir, live=False):
    """run_dir/metrics.jsonl (or the file itself) -> list of dicts (one per optimizer step).

    Every line must be a JSON object with a numeric "step" and "loss"; other fields may be missing,
    null or NaN (such points are left out of their plot). Errors name file:line.
    live=True is for reading a file that training is still writing: a missing or empty file gives
    [] and an unfinished last line (no newline yet) is left for the next read.
    """
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        if live:
            return []
        raise FileNotFoundError(f"{path}: no such file (expected a run folder written by minisft.train)")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    if live:
        lines = lines[:-1]  # after the last newline: "" or a line still being written
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 (byte 0x{line[e.start]:02x}) (expected UTF-8 JSON)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        for key in ("step", "loss"):
            if not isinstance(row.get(key), (int, float)):
                raise ValueError(f"{path}:{lineno}: missing or non-numeric {key!r} (expected a number)")
        rows.append(row)
    if not rows and not live:
        raise ValueError(f"{path}: no metrics yet (the file is empty)")
    return rows


def ema(values, beta=None):
    """Exponential moving average, bias-corrected so the first points are not pulled towards 0.

    beta=None: an averaging window of about 1/20 of the run (a long run gets a smoother curve).
    """
    if beta is None:
        beta = min(0.98, max(0.0, 1 - 20 / max(len(values), 1)))
    out, s = [], 0.0
    for t, v in enumerate(values, start=1):
        s = beta * s + (1 - beta) * v
        out.append(s / (1 - beta ** t))
    return out


def series(rows, key):
    """(steps, values) of the rows where `key` holds a finite number."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def draw_loss(ax, runs):
    """Train loss (raw, faint; smoothed, solid) and val loss (dots) of every run on one axis."""
    for i, (name, rows) in enumerate(runs):
        color = f"C{i % 10}"
        x, y = series(rows, "loss")
        ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, ema(y), color=color, linewidth=1.6, label=f"{name} train (smoothed)")
        vx, vy = series(rows, "val_loss")
        if vx:
            ax.plot(vx, vy, color=color, linestyle="--", marker="o", markersize=3, label=f"{name} val")
    ax.set_xlabel("step")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw_panel(ax, runs, key, title, log_scale):
    for i, (name, rows) in enumerate(runs):
        x, y = series(rows, key)
        if x:
            ax.plot(x, y, color=f"C{i % 10}", linewidth=1.0, label=name)
    # A log axis needs a positive value to show (a run of zero gradient norms has none).
    if log_scale and any(v > 0 for _, rows in runs for v in series(rows, key)[1]):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(runs) > 1 and ax.lines:
        ax.legend(fontsize=7)


def loss_figure(runs):
    from matplotlib.figure import Figure

    # Fixed margins, not layout="constrained": the trainer redraws these plots during a run, and
    # the constraint solver took about 40% of each redraw.
    fig = Figure(figsize=(7, 4.5))
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.11, top=0.93)
    draw_loss(fig.add_subplot(), runs)
    return fig


def dashboard_figure(runs, fig=None):
    """All panels: loss, lr, gradient norm, throughput, memory, target tokens."""
    if fig is None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(14, 8))
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.92, wspace=0.22, hspace=0.3)
    axes = fig.subplots(2, 3).ravel()
    draw_loss(axes[0], runs)
    for ax, (key, title, log_scale) in zip(axes[1:], PANELS[1:]):
        draw_panel(ax, runs, key, title, log_scale)
    fig.suptitle(" vs ".join(name for name, _ in runs))
    return fig


def _folder(run):
    """A run is named by its folder, also when given as the path of its metrics.jsonl."""
    return (os.path.dirname(run) or ".") if os.path.isfile(run) else run


def load_runs(run_dirs, live=False):
    """[(run name, rows)]: the name is the folder's name (the legend label)."""
    return [(os.path.basename(os.path.abspath(_folder(d))), read_metrics(d, live)) for d in run_dirs]


def plot_run(run_dir):
    """Write loss.png and metrics.png into the run folder; return their paths."""
    runs = load_runs([run_dir])
    folder = _folder(run_dir)
    paths = [os.path.join(folder, "loss.png"), os.path.join(folder, "metrics.png")]
    for fig, path in zip((loss_figure(runs), dashboard_figure(runs)), paths):
        # Write then rename: an image viewer refreshing the file never sees half a PNG.
        fig.savefig(path + ".tmp", format="png", dpi=100)
        os.replace(path + ".tmp", path)
    return paths


def plot_runs(run_dirs, out=None):
    """Compare several runs in one dashboard PNG (default: compare.png beside the run folders)."""
    runs = load_runs(run_dirs)
    if out is None:
        out = os.path.join(os.path.commonpath([os.path.abspath(_folder(d)) for d in run_dirs]), "compare.png")
    dashboard_figure(runs).savefig(out, dpi=100)
    return out


def watch(run_dirs, every=5.0):
    """A live window redrawn every `every` seconds until closed (needs a display)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("--live needs a display (none found: no DISPLAY); draw PNGs without --live instead")
    for d in run_dirs:
        if not os.path.exists(d):
            raise FileNotFoundError(f"{d}: no such run folder")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(14, 8), layout="constrained")
    plt.show(block=False)
    while plt.fignum_exists(fig.number):
        fig.clear()
        # live: the window may open before the first step is written, and a line may be half written.
        dashboard_figure(load_runs(run_dirs, live=True), fig)
        fig.canvas.draw_idle()
        plt.pause(every)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minisft.plot", description="Plot training curves from metrics.jsonl.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding metrics.jsonl")
    p.add_argument("--out", help="PNG file for the dashboard (default: in the run folder, or compare.png)")
    p.add_argument("--live", action="store_true", help="open a window that refreshes while training runs")
    p.add_argument("--every", type=float, default=5.0, help="seconds between live refreshes")
    args = p.parse_args(argv)
    try:
        if args.live:
            watch(args.runs, args.every)
        elif len(args.runs) == 1 and args.out is None:
            for path in plot_run(args.runs[0]):
                print(f"wrote {path}")
        else:
            print(f"wrote {plot_runs(args.runs, args.out)}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
