"""One run per output: an OS lock (flock) held for the whole run, the ranks that share it, and
the share of rescore.py's and evaluate.py's work each rank has left after a kill (`unfinished`).

    OUT/.lock (train.py, evaluate.py), OUT.lock (rescore.py)

A second run on the same output is refused in one line before it reads or writes anything; the
kernel releases a flock when its process dies, so a killed run leaves no stale lock.
"""

import contextlib
import fcntl
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from data import UserError
from harness import files, fingerprints


@contextlib.contextmanager
def ranks():
    """(rank, world) of this process; under torchrun with a gloo group for the barriers of
    rescore.py and evaluate.py (CPU collectives serve GPUs too), whose timeout lets a rank wait
    hours for the slowest."""
    own = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=timedelta(hours=48))
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    finally:
        if own:
            dist.destroy_process_group()


def local_device():
    """This process's device, made current: cuda:LOCAL_RANK where the node has GPUs, else the CPU.
    More processes on a node than the GPUs it shows is one line, not "invalid device ordinal"."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if max(per_node, local + 1) > visible:
        what = f"--nproc_per_node {per_node}" if per_node > visible else f"LOCAL_RANK {local}"
        raise UserError(f"{what}: this node shows {visible} GPUs (CUDA_VISIBLE_DEVICES); start "
                        "one process per GPU")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def lock(path, flag, out):
    """Hold the lock file `path` for the whole run, on rank 0, telling every rank if it could."""
    fd, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        while fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = (f"{flag} {out}: another run is writing it now (it holds {path}); wait for "
                         f"it, or choose another {flag}")
                break
            except OSError as e:
                error = f"{flag} {out}: cannot create the lock file {path} ({e.strerror})"
                break
            if not os.path.exists(path) or os.stat(path).st_ino != os.fstat(fd).st_ino:
                os.close(fd)          # the run before us removed it after we opened it: take
                fd = None             # the new one
    if dist.is_initialized():
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        if fd is not None:
            os.close(fd)
        raise UserError(error)
    try:
        yield
    finally:
        if fd is not None:
            os.remove(path)           # still ours: we hold it
            os.close(fd)


def unfinished(samples, parts, settings_path, settings, keep, where):
    """Under ranks(): this rank's share of `samples` (sample i goes to rank i % world) that the part
    files `parts` of earlier runs do not hold (files.read_parts with `keep`), once `settings_path`
    has said they were made with these `settings` (check_made_by). Rank 0 then writes `settings`
    there, when every rank has read."""
    if any(files.finished_bytes(path) for path in parts):     # an earlier run finished records
        fingerprints.check_made_by(settings_path, settings, where)
    done = files.read_parts(parts, keep)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    barrier()                                         # every rank has read before any appends
    if rank == 0:
        files.write_json(settings_path, settings)
    return [s for i, s in enumerate(samples) if i % world == rank and s["id"] not in done]
