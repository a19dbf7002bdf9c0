"""When a run stops: the step's vote, which every rank takes together, once per optimizer step.

    SIGTERM, SIGINT   (a preemption, Ctrl-C) the step in flight finishes, every rank saves it, and
                      the run exits with 128 + the signal's number; a second Ctrl-C stops at once
    a non-finite step a loss or global gradient norm that is NaN or infinite is not applied (the
                      weights and AdamW's state stay as they were); it is counted as `skipped`

The vote rides on the all-reduce that sums the step's metrics, so it costs no collective of its own,
and its one host sync is the only time per step that the CPU waits for the GPU.
"""

import os
import signal
import sys
import threading

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from data import UserError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """SIGTERM (what Slurm and Kubernetes send before SIGKILL) or SIGINT (Ctrl-C) during the loop:
    remember it, so the loop finishes the step in flight and the vote stops every rank there."""

    def __enter__(self):
        self.signal, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():   # the only one that may set them
            for s in STOP_SIGNALS:
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal:      # Ctrl-C twice: stop now (SIGTERM may come
            signal.default_int_handler(signum, frame)    # twice, from the scheduler and torchrun)
        self.signal = self.signal or signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def vote(sums, counts, grad_norm=None, wants_to_stop=0):
    """The step's one all-reduce and one host sync: this rank's metric sums (a tensor on the
    device), its counts (plain numbers) and its wish to stop -> (the sums over every rank as floats,
    the global gradient norm, the signal that stopped any rank (SIGTERM before SIGINT) or 0). Every
    rank gets the same answer."""
    votes = [float(wants_to_stop == s) for s in STOP_SIGNALS]
    extra = torch.tensor([*map(float, counts), *votes]).to(sums.device, non_blocking=True)
    reduced = torch.cat([sums.float(), extra])
    dist.all_reduce(reduced)                          # summed across ranks: metrics, counts, votes
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()           # already global: clip_grad_norm_ reduced it
    norm = grad_norm.float().reshape(1) if grad_norm is not None else reduced.new_zeros(1)
    values = torch.cat([reduced, norm.to(reduced.device)]).tolist()   # the one wait for the GPU
    stop = next((s for s, n in zip(STOP_SIGNALS, values[-1 - len(votes):-1]) if n), 0)
    return values[:-1 - len(votes)], values[-1], stop


def stopped(rank, signum, what):
    """The exit of a run stopped by a signal: one line, and status 128 + the signal's number."""
    if rank == 0:
        print(f"stopped by {signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)
    return SystemExit(128 + signum)


def diverged(out, step, skipped):
    """The exit of a run whose last --max-skipped steps were non-finite: one line, nothing saved."""
    from harness.checkpoints import step_dirs
    saved = step_dirs(out)
    kept = f"the checkpoints are kept (newest: {os.path.basename(saved[-1])}), " if saved else ""
    return UserError(f"training diverged: steps {step - skipped + 1}-{step} had a non-finite loss "
                     f"or gradient norm, and none was applied; {kept}nothing more is saved: "
                     "--resume retries, or start again with a lower --lr")
