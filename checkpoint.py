"""What survives a kill, for every script: one run per output, results tied to their inputs, resumable work.

    OUT.lock, OUT/.lock       an OS lock (flock) held for the whole run: a second run on the same output is refused
    settings, meta.json       what a run was made with: flags, and the contents of its inputs (SHA-256); a rerun or
                              --resume with other ones is refused, naming the flag
    OUT.part<rank>            rescore.py's and evaluate.py's finished records, appended and flushed one batch at a
                              time by each rank; a rerun skips them and merges everything in input order
    OUT/checkpoints/step_N/   train.py: each rank's shards of model and optimizer (torch.distributed.checkpoint), its
                              RNG state, and meta.json (step, world size, settings); the newest `keep` are kept
    OUT/final/                train.py: the consolidated model and tokenizer, AutoModelForCausalLM.from_pretrained

Every folder or file is written under a .tmp name and renamed once complete, so a kill, a full disk or a
folder turned read-only leaves the previous one rather than half of one, and a failed write is one line that
says what was kept. `--resume` continues from the newest *complete* checkpoint: one whose shard files are all
present at their recorded sizes, so a damaged newest folder is reported, skipped and deleted.
"""

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import io
import json
import os
import pickle
import shutil
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from data import UserError

# train.py flags a resumed run may change: where and how often it reports, how the same global batch is split,
# and how the same arithmetic is laid out. Any other change would alter the data order or the objective.
# (--batch-size may change only under --reduction paper: "official" averages within each micro-batch.)
# --train and --dev are compared by their contents (a moved file is the same file).
FREE_ON_RESUME = {"resume", "out", "max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints",
                  "activation_checkpointing", "cpu_offload", "compile", "export_dtype", "share_prompt",
                  "tensorboard", "wandb"}


# ---- one run per output ---------------------------------------------------------------------------------

@contextlib.contextmanager
def ranks():
    """(rank, world) of this process; under torchrun with a gloo group for the barriers of rescore.py and
    evaluate.py (CPU collectives serve GPUs too), whose timeout lets a rank wait hours for the slowest."""
    own = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=timedelta(hours=48))
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    finally:
        if own:
            dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def lock(path, flag, out):
    """Hold the lock file `path` for the whole run, on rank 0, telling every rank whether it could; a second run
    gets one line naming the output, before it reads or writes anything. The kernel releases a flock when its
    process dies, so a killed run leaves no stale lock."""
    fd, error = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        while fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = f"{flag} {out}: another run is writing it now (it holds {path}); wait for it, or choose another {flag}"
                break
            except OSError as e:
                error = f"{flag} {out}: cannot create the lock file {path} ({e.strerror})"
                break
            if not os.path.exists(path) or os.stat(path).st_ino != os.fstat(fd).st_ino:
                os.close(fd)                 # the run before us removed it after we opened it: take the new one
                fd = None
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
            os.remove(path)                  # still ours: we hold it
            os.close(fd)


# ---- results tied to what they were made from ----------------------------------------------------------------

def fingerprint(path):
    """What an input was: {"path", "sha256"}. A file's SHA-256; a folder's (a checkpoint), over its small files'
    contents and its large files' sizes and modification times (weights are too big to read at every run);
    a hub id is just its name."""
    if not os.path.exists(path):
        return {"path": path, "sha256": None}
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(glob.escape(path), "**"),
                                                                 recursive=True))
    for name in filter(os.path.isfile, files):
        stat = os.stat(name)
        digest.update(os.path.relpath(name, path).encode())
        if stat.st_size > 64 << 20 and name != path:
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
            continue
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}


def check_settings(saved, now, where, free=()):
    """Refuse, in one line naming the flag, to continue work made with other settings or from other inputs.
    Settings are {flag: value}; an input's value is its fingerprint, compared by contents (a moved file is fine)."""
    for flag in sorted(set(now) - set(free)):
        old, new = saved.get(flag), now[flag]
        if isinstance(new, dict) and isinstance(old, dict) and (
                new["sha256"] and old.get("sha256") == new["sha256"]                   # the same contents
                or old.get("sha256") is None and old.get("path") == new["path"]):      # a hub id, or not recorded
            continue
        if old != new:
            if isinstance(new, dict) and isinstance(old, dict) and old.get("path") == new["path"]:
                raise UserError(f"{flag} {new['path']}: its contents changed since {where} was made from it; "
                                "restore them, or start over with a new --out")
            shown = [v["path"] if isinstance(v, dict) else v for v in (old, new)]
            raise UserError(f"{where} was made with {flag} {shown[0]}, not {shown[1]}; rerun with the same "
                            "settings, or start over with a new --out")


