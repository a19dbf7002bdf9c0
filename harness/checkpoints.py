"""What survives a kill of train.py: sharded checkpoints verified before use, resume and the export.

    OUT/checkpoints/step_N/   each rank's shards of the model and AdamW's state
                              (torch.distributed.checkpoint), its RNG state, and meta.json: the
                              step, the world size, the settings, the fingerprints of the inputs,
                              and the SHA-256 of every file; the newest --keep-checkpoints are kept
    OUT/final/                the consolidated model and tokenizer:
                              AutoModelForCausalLM.from_pretrained(OUT/final)

Every folder is written under a fresh temporary name, flushed to disk and renamed once complete, so
a kill, a full disk or a folder turned read-only leaves the previous checkpoint rather than half of
one, and a refused write is one line on every rank. A checkpoint or an export whose weights or
optimizer state are not finite is never written: the run stops in one line instead. `--resume`
checks every file of the newest checkpoint against its recorded SHA-256 before anything is read,
loads it, and checks that what it loaded is finite; a damaged checkpoint is named in one line and
skipped for the newest intact one. It refuses other settings or other inputs
(fingerprints.check_settings), and starts at step 0 where there is no checkpoint yet.

What is trusted: nothing in a checkpoint runs code. Its tensors are read as tensors; the one pickle
DCP writes (.metadata, the index of the shards) is read by an unpickler that builds DCP's own index
classes and refuses anything else, and must list tensors only; AdamW's hyperparameters are not
stored (they are the flags, which a resume must repeat). The hashes detect damage, not an attacker
who rewrites meta.json too.
"""

import dataclasses
import glob
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from data import UserError
from harness.files import atomic_file, read_json
from harness.fingerprints import check_settings
# train.py flags a resumed run may change: where and how often it reports, how the same global batch
# is split, and how the same arithmetic is laid out. Any other change would alter the data order or
# the objective. (--batch-size may change only under --reduction paper: "official" averages within
# each micro-batch.) --model, --tokenizer, --train and --dev are compared by contents, as inputs.
FREE_ON_RESUME = {"resume", "out", "max_steps", "log_every", "eval_every", "save_every",
                  "keep_checkpoints", "activation_checkpointing", "cpu_offload", "compile",
                  "export_dtype", "share_prompt", "pack", "pack_len", "tensorboard", "wandb",
                  "max_skipped"}


# ---- saving --------------------------------------------------------------------------------------

def save(cfg, model, optimizer, step, rank, world, inputs):
    """Each rank writes its own shards (DCP) into a fresh step_N.*.tmp folder and hashes them;
    rank 0 writes meta.json and renames the folder once every rank has finished. The folder must be
    shared by all nodes. A write the filesystem refuses, on any rank and at any stage, stops every
    rank with the same one line; so does a state that is not finite."""
    path = os.path.join(cfg.out, "checkpoints", f"step_{step:07d}")
    state, made = training_state(model, optimizer), [None, None]
    if rank == 0:                                           # a fresh name no planted file can hold
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            made[0] = tempfile.mkdtemp(dir=os.path.dirname(path),
                                       prefix=f"{os.path.basename(path)}.", suffix=".tmp")
        except OSError as e:
            made[1] = e.strerror
    dist.broadcast_object_list(made, src=0)
    temporary, problem = made
    problem = problem or (None if finite(state) else "not finite")
    problem, hashes = (problem, {}) if problem else write_shards(state, temporary, rank)
    gathered = [None] * world
    dist.all_gather_object(gathered, (problem, hashes))
    problems = [p for p, _ in gathered]
    if rank == 0 and not any(problems):
        try:
            meta = {"step": step, "world": world, "config": dataclasses.asdict(cfg),
                    "inputs": inputs, "files": {name: h for _, files in gathered
                                                for name, h in sorted(files.items())}}
            with atomic_file(os.path.join(temporary, "meta.json")) as f:
                f.write(json.dumps(meta).encode())
            fsync_folder(temporary)
            shutil.rmtree(path, ignore_errors=True)          # a damaged folder of the same step
            os.replace(temporary, path)
            fsync_folder(os.path.dirname(path))
            for old in step_dirs(cfg.out)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old)
        except OSError as e:
            problems[0] = e.strerror
    verdict = [next(filter(None, problems), None)]
    dist.broadcast_object_list(verdict, src=0)               # rank 0's last word: all stop, or none
    if verdict[0]:
        if rank == 0 and temporary:
            shutil.rmtree(temporary, ignore_errors=True)
        if verdict[0] == "not finite":
            raise UserError(f"training diverged: the weights or AdamW's state at step {step} are "
                            "not finite, so they were not saved; the checkpoints before it are "
                            "kept: lower --lr and resume from one (--resume)")
        raise UserError(f"cannot write {path} ({verdict[0]}): the checkpoints before it are kept; "
                        "rerun with --resume once there is room")


