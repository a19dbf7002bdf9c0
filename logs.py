"""What a training run reports, and a picture of it: metrics, log.jsonl, TensorBoard, Weights & Biases, curves.

    python logs.py --plot runs/clha runs/pro --out curves.png     # one panel per signal, a colour per run

train.py sums each micro-batch's metrics (Meter), all-reduces them once per optimizer step, and rank 0 writes
every --log-every steps one record: a line under the progress bar and a JSON line in OUT/log.jsonl, which
needs nothing installed and is what --resume keeps in step with the checkpoints. --tensorboard writes the same
scalars to OUT/tensorboard (train/<name>, dev/<name>), --wandb PROJECT to Weights & Biases (offline too, with
WANDB_MODE=offline); each library is imported only when its flag is given. The signals CLHA's method moves:
    loss_rank   Eq. 5, the contrastive term          loss_sft    Eq. 7's L_sft (before alpha)
    pairs_kept  share of pairs with |r_i - r_j| > reward_gap (Eq. 5's 1 - k)
    sft_on      share of prompts whose SFT target has reward > 0 (Eq. 7's 1 - lambda)
    acc         pairs with p_i > p_j, of all pairs    acc_kept    the same over the kept pairs
    logp_rank   mean p_i (Eq. 3) of each rank position: the gap the margin of Eq. 6 acts on
"""

import dataclasses
import importlib.util
import json
import os
import resource
import signal
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
from cli import opt
from data import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNALS = ("loss_rank", "loss_sft", "pairs_kept", "sft_on", "acc", "acc_kept", "logp_rank")


class Meter:
    """Metrics summed over micro-batches, each weighted by its prompts, and all-reduced once per optimizer step
    (one collective, whatever the number of metrics), together with each rank's wish to stop: the step's vote.
    acc_kept is a mean over kept pairs, so it is weighted by the kept share too."""
    names = ("loss", "loss_rank", "loss_sft", "pairs_kept", "sft_on", "acc", "acc_kept")

    def __init__(self):
        self.local, self.total = 0, 0

    def add(self, m, tokens, prompts):
        values = [m[k] * m["pairs_kept"] if k == "acc_kept" else m[k] for k in self.names]
        row = torch.cat([torch.stack(values).cpu(), m["logp_rank"].cpu()]).float() * prompts
        self.local = self.local + torch.cat([row, torch.tensor([float(tokens), float(prompts)])])

    def step(self, device, seconds=0.0, stop=0):
        """-> the signal that stopped any rank (SIGTERM before SIGINT), or 0: every rank gets the same answer."""
        votes = [float(stop == s) for s in STOP_SIGNALS]
        sums = torch.cat([self.local, torch.tensor([seconds, *votes])]).to(device)
        dist.all_reduce(sums)                             # summed across ranks: the metrics, and the votes
        self.total, self.local = self.total + sums[:-len(votes)].cpu(), 0
        return next((s for s, n in zip(STOP_SIGNALS, sums[-len(votes):].tolist()) if n), 0)

    def result(self):
        """The means since the last result, tokens, and tokens per second of step time (per rank, averaged)."""
        sums, self.total = self.total, 0
        seconds, prompts, tokens = sums[-1] / dist.get_world_size(), sums[-2], sums[-3]
        out = {k: (sums[i] / prompts).item() for i, k in enumerate(self.names)}
        out["acc_kept"] = (sums[6] / sums[3].clamp(min=1e-12)).item()
        out["logp_rank"] = [round(v, 4) for v in (sums[7:-3] / prompts).tolist()]
        out["tokens"] = int(tokens)
        if seconds > 0:
            out["tokens_per_s"] = round(tokens.item() / seconds.item())
        return out


def peak_memory(device):
    """Peak memory so far: allocated and reserved by the caching allocator on a GPU, the process's RSS on a CPU."""
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train_record(step, epoch, meter, lr, grad_norm, device):
    """One log record of the steps since the last; every rank calls it (the norm and the memory are collectives)."""
    record = {"step": step, "epoch": epoch, **meter.result(), "lr": lr, "grad_norm": grad_norm.full_tensor().item()}
    memory = peak_memory(device)
    peak = torch.tensor(list(memory.values()), device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)                        # the rank that needs the most
    return record | {k: round(v, 2) for k, v in zip(memory, peak.tolist())}


def check_loggers(cfg):
    """Each optional library, imported only when its flag asks for it: a missing one is one line, before training."""
    for wanted, module, flag in ((cfg.tensorboard, "torch.utils.tensorboard", "--tensorboard"),
                                 (cfg.wandb, "wandb", "--wandb")):
        try:
            wanted and __import__(module)
        except ImportError:
            raise UserError(f"{flag} needs {flag[2:]}: pip install {flag[2:]}") from None


class RunLog:
    """Rank 0's record of a run: the progress bar, OUT/log.jsonl, and TensorBoard and W&B when asked for."""

    def __init__(self, cfg, rank, total, start):
        self.on = rank == 0
        self.bar = tqdm(total=total, initial=start, disable=not self.on, desc="train")
        self.file = open(os.path.join(cfg.out, "log.jsonl"), "a") if self.on else None
        self.tensorboard = self.wandb = None
        if self.on and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter      # purge_step: a resumed run redoes what follows
            self.tensorboard = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=start + 1)
        if self.on and cfg.wandb:
            import wandb
            id_file = os.path.join(cfg.out, "wandb_id")            # a resumed run continues the same W&B run
            run_id = open(id_file).read() if start and os.path.exists(id_file) else uuid.uuid4().hex[:8]
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(project=cfg.wandb, dir=cfg.out, id=run_id, resume="allow",
                                    config=dataclasses.asdict(cfg))

    def write(self, record):
        if not self.on:
            return
        self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split = record.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        scalars |= {f"{split}/logp_rank{i}": v for i, v in enumerate(record.get("logp_rank", []))}
        if self.tensorboard:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=record["step"])
        if split == "train":
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", acc=f"{record['acc']:.3f}")

    def advance(self):
        self.bar.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):             # also on an error: the bar ends its line before the error's line
        self.bar.close()
        if self.on:
            self.file.close()
            self.tensorboard and self.tensorboard.close()
            self.wandb and self.wandb.finish()


# ---- a picture of one or more runs --------------------------------------------------------------------------

def read_log(run):
    """The training records of a run's log.jsonl (its dev records left out)."""
    cli.input_file(os.path.join(run, "log.jsonl"), "--plot")
    with open(os.path.join(run, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r.get("split", "train") == "train"]


def plot(runs, out, names=None):
    """One panel per signal (SIGNALS), each run a colour; logp_rank draws one line per rank position (the best
    solid, the others dashed). Written to `out` as a PNG."""
    import matplotlib
    matplotlib.use("Agg")                                    # no screen needed
    import matplotlib.pyplot as plt
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
    from matplotlib.lines import Line2D
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
    cfg = cli.parse(Config, argv, __doc__.split("\n")[0])
    if not cfg.plot:
        raise UserError("give --plot RUN [RUN ...], e.g. python logs.py --plot runs/clha runs/pro --out curves.png")
    if cfg.names and len(cfg.names) != len(cfg.plot):
        raise UserError(f"--names: {len(cfg.names)} names for {len(cfg.plot)} runs")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install matplotlib")
    plot(cfg.plot, cfg.out, cfg.names)


if __name__ == "__main__":
    cli.run(main)