def write_json(path, obj):
    """One JSON document (settings, results), written atomically; a failed write is one line."""
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); rerun once there is room") from None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it to start over") from None


# ---- resumable parts (rescore.py, evaluate.py) ---------------------------------------------------------------

def finished_bytes(path):
    """A part file up to its last newline: a run killed mid-write leaves at most one unfinished line after it."""
    with open(path, "rb") as f:
        content = f.read()
    return content[:content.rfind(b"\n") + 1]


def read_parts(paths, keep=lambda record: True):
    """{id: record} over the part files of every rank of every earlier run (whatever its number of ranks): the
    first record of each id that `keep` accepts. A broken line before the last is an error naming file:line."""
    records = {}
    for path in paths:
        for line_no, line in enumerate(finished_bytes(path).decode("utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
                if keep(record):
                    records.setdefault(record["id"], record)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{line_no}: broken line; delete the file to redo its records") from None
    return records


@contextlib.contextmanager
def appending(path, kept):
    """-> write(lines): append finished records to this rank's part file, flushed, so a kill loses at most the
    batch in hand. An unfinished last line is cut first. A failed write is one line saying what is kept."""
    try:
        if os.path.exists(path):
            os.truncate(path, len(finished_bytes(path)))
        with open(path, "a", encoding="utf-8") as f:
            def write(lines):
                f.write("".join(lines))
                f.flush()
            yield write
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); {kept} are kept, rerun the same command once "
                        "there is room") from None


# ---- train.py: sharded checkpoints -------------------------------------------------------------------------

def step_dirs(out):
    """Every step_N folder of OUT/checkpoints, oldest first (.tmp folders excluded)."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("step_") and not n.endswith(".tmp")) \
        if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def damage(path):
    """None if the checkpoint folder is complete, else what is wrong with it."""
    try:
        meta = read_json(os.path.join(path, "meta.json"))
        storage = dcp.FileSystemReader(path).read_metadata().storage_data
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        return f"unreadable: {e}"
    need = {f"rng_rank{r}.pt": 1 for r in range(meta.get("world", 1))}
    for item in storage.values():                          # each tensor's byte range in its shard file
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(need.items()):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
        if os.path.getsize(os.path.join(path, name)) < size:
            return f"{name} is truncated"
    return None


def find_resumable(cfg, inputs, log=print):
    """-> the newest complete checkpoint of cfg.out, after checking its run had the same settings and inputs;
    None when there is no checkpoint yet (a requeued job that was stopped before its first one starts fresh)."""
    damaged = []
    for path in reversed(step_dirs(cfg.out)):
        problem = damage(path)
        if problem is None:
            break
        damaged.append(path)
        log(f"warning: --resume: {path} is damaged ({problem}); it is skipped, and deleted once the run resumes")
    else:
        if damaged or os.path.exists(os.path.join(cfg.out, "final")):
            raise UserError(f"--resume: no complete checkpoint in {cfg.out}/checkpoints"
                            + (f" ({len(damaged)} damaged)" if damaged else ", though final/ exists"))
        log(f"--resume: no checkpoint in {cfg.out} yet, starting at step 0")
        return None
    meta = read_json(os.path.join(path, "meta.json"))
    flags = lambda config: {f"--{k.replace('_', '-')}": v for k, v in config.items()}
    saved = dataclasses.asdict(type(cfg)()) | meta["config"]          # a flag its version lacked had its default
    recorded = meta.get("inputs") or {f: {"path": os.path.abspath(p), "sha256": None} if p else None
                                      for f, p in (("--train", saved["train"]), ("--dev", saved["dev"]))}
    free = FREE_ON_RESUME | ({"batch_size"} if cfg.reduction == "paper" else set())
    check_settings(flags(saved) | recorded, flags(dataclasses.asdict(cfg)) | inputs, f"--resume: {path}",
                   free={f"--{k.replace('_', '-')}" for k in free})
    return path


def clean(cfg, resume_from, rank):
    """Rank 0, before training: remove .tmp folders left by a kill, and the damaged checkpoints newer than the
    one we resume from (the resumed run writes them again); keep log.jsonl to the steps that will not rerun."""
    if rank != 0:
        return
    final = os.path.join(cfg.out, "final")
    if os.path.isdir(final + ".old") and not os.path.exists(final):   # a kill in the middle of export_hf's swap
        os.replace(final + ".old", final)
    for path in glob.glob(os.path.join(glob.escape(cfg.out), "checkpoints", "*.tmp")) + \
            glob.glob(glob.escape(final) + ".tmp") + glob.glob(glob.escape(final) + ".old"):
        shutil.rmtree(path)
    for path in step_dirs(cfg.out) if resume_from else []:
        if path > resume_from:                                 # step_N names sort by N
            shutil.rmtree(path)
    start = read_step(resume_from) if resume_from else 0
    log = os.path.join(cfg.out, "log.jsonl")
    if os.path.exists(log):            # a resumed run logs the steps after `start` again: drop the old lines,
        with open(log, "rb") as f:     # and a line a kill left unfinished
            lines = f.read().decode("utf-8", errors="replace").split("\n")[:-1]
        with open(log + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in lines if 0 < (logged_step(line) or 0) <= start)
        os.replace(log + ".tmp", log)


def logged_step(line):
    """The step of a log.jsonl line, None if the line is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) else None