def write_shards(state, folder, rank):
    """This rank's shards (DCP) and RNG state, flushed, into `folder` -> (what the filesystem said
    if it refused a write, else None; {file: SHA-256} of what this rank wrote)."""
    try:
        dcp.save(state, checkpoint_id=folder)               # each rank learns of any rank's failure
        rng = io.BytesIO()
        torch.save(torch.get_rng_state(), rng)
        with open(os.path.join(folder, f"rng_rank{rank}.pt"), "xb") as f:   # refused: OSError
            f.write(rng.getvalue())
            os.fsync(f.fileno())
        mine = [f"rng_rank{rank}.pt"] + [".metadata"] * (rank == 0) + \
            [n for n in os.listdir(folder) if n.startswith(f"__{rank}_")]
        return None, {name: sha256(os.path.join(folder, name)) for name in mine}
    except (OSError, CheckpointException) as e:
        failures = [x[0] for x in e.failures.values()] if isinstance(e, CheckpointException) \
            else [e]
        if not all(refused_write(x) for x in failures):
            raise
        return refused_write(failures[0]), {}


def training_state(model, optimizer):
    """What a checkpoint holds: this rank's shards of the model and of AdamW's per-parameter state
    (its moments and step count: tensors only); AdamW's hyperparameters are the flags'."""
    return {"model": get_model_state_dict(model),
            "optim": {"state": get_optimizer_state_dict(model, optimizer)["state"]}}


def finite(state):
    """Whether every tensor of this rank's part of a state is finite, agreed by every rank."""
    tensors = [t.to_local() if isinstance(t, DTensor) else t
               for t in _leaves(state) if torch.is_tensor(t) and t.is_floating_point()]
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors \
        else torch.tensor(True)
    ok = ok.float().reshape(1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_folder(path):
    """A rename or a new file is on the disk once its folder is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refused_write(e):
    """What the filesystem said when it refused a write (a full disk, a quota, a folder turned
    read-only), or None for any other error. torch's own zip writer reports a short write as a
    RuntimeError about the file position."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, RuntimeError) and ("unexpected pos" in str(e)
                                        or "PytorchStreamWriter failed" in str(e)):
        return "the file could not be written in full"
    return None


# ---- resuming ------------------------------------------------------------------------------------

def step_dirs(out):
    """Every step_N folder of OUT/checkpoints, oldest first (.tmp folders excluded)."""
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("step_")
                   and not n.endswith(".tmp")) if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def find_resumable(cfg, inputs, rank, world, log=print):
    """-> the checkpoints a resume may use, newest first: the newest intact one (every file hashed),
    after checking that its run had the same settings and inputs, then the older ones, which load()
    verifies only if it falls back to them; [] when there is none yet (a requeued job stopped
    before its first checkpoint starts fresh). Each damaged one is named in one line and skipped."""
    intact, damaged, paths = [], 0, step_dirs(cfg.out)[::-1]
    for n, path in enumerate(paths):
        problem = damage(path, rank, world)
        if problem:
            damaged += 1
            log(f"warning: --resume: {path} is damaged ({problem}); it is skipped, and deleted "
                "once the run resumes")
        else:
            intact = paths[n:]
            break
    if not intact:
        if damaged or os.path.exists(os.path.join(cfg.out, "final")):
            raise UserError(f"--resume: no complete checkpoint in {cfg.out}/checkpoints"
                            + (f" ({damaged} damaged)" if damaged else ", though final/ exists"))
        log(f"--resume: no checkpoint in {cfg.out} yet, starting at step 0")
        return []
    path = intact[0]
    meta = read_json(os.path.join(path, "meta.json"))
    flags = lambda config: {f"--{k.replace('_', '-')}": v for k, v in config.items()}
    saved = dataclasses.asdict(type(cfg)()) | meta["config"]   # a flag its version lacked: default
    # inputs are compared by their contents; what an older version did not record, by its path
    legacy = {f: {"path": os.path.abspath(p) if os.path.exists(p) else p, "sha256": None}
              if p else None
              for f, p in (("--train", saved["train"]), ("--dev", saved["dev"]),
                           ("--model", saved["model"]), ("--tokenizer", saved["tokenizer"]))}
    recorded = legacy | (meta.get("inputs") or {})
    free = FREE_ON_RESUME | ({"batch_size"} if cfg.reduction == "paper" else set())
    check_settings(flags(saved) | recorded, flags(dataclasses.asdict(cfg)) | inputs,
                   f"--resume: {path}", free={f"--{k.replace('_', '-')}" for k in free})
    if 0 < cfg.max_steps < meta["step"]:
        raise UserError(f"--max-steps {cfg.max_steps}: {path} is already past it; resume with a "
                        "larger one")
    return intact


