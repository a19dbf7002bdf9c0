"""A picture of one or more training runs: one panel per signal CLHA's method moves, a colour per
run.

    python tools/plot.py --plot runs/clha runs/pro --out curves.png --names CLHA PRO

Reads each run's OUT/log.jsonl (train.py's records; harness/logs.py lists the signals) and writes a
PNG. Needs matplotlib (pip install matplotlib).
"""

import importlib.util
import json
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

from data import UserError                 # noqa: E402  (after the path above)
from harness import files, flags           # noqa: E402
from harness.flags import opt              # noqa: E402

SIGNALS = ("loss_rank", "loss_sft", "pairs_kept", "sft_on", "acc", "acc_kept", "logp_rank")


def read_log(run):
    """The training records of a run's log.jsonl (its dev records left out). A last line without
    its newline is one a kill cut short (or one being written now): it is left out. A broken line
    before it is one line naming file:line."""
    path = os.path.join(run, "log.jsonl")
    flags.input_file(path, "--plot")
    try:
        text = files.finished_bytes(path).decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"--plot {path}: cannot read it ({e.strerror})") from None
    records = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"--plot {path}:{line_no}: not a record of train.py (a JSON object "
                            "with its step); remove that line to plot the rest")
        records.append(record)
    return [r for r in records if r.get("split", "train") == "train"]


def plot(runs, out, names=None):
    """One panel per signal (SIGNALS), each run a colour; logp_rank draws one line per rank position
    (the best solid, the others dashed). Written to `out` as a PNG."""
    import matplotlib
    matplotlib.use("Agg")                                    # no screen needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), constrained_layout=True)
    for n, run in enumerate(runs):
        records, name = read_log(run), (names or runs)[n]
        steps, colour = [r["step"] for r in records], f"C{n}"
        for ax, key in zip(axes.flat, SIGNALS):
            if key == "logp_rank":
                for k, line in enumerate(zip(*[r["logp_rank"] for r in records])):
                    ax.plot(steps, line, colour, linestyle="-" if k == 0 else "--")
            else:
                ax.plot(steps, [r[key] for r in records], colour, label=name)
            ax.set_title(key)
            ax.set_xlabel("optimizer step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="k"), Line2D([], [], color="k", linestyle="--")]
    labels += ["logp_rank: the best candidate", "logp_rank: the worse ones"]
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(handles, labels, loc="center", title="runs")
    fig.savefig(out, dpi=80)
    print(f"wrote {out}: {len(runs)} runs, {len(SIGNALS)} signals")


@dataclass
class Config:
    plot: list[str] = opt(None, "run folders (train.py's --out), each with a log.jsonl", nargs="+")
    out: str = opt("curves.png", "the PNG to write")
    names: list[str] = opt(None, "a legend name per run (default: the folders)", nargs="+")


def main(argv=None):
    cfg = flags.parse(Config, argv, __doc__.split("\n\n")[0])
    if not cfg.plot:
        raise UserError("give --plot RUN [RUN ...], e.g. python tools/plot.py --plot runs/clha "
                        "--out c.png")

    if cfg.names and len(cfg.names) != len(cfg.plot):
        raise UserError(f"--names: {len(cfg.names)} names for {len(cfg.plot)} runs")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    plot(cfg.plot, cfg.out, cfg.names)


if __name__ == "__main__":
    flags.run(main)