def read_step(path):
    return read_json(os.path.join(path, "meta.json"))["step"]


def save(cfg, model, optimizer, step, rank, world, inputs):
    """Each rank writes its own shards (DCP) into step_N.tmp; rank 0 writes meta.json and renames the folder once
    every rank has finished. The folder must be shared by all nodes. A write the filesystem refuses, on any rank
    and at any stage, stops every rank with the same one line."""
    path = os.path.join(cfg.out, "checkpoints", f"step_{step:07d}")
    if rank == 0:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
    dist.barrier()
    problem = None
    try:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=path + ".tmp")           # every rank learns of any rank's failure
        rng = io.BytesIO()
        torch.save(torch.get_rng_state(), rng)
        with open(os.path.join(path + ".tmp", f"rng_rank{rank}.pt"), "wb") as f:   # a refusal is an OSError here
            f.write(rng.getvalue())
    except (OSError, CheckpointException) as e:
        failures = [x[0] for x in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        problem = refused_write(failures[0])
        if not all(refused_write(x) for x in failures):
            raise
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    if rank == 0 and not any(problems):
        try:
            with open(os.path.join(path + ".tmp", "meta.json"), "w") as f:
                json.dump({"step": step, "world": world, "config": dataclasses.asdict(cfg), "inputs": inputs}, f)
            shutil.rmtree(path, ignore_errors=True)           # a damaged folder of the same step, from before
            os.replace(path + ".tmp", path)
            for old in step_dirs(cfg.out)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old)
        except OSError as e:
            problems[0] = e.strerror
    verdict = [next(filter(None, problems), None)]
    dist.broadcast_object_list(verdict, src=0)                 # rank 0's last word: every rank stops, or none
    if verdict[0]:
        raise UserError(f"cannot write {path}.tmp ({verdict[0]}): the checkpoints before it are kept; rerun with "
                        "--resume once there is room")


def refused_write(e):
    """What the filesystem said when it refused a write (a full disk, a quota, a folder turned read-only), or None
    for any other error. torch's own zip writer reports a short write as a RuntimeError about the file position."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "PytorchStreamWriter failed" in str(e)):
        return "the file could not be written in full"
    return None


def load(path, model, optimizer, rank):
    """Model, optimizer and RNG state of the checkpoint `path`, in place into this rank's shards -> its step."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng):                                    # a rank the earlier run did not have starts fresh
        torch.set_rng_state(torch.load(rng))
    return read_step(path)


# ---- train.py: the Hugging Face export ------------------------------------------------------------------------

def export_dtype(cfg):
    """--export-dtype auto: the dtype the source checkpoint was stored in (its config's), float32 if it says none."""
    if cfg.export_dtype != "auto":
        return getattr(torch, cfg.export_dtype)
    stored = getattr(AutoConfig.from_pretrained(cfg.model), "dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def export_hf(cfg, model, tokenizer, rank):
    """One consolidated checkpoint with the tokenizer in OUT/final, gathered one tensor at a time (rank 0 holds
    the whole model in CPU memory once), written to final.tmp and renamed when complete."""
    dtype = export_dtype(cfg)
    full = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor   # every rank takes part
        if rank == 0:
            full[name] = tensor.to("cpu", dtype)
    if rank == 0:
        final = os.path.join(cfg.out, "final")
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=dtype)
        plain.load_state_dict(full, assign=True)
        plain.tie_weights()                                    # assign=True replaced the tied tensors one by one
        shutil.rmtree(final + ".tmp", ignore_errors=True)
        try:
            plain.save_pretrained(final + ".tmp")
            tokenizer.save_pretrained(final + ".tmp")
        except OSError as e:
            raise UserError(f"cannot write {final}.tmp ({e.strerror}): the checkpoints are kept; rerun with --resume "
                            "once there is room, to export again") from None
        if os.path.exists(final):                              # swapped, so that some final/ exists at all times
            os.replace(final, final + ".old")
        os.replace(final + ".tmp", final)
        shutil.rmtree(final + ".old", ignore_errors=True)
        print(f"saved {final} ({str(dtype).removeprefix('torch.')})")
    dist.barrier()
