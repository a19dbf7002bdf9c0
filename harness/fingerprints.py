"""Results tied to what they were made from: a fingerprint of each input, and the settings check.

A checkpoint records the fingerprints of --train and --dev; rescore.py of its data and reward model;
evaluate.py of its models. A rerun or a --resume with other settings, or inputs whose contents
changed, is refused in one line naming the flag; a moved but identical file is the same input.
"""

import glob
import hashlib
import os

from data import UserError


def fingerprint(path):
    """What an input was: {"path", "sha256"}. A file's SHA-256; a folder's (a checkpoint), over its
    small files' contents and its large files' sizes and modification times (weights are too big to
    read at every run); a hub id is just its name."""
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
    """Refuse, in one line naming the flag, to continue work made with other settings or from other
    inputs. Settings are {flag: value}; an input's value is its fingerprint, compared by contents."""
    for flag in sorted(set(now) - set(free)):
        old, new = saved.get(flag), now[flag]
        if isinstance(new, dict) and isinstance(old, dict) and (
                new["sha256"] and old.get("sha256") == new["sha256"]             # the same contents
                or old.get("sha256") is None and old.get("path") == new["path"]):  # a hub id
            continue
        if old != new:
            if isinstance(new, dict) and isinstance(old, dict) and old.get("path") == new["path"]:
                raise UserError(f"{flag} {new['path']}: its contents changed since {where} was made "
                                "from it; restore them, or start over with a new --out")
            shown = [v["path"] if isinstance(v, dict) else v for v in (old, new)]
            raise UserError(f"{where} was made with {flag} {shown[0]}, not {shown[1]}; rerun with the "
                            "same settings, or start over with a new --out")
