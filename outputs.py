"""What a run owns on disk, for every script: one run per output, results tied to their inputs, resumable work.

    OUT.lock, OUT/.lock       an OS lock (flock) held for the whole run: a second run on the same output is refused
    settings                  what a run was made with: flags, and the contents of its inputs (fingerprints); a
                              rerun or a --resume with other ones is refused, naming the flag
    OUT.part<rank>            rescore.py's and evaluate.py's finished records, appended and flushed one batch at a
                              time by each rank; a rerun skips them, and rank 0 merges everything in input order

rescore.py and evaluate.py use all of it; train.py its lock and settings check (its checkpoints: checkpoint.py).
Every file is written whole or not at all, and a write the filesystem refuses is one line that says what was kept.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import os
from datetime import timedelta

import torch.distributed as dist

from data import UserError


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
                error = (f"{flag} {out}: another run is writing it now (it holds {path}); wait for it, or choose "
                         f"another {flag}")
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
