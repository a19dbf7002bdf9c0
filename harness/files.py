"""Files written whole or not at all, and the resumable part files of rescore.py and evaluate.py.

    OUT.part<rank>   finished records, appended and flushed one batch at a time by each rank; a rerun
                     skips them, and rank 0 merges everything in input order

A write the filesystem refuses is one line that says what was kept.
"""

import contextlib
import json
import os

from data import UserError


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


def finished_bytes(path):
    """A part file up to its last newline: a kill mid-write leaves at most one unfinished line."""
    with open(path, "rb") as f:
        content = f.read()
    return content[:content.rfind(b"\n") + 1]


def read_parts(paths, keep=lambda record: True):
    """{id: record} over the part files of every rank of every earlier run (whatever its number of
    ranks): the first record of each id that `keep` accepts. A broken line before the last is an error
    naming file:line."""
    records = {}
    for path in paths:
        text = finished_bytes(path).decode("utf-8", errors="replace")
        for line_no, line in enumerate(text.splitlines(), 1):
            try:
                record = json.loads(line)
                if keep(record):
                    records.setdefault(record["id"], record)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{line_no}: broken line; delete the file to redo its "
                                "records") from None
    return records


@contextlib.contextmanager
def appending(path, kept):
    """-> write(lines): append finished records to this rank's part file, flushed, so a kill loses at
    most the batch in hand. An unfinished last line is cut first. A failed write is one line."""
    try:
        if os.path.exists(path):
            os.truncate(path, len(finished_bytes(path)))
        with open(path, "a", encoding="utf-8") as f:
            def write(lines):
                f.write("".join(lines))
                f.flush()
            yield write
    except OSError as e:
        raise UserError(f"{path}: cannot write it ({e.strerror}); {kept} are kept, rerun the same "
                        "command once there is room") from None
