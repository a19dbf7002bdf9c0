"""Files written whole or not at all (samples, settings, results), and the resumable part files of
rescore.py and evaluate.py.

    OUT.part<rank>   finished records, appended and flushed one batch at a time by each rank; a
                     rerun skips them, and rank 0 merges everything in input order

A write the filesystem refuses is one line that says what was kept.
"""

import contextlib
import gzip
import json
import os
import tempfile

from data import UserError

UMASK = os.umask(os.umask(0o022))                     # read once: the mode new files get here


@contextlib.contextmanager
def atomic_file(path):
    """A binary file that replaces `path` whole when the block ends, or leaves it as it was: written
    under a fresh temporary name (never through a file or link planted there), fsynced, renamed."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)                  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_jsonl(path, samples):
    """JSON lines, written atomically (gzipped if the name ends in .gz). A symlink is written
    through: the file it points to is replaced."""
    path = os.path.realpath(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path) as raw, \
                (gzip.GzipFile(fileobj=raw, mode="wb", filename="") if path.endswith(".gz")
                 else contextlib.nullcontext(raw)) as f:
            for s in samples:
                f.write((json.dumps(s, ensure_ascii=False) + "\n").encode("utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); nothing was replaced, rerun once "
                        "there is room") from None


def write_json(path, obj):
    """One JSON document (settings, results), written atomically; a failed write is one line."""
    write_text(path, json.dumps(obj, indent=1))


def write_text(path, text):
    """A text file written atomically (atomic_file); a failed write is one line."""
    try:
        with atomic_file(path) as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); rerun once there is "
                        "room") from None


def read_json(path, shape=dict):
    """A JSON document we wrote, of `shape` (a dict, say): anything else is one line."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it to start over") from None
    if not isinstance(obj, shape):
        raise UserError(f"{path}: not what this file holds (a JSON {shape.__name__}); delete it to "
                        "start over")
    return obj


def open_append(path):
    """A file to append to, refusing to follow a symlink planted under its name."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    return os.fdopen(fd, "a", encoding="utf-8")


def finished_bytes(path):
    """A part file up to its last newline: a kill mid-write leaves at most one unfinished line."""
    with open(path, "rb") as f:
        content = f.read()
    return content[:content.rfind(b"\n") + 1]


class WrongRecord(TypeError):
    """What a `keep` of read_parts raises for a record it cannot use, saying why; read_parts adds
    its file:line."""


def read_parts(paths, keep=lambda record: True):
    """{id: record} over the part files of every rank of every earlier run (whatever its number of
    ranks): the first record of each id that `keep` accepts. A broken line before the last is an
    error naming file:line."""
    records = {}
    for path in paths:
        text = finished_bytes(path).decode("utf-8", errors="replace")
        for line_no, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record["id"], str):
                    raise TypeError
                if keep(record):
                    records.setdefault(record["id"], record)
            except WrongRecord as e:
                raise UserError(f"{path}:{line_no}: {e}; delete the file to redo its "
                                "records") from None
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{path}:{line_no}: broken line; delete the file to redo its "
                                "records") from None
    return records


@contextlib.contextmanager
def appending(path, kept):
    """-> write(lines): append finished records to this rank's part file, flushed, so a kill loses
    at most the batch in hand. An unfinished last line is cut first. A failed write is one line."""
    try:
        with open_append(path) as f:                  # not a symlink: we may cut it
            os.ftruncate(f.fileno(), len(finished_bytes(path)))
            def write(lines):
                f.write("".join(lines))
                f.flush()
            yield write
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); {kept} are kept, rerun the same "
                        "command once there is room") from None