def damage(path, rank=0, world=1):
    """None if every file of the checkpoint folder is as it was written, else what is wrong with it.
    The ranks share the hashing, and every rank gets the same answer."""
    problem = None
    try:
        meta = read_json(os.path.join(path, "meta.json"))
        files = meta.get("files")
        if not isinstance(files, dict):               # written by an earlier version: sizes only
            problem = legacy_damage(path, meta) if rank == 0 else None
        else:      # every file a resume reads is listed (none goes unchecked) and as written
            unlisted = [n for n in sorted(os.listdir(path)) if n not in files and (
                n == ".metadata" or n.endswith(".distcp") or n.startswith("rng_rank"))]
            problem = f"{unlisted[0]} is not among the files it recorded" if unlisted else None
            for name in [] if problem else sorted(files)[rank::world]:
                if not os.path.isfile(os.path.join(path, name)):
                    problem = f"{name} is missing"
                elif sha256(os.path.join(path, name)) != files[name]:
                    problem = f"{name} is not what was written (its SHA-256 differs)"
                if problem:
                    break
    except (OSError, UserError) as e:
        problem = f"unreadable: {e}"
    problems = [problem] * world
    if dist.is_initialized():
        dist.all_gather_object(problems, problem)
    return next(filter(None, problems), None)


def legacy_damage(path, meta):
    """An earlier version's checkpoint, without hashes: its shard files at their recorded sizes."""
    try:
        storage = SafeReader(path).read_metadata().storage_data
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
        return f"unreadable: {e}"
    need = {f"rng_rank{r}.pt": 1 for r in range(meta.get("world", 1))}
    for item in storage.values():                       # each tensor's byte range in its shard file
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(need.items()):
        if not os.path.isfile(os.path.join(path, name)):
            return f"{name} is missing"
        if os.path.getsize(os.path.join(path, name)) < size:
            return f"{name} is truncated"
    return None


def load(candidates, model, optimizer, rank, log=print):
    """The newest of find_resumable's checkpoints that is intact (the first was verified there),
    loads and is finite, into this rank's shards of the model and AdamW, and its RNG state -> its
    step (0 with no candidate)."""
    for n, path in enumerate(candidates):
        problem = damage(path, rank, dist.get_world_size()) if n else None
        if problem:
            log(f"warning: --resume: {path} is damaged ({problem}); the one before it is tried")
            continue
        state = training_state(model, optimizer)
        try:
            dcp.load(state, checkpoint_id=path, storage_reader=SafeReader(path),
                     planner=TensorsOnly())
            rng = os.path.join(path, f"rng_rank{rank}.pt")     # none for a new rank: fresh
            rng = torch.load(rng, weights_only=True) if os.path.exists(rng) else None
            problem = None
        except (CheckpointException, OSError, RuntimeError, pickle.UnpicklingError,
                EOFError) as e:
            e = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) \
                and e.failures else e
            problem = f"unreadable: {' '.join(str(e).split())[:200]}"    # a rank's own error
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        problem = next(filter(None, problems), None) or (None if finite(state) else "not finite")
        if problem:
            log(f"warning: --resume: {path} is damaged ({problem}); the one before it is tried")
            continue
        set_model_state_dict(model, state["model"])
        full = get_optimizer_state_dict(model, optimizer)
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"]["state"],
                                                    "param_groups": full["param_groups"]})
        if rng is not None:
            torch.set_rng_state(rng)
        return read_json(os.path.join(path, "meta.json"))["step"]
    if candidates:
        raise UserError(f"--resume: no checkpoint of {os.path.dirname(candidates[0])} could be "
                        "loaded (each is named above)")
    return 0


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, whose index (.metadata, a pickle) may build DCP's own index classes and nothing
    else: a pickle planted in a shared checkpoint folder cannot run code."""

    def read_metadata(self, *args, **kwargs):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = IndexUnpickler(f).load()
        if not isinstance(metadata, dcp.metadata.Metadata):
            raise pickle.UnpicklingError("the index is not a DCP Metadata")
        # An entry of another kind (BytesStorageMetadata) would be read with torch.load's full
        # unpickler; ours are tensors only (an earlier version's AdamW hyperparameters are never
        # read: the training state does not ask for them, and TensorsOnly would refuse them).
        others = [key for key, entry in metadata.state_dict_metadata.items()
                  if not isinstance(entry, dcp.metadata.TensorStorageMetadata)
                  and not key.startswith("optim.param_groups.")]
        if others:
            raise pickle.UnpicklingError(f"the index lists {others[0]!r} as other than a tensor, "
                                         "which a training state never holds: refused")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnly(dcp.DefaultLoadPlanner):
    """DCP's planner, but a non-tensor entry, which DCP reads with torch.load's full unpickler, is
    refused."""

    def load_bytes(self, read_item, value):
        raise pickle.UnpicklingError(f"{read_item.dest_index.fqn} is not a tensor: refused")


class IndexUnpickler(pickle.Unpickler):
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
               ("collections", "OrderedDict")}

    def find_class(self, module, name):
        value = super().find_class(module, name) if module in ("torch", "pathlib", "collections") \
            or module.startswith("torch.distributed.checkpoint") \
            or module == "torch.serialization" else None
        if (module, name) in self.ALLOWED or isinstance(value, torch.dtype) or (
                module == "torch.distributed.checkpoint.metadata" and isinstance(value, type)):
            return value
        raise pickle.UnpicklingError(f"the checkpoint index asks for {module}.{name}, which DCP's "
                                     "index never holds: refused")


def clean(cfg, start, rank):
    """Rank 0, once the resumed checkpoint is loaded: remove the temporary folders a kill left, and
    the checkpoints newer than step `start` (damaged: the resumed run writes them again); keep
    log.jsonl to the steps that will not rerun."""
    if rank == 0:
        final = os.path.join(cfg.out, "final")
        if os.path.isdir(final + ".old") and not os.path.exists(final):  # export_hf killed mid-swap
            os.replace(final + ".old", final)
        for path in glob.glob(os.path.join(glob.escape(cfg.out), "checkpoints", "*.tmp")) + \
                glob.glob(glob.escape(final) + "*.tmp") + glob.glob(glob.escape(final) + ".old"):
            os.remove(path) if os.path.islink(path) or not os.path.isdir(path) \
                else shutil.rmtree(path)
        for path in step_dirs(cfg.out):
            if int(os.path.basename(path).split("_")[1]) > start:     # step_N names say N
                shutil.rmtree(path)
        log = os.path.join(cfg.out, "log.jsonl")
        if os.path.exists(log):        # a resumed run logs the steps after `start` again: drop
            with open(log, "rb") as f:  # the old lines, and a line a kill left unfinished
                lines = f.read().decode("utf-8", errors="replace").split("\n")[:-1]
            with atomic_file(log) as f:
                f.write("".join(line + "\n" for line in lines
                                if 0 < (logged_step(line) or 0) <= start).encode("utf-8"))
    if dist.is_initialized():
        dist.barrier()                     # the other ranks wait for it


def logged_step(line):
    """The step of a log.jsonl line, None if the line is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) else None


