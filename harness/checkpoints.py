"""What survives a kill of train.py: sharded checkpoints, resume, and the Hugging Face export at the end.

    OUT/checkpoints/step_N/   each rank's shards of model and optimizer (torch.distributed.checkpoint), its RNG
                              state, and meta.json (step, world size, settings, the fingerprints of --train and
                              --dev); the newest --keep-checkpoints are kept
    OUT/final/                the consolidated model and tokenizer: AutoModelForCausalLM.from_pretrained(OUT/final)

Every folder is written under a .tmp name and renamed once complete, so a kill, a full disk or a folder turned
read-only leaves the previous checkpoint rather than half of one, and a refused write is one line on every rank.
`--resume` continues from the newest *complete* checkpoint: one whose shard files are all present at their
recorded sizes, so a damaged newest folder is reported, skipped and deleted; it refuses other settings or other
inputs (fingerprints.check_settings), and starts at step 0 where there is no checkpoint yet.
"""

import dataclasses
import glob
import io
import json
import os
import pickle
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from data import UserError
from harness.files import read_json
from harness.fingerprints import check_settings

# train.py flags a resumed run may change: where and how often it reports, how the same global batch is split,
# and how the same arithmetic is laid out. Any other change would alter the data order or the objective.
# (--batch-size may change only under --reduction paper: "official" averages within each micro-batch.)
# --model, --tokenizer, --train and --dev are compared by their contents (a moved file is the same file).
FREE_ON_RESUME = {"resume", "out", "max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints",
                  "activation_checkpointing", "cpu_offload", "compile", "export_dtype", "share_prompt",
                  "pack", "pack_len", "tensorboard", "wandb"}


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


def prepare(cfg, inputs, rank, log=print):
    """Before training: the checkpoint a --resume continues from (None: start at step 0), then rank 0
    cleans up what a kill left behind, once every rank has read the checkpoints."""
    resume_from = find_resumable(cfg, inputs, log) if cfg.resume else None
    dist.barrier()
    clean(cfg, resume_from, rank)
    dist.barrier()
    return resume_from


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
    # inputs are compared by their contents; what an older version did not record, by its path
    legacy = {f: {"path": os.path.abspath(p) if os.path.exists(p) else p, "sha256": None} if p else None
              for f, p in (("--train", saved["train"]), ("--dev", saved["dev"]),
                           ("--model", saved["model"]), ("--tokenizer", saved["tokenizer"]))}
    recorded = legacy | (meta.get("inputs") or {})
    free = FREE_ON_RESUME | ({"batch_size"} if cfg.reduction == "paper" else set())
    check_settings(flags(saved) | recorded, flags(dataclasses.asdict(cfg)) | inputs, f"--resume: {path}",
                   free={f"--{k.replace('_', '-')}" for k in free})
    if 0 < cfg.max_steps < meta["step"]:
        raise UserError(f"--max-steps {cfg.max_steps}: {path} is already past it; resume with a larger one")
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
