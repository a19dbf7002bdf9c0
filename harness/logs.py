"""What a training run reports: metrics per step, log.jsonl, TensorBoard, Weights & Biases.

train.py sums each micro-batch's metrics on the device, the step's vote all-reduces them
(stopping.py), and rank 0 writes every --log-every steps one record: a line under the progress bar
and a JSON line in OUT/log.jsonl, which needs nothing installed and is what --resume keeps in step
with the checkpoints. --tensorboard writes the same scalars to OUT/tensorboard (train/<name>,
dev/<name>), --wandb PROJECT to Weights & Biases (offline too, with WANDB_MODE=offline); each
library is imported only when its flag is given. The signals CLHA's method moves:
    loss_rank   Eq. 5, the contrastive term          loss_sft    Eq. 7's L_sft (before alpha)
    pairs_kept  share of pairs with |r_i - r_j| > reward_gap (Eq. 5's 1 - k)
    sft_on      share of prompts whose SFT target has reward > 0 (Eq. 7's 1 - lambda)
    acc         pairs with p_i > p_j, of all pairs    acc_kept    the same over the kept pairs
    logp_rank   mean p_i (Eq. 3) of each rank position: the gap the margin of Eq. 6 acts on
(tools/plot.py draws them.)
"""

import dataclasses
import json
import os
import resource
import uuid

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import UserError
from harness.files import open_append, write_text

NAMES = ("loss", "loss_rank", "loss_sft", "pairs_kept", "sft_on", "acc", "acc_kept")


def metric_row(metrics, prompts):
    """A micro-batch's metrics (clha_loss.clha_objective's) as one device tensor, weighted by its
    prompts: summed over micro-batches and ranks, it gives means over prompts. acc_kept is a mean
    over kept pairs, so it is weighted by the kept share too."""
    values = [metrics[k] * metrics["pairs_kept"] if k == "acc_kept" else metrics[k] for k in NAMES]
    return torch.cat([torch.stack(values), metrics["logp_rank"]]).float() * prompts


class Meter:
    """The steps since the last record: each step's sums over every rank (stopping.vote), held on
    the host."""

    def __init__(self):
        self.sums, self.steps, self.skipped, self.seconds = None, 0, 0, 0.0

    def add(self, sums, seconds, applied=True):
        """A step's sums (metric_row's, then tokens, prompts); a step that was not applied is
        counted as skipped and left out of the means."""
        if not applied:
            self.skipped += 1
            return
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
        self.sums = sums if self.sums is None else [a + b for a, b in zip(self.sums, sums)]

    def result(self):
        """The means over prompts since the last result, tokens, tokens per second, steps skipped
        (NaN means when every step was skipped)."""
        out = {k: float("nan") for k in NAMES} | {"logp_rank": [], "tokens": 0}
        if self.sums is not None:
            *metrics, tokens, prompts = self.sums
            out = {k: metrics[i] / prompts for i, k in enumerate(NAMES)}
            out["acc_kept"] = metrics[6] / metrics[3] if metrics[3] else 0.0
            out["logp_rank"] = [round(v / prompts, 4) for v in metrics[7:]]
            out["tokens"] = int(tokens)
            if self.seconds > 0:
                out["tokens_per_s"] = round(tokens / self.seconds)
        out["skipped"] = self.skipped
        self.__init__()
        return out


def peak_memory(device):
    """Peak memory so far, in GiB (2**30 bytes): allocated and reserved by the caching allocator
    on a GPU, the process's resident memory on a CPU."""
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train_record(step, epoch, meter, lr, grad_norm, device):
    """One log record of the steps since the last; all ranks call it (memory is a collective)."""
    record = {"step": step, "epoch": epoch, **meter.result(), "lr": lr, "grad_norm": grad_norm}
    memory = peak_memory(device)
    peak = torch.tensor(list(memory.values()), device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)                       # the rank that needs the most
    return record | {k: round(v, 2) for k, v in zip(memory, peak.tolist())}


def check_loggers(cfg):
    """Each optional library, imported only when its flag asks for it: a missing one is one line."""
    for wanted, module, flag in ((cfg.tensorboard, "torch.utils.tensorboard", "--tensorboard"),
                                 (cfg.wandb, "wandb", "--wandb")):
        try:
            wanted and __import__(module)
        except ImportError:
            raise UserError(f"{flag} needs {flag[2:]}: pip install {flag[2:]}") from None


class RunLog:
    """Rank 0's record of a run: the progress bar, OUT/log.jsonl, TensorBoard and W&B if asked."""

    def __init__(self, cfg, rank, resuming):
        """Before the weights load: a W&B run that cannot start (no login, no network) fails now."""
        self.on, self.cfg = rank == 0, cfg
        self.bar = self.file = self.tensorboard = self.wandb = None
        if self.on and cfg.wandb:
            self.wandb = start_wandb(cfg, resuming)

    def begin(self, total, start):
        """Once the resumed checkpoint is loaded, and log.jsonl cut back to its step."""
        self.bar = tqdm(total=total, initial=start, disable=not self.on, desc="train")
        if self.on:
            self.file = open_append(os.path.join(self.cfg.out, "log.jsonl"))
        if self.on and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: a resume redoes what follows
            self.tensorboard = SummaryWriter(os.path.join(self.cfg.out, "tensorboard"),
                                             purge_step=start + 1)

    def write(self, record):
        if not self.on:
            return
        self.bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in record.items()))
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split = record.get("split", "train")
        scalars = {f"{split}/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k != "step"}
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

    def __exit__(self, *exc):           # also on an error: the bar ends its line before the error's
        self.bar and self.bar.close()
        self.file and self.file.close()
        self.tensorboard and self.tensorboard.close()
        self.wandb and self.wandb.finish()


def start_wandb(cfg, resuming):
    """A W&B run in OUT/wandb; a resumed run continues the same one (its id is in OUT/wandb_id)."""
    import wandb
    id_file = os.path.join(cfg.out, "wandb_id")
    run_id = open(id_file).read().strip() if resuming and os.path.exists(id_file) \
        else uuid.uuid4().hex[:8]
    write_text(id_file, run_id)
    try:
        return wandb.init(project=cfg.wandb, dir=cfg.out, id=run_id, resume="allow",
                          config=dataclasses.asdict(cfg))
    except wandb.errors.Error as e:
        raise UserError(f"--wandb {cfg.wandb}: cannot start a run ({' '.join(str(e).split())}): "
                        "run `wandb login`, or set WANDB_MODE=offline") from None