# ---- the Hugging Face export ---------------------------------------------------------------------

def export_dtype(cfg, source):
    """--export-dtype auto: the dtype the source checkpoint was stored in, else float32."""
    if cfg.export_dtype != "auto":
        return getattr(torch, cfg.export_dtype)
    stored = getattr(source, "dtype", None) or torch.float32
    return getattr(torch, stored) if isinstance(stored, str) else stored


def export_hf(cfg, model, tokenizer, rank):
    """One consolidated checkpoint with the tokenizer in OUT/final, gathered one tensor at a time
    (rank 0 holds the whole model in CPU memory once), written under a fresh temporary name, flushed
    to disk and renamed when complete. Weights that are not finite are refused, on every rank."""
    if not finite({"model": model.state_dict()}):
        raise UserError("training diverged: the final weights are not finite, so OUT/final was not "
                        "written; the checkpoints are kept: lower --lr and resume from one")
    source = AutoConfig.from_pretrained(cfg.model, trust_remote_code=False)   # as --model ships it
    dtype, full = export_dtype(cfg, source), {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor  # all ranks join
        if rank == 0:
            full[name] = tensor.to("cpu", dtype)
    if rank == 0:
        final = os.path.join(cfg.out, "final")
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(source, dtype=dtype)
        plain.load_state_dict(full, assign=True)
        plain.tie_weights()                          # assign=True replaced tied tensors one by one
        try:
            temporary = tempfile.mkdtemp(dir=cfg.out, prefix="final.", suffix=".tmp")
            plain.save_pretrained(temporary)
            tokenizer.save_pretrained(temporary)
            for name in os.listdir(temporary):
                with open(os.path.join(temporary, name), "rb+") as f:
                    os.fsync(f.fileno())
            fsync_folder(temporary)
        except OSError as e:
            raise UserError(f"cannot write {final} ({e.strerror}): the checkpoints are kept; rerun "
                            "with --resume once there is room, to export again") from None
        if os.path.exists(final):                    # swapped, so that some final/ always exists
            os.replace(final, final + ".old")
        os.replace(temporary, final)
        fsync_folder(cfg.out)
        shutil.rmtree(final + ".old", ignore_errors=True)
        print(f"saved {final} ({str(dtype).removeprefix('torch.')})")
    dist.barrier()
