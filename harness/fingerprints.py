"""Results tied to what they were made from: a fingerprint of each input, and the settings check.

A checkpoint records the fingerprints of --train, --dev, --model and --tokenizer; rescore.py of its
data and reward model; evaluate.py of its models. A rerun or a --resume with other settings, or
inputs whose contents changed, is refused in one line naming the flag; a moved or copied but
identical file or model folder is the same input, and a hub id is its cached revision.
"""

import glob
import hashlib
import os

from data import UserError
from harness import files
from harness.models import looks_local

LARGE = 64 << 20             # a folder's files above this (weights) are sampled, not read whole
BLOCKS, BLOCK = 64, 1 << 18  # what is read of each: 64 evenly spaced blocks of 256 KiB, the first
                             # (a safetensors header) and the last among them


def fingerprint(path, exclude=()):
    """What an input was: {"path", "sha256"}. A file's SHA-256, read whole; a folder's (a model)
    over its files' names and contents, its large files (weights) by their size and evenly spaced
    blocks: read whole, LLaMA-7B's 13.5 GB would take minutes at every run, and a modification
    time changes with every copy. `exclude`: folders or files inside it to leave out (an output
    written there). A hub id is its revision in the local cache ("revision": the commit), else its
    name."""
    if not os.path.exists(path):
        revision = None if looks_local(path) else hub_revision(path)
        if revision is None:
            return {"path": path, "sha256": None}
        return {"path": path, "revision": revision,
                "sha256": hashlib.sha256(f"revision {revision}".encode()).hexdigest()}
    digest = hashlib.sha256()
    for name, relative in files_of(path, exclude):
        digest.update(relative.encode())
        size = os.path.getsize(name)
        with open(name, "rb") as f:
            if size > LARGE and name != path:      # a plain input file (--train) is read whole
                digest.update(f"{size} sampled".encode())
                for n in range(BLOCKS):
                    f.seek(n * (size - BLOCK) // (BLOCKS - 1))
                    digest.update(f.read(BLOCK))
                continue
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}


def files_of(path, exclude=()):
    """(file, its path relative to `path`) of a file, or of a folder's files in a fixed order, as
    glob lists them (no hidden files): as every earlier version hashed them."""
    if os.path.isfile(path):
        return [(path, ".")]
    root = os.path.realpath(path)
    inside = [os.path.relpath(os.path.realpath(e), root) for e in exclude]
    inside = [e for e in inside if e != "." and not e.startswith(os.pardir)]
    names = sorted(glob.glob(os.path.join(glob.escape(path), "**"), recursive=True))
    pairs = [(name, os.path.relpath(name, path)) for name in filter(os.path.isfile, names)]
    return [(name, rel) for name, rel in pairs
            if not any(rel == e or rel.startswith(e + os.sep) for e in inside)]


def hub_revision(repo_id):
    """The commit that huggingface_hub's cache resolves `repo_id` (main) to, read offline, or None.
    The cache is found as huggingface_hub finds it, from the environment as it is now."""
    cache_home = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = os.getenv("HF_HOME", os.path.join(cache_home, "huggingface"))
    cache = os.getenv("HF_HUB_CACHE",
                      os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    repo = os.path.join(os.path.expandvars(os.path.expanduser(cache)),
                        "models--" + repo_id.replace("/", "--"))
    try:
        with open(os.path.join(repo, "refs", "main"), encoding="utf-8") as f:
            revision = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = os.path.join(repo, "snapshots", revision)
    return revision if revision and os.path.isdir(snapshot) else None


def dated_sha256(path):
    """A folder's fingerprint as versions before the sampled one made it (large files by size and
    modification time), so that what they recorded is still recognised."""
    digest = hashlib.sha256()
    for name, relative in files_of(path):
        stat = os.stat(name)
        digest.update(relative.encode())
        if stat.st_size > LARGE:
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
            continue
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def same_input(old, new):
    """Whether a recorded fingerprint and today's are of the same input."""
    if not isinstance(old, dict):
        return False
    if new["sha256"] and old.get("sha256") == new["sha256"]:               # the same contents
        return True
    if old.get("sha256") is None and old.get("path") == new["path"]:       # recorded by name
        return True
    # a folder recorded by an earlier version: its large files by size and modification time
    return (isinstance(old.get("sha256"), str) and "revision" not in old
            and new["sha256"] is not None and os.path.isdir(new["path"])
            and old["sha256"] == dated_sha256(new["path"]))


def check_settings(saved, now, where, free=()):
    """Refuse, in one line naming the flag, to continue work made with other settings or from other
    inputs. Settings are {flag: value}, an input's value its fingerprint, compared by contents."""
    for flag in sorted(set(now) - set(free)):
        old, new = saved.get(flag), now[flag]
        if isinstance(new, dict) and same_input(old, new):
            continue
        if old != new:
            if isinstance(new, dict) and isinstance(old, dict) and old.get("path") == new["path"]:
                if "revision" in old or "revision" in new:
                    raise UserError(f"{flag} {new['path']}: the hub revision is "
                                    f"{new.get('revision') or 'not in the local cache'}, not "
                                    f"{old.get('revision') or 'unknown'} as when {where} was made "
                                    "from it; put that revision back in the cache (huggingface-"
                                    "cli download --revision), or start over with a new --out")
                raise UserError(f"{flag} {new['path']}: its contents changed since {where} was "
                                "made from it; restore them, or start over with a new --out")
            shown = [v["path"] if isinstance(v, dict) else v for v in (old, new)]
            raise UserError(f"{where} was made with {flag} {shown[0]}, not {shown[1]}; rerun with "
                            "the same settings, or start over with a new --out")


def check_made_by(settings_path, now, where):
    """Continue part files left by an earlier run only if its settings.json says they were made with
    these settings, from these inputs (check_settings); with none, say to delete them."""
    if not os.path.exists(settings_path):
        raise UserError(f"{where}: its parts have no {os.path.basename(settings_path)} to say what "
                        "made them; delete them")
    check_settings(files.read_json(settings_path), now, where)
