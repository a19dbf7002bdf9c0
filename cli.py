"""The command line of the entry scripts: flags from a dataclass, range checks, and one-line errors.

Each entry script (train.py, rescore.py, evaluate.py, demo.py, benchmark.py, logs.py) describes its flags as one
@dataclass whose fields carry their help text and valid range (`opt`), parses them with `parse`, and runs its
main() through `run`. A user's mistake found anywhere, a bad flag, path, data line or resume, is raised as
`UserError` (defined in data.py, the lowest module that raises it) with a message that names what to change:
`run` prints it as one line on stderr and exits with status 2. Under torchrun only rank 0 prints it. Any other
exception is a bug in our code and keeps its traceback.
"""

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
import typing
from dataclasses import field

from data import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def opt(default, help, *, at_least=None, above=None, choices=None, none=False, nargs=None):
    """A Config field: its default, --help text and valid values. none=True also accepts the word 'none'."""
    return field(default=default, metadata=dict(help=help, at_least=at_least, above=above, choices=choices,
                                                none=none, nargs=nargs))


class Parser(argparse.ArgumentParser):
    def error(self, message):      # argparse would print the whole usage first; one line says what to change
        raise UserError(f"{message} (see --help)")


def parser_for(config_class, description):
    """An argparse parser with one --flag per field of `config_class`, so each default is written once."""
    parser = Parser(description=description, allow_abbrev=False)     # --epoch is a typo, not --epochs
    for f in dataclasses.fields(config_class):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        limits = [f">= {m['at_least']}" if m["at_least"] is not None else "",
                  f"> {m['above']}" if m["above"] is not None else ""]
        help = m["help"] + "".join(f" [{x}]" for x in limits if x)
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
            continue
        kind = (typing.get_args(f.type) or (str,))[0] if f.type.__name__ == "list" else f.type   # list[int]: int
        if m["none"]:
            kind = (lambda convert: lambda s: None if s.lower() == "none" else convert(s))(kind)
            kind.__name__ = f.type.__name__                             # argparse names it in "invalid float value"
        parser.add_argument(flag, type=kind, default=f.default, choices=m["choices"], nargs=m["nargs"], help=help)
    return parser


def parse(config_class, argv=None, description=""):
    """Flags -> a config, every number checked against its field's range."""
    cfg = config_class(**vars(parser_for(config_class, description).parse_args(argv)))
    for f in dataclasses.fields(cfg):
        value, m, flag = getattr(cfg, f.name), f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UserError(f"{flag} {value}: must be a finite number")
        if m["at_least"] is not None and value < m["at_least"]:
            raise UserError(f"{flag} {value}: must be at least {m['at_least']}")
        if m["above"] is not None and value <= m["above"]:
            raise UserError(f"{flag} {value}: must be greater than {m['above']}")
    return cfg


def run(main, argv=None):
    """Call main(argv); a UserError becomes one line on stderr (rank 0) and exit status 2."""
    try:
        return main(argv)
    except UserError as error:
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            # Rank 0 found the same mistake and prints it; once it exits, torchrun stops this process (SIGTERM),
            # which we answer with the same status. Still running after a while: rank 0 did not see it, so say it.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
            time.sleep(30)
            print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)
        else:
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# ---- paths and checkpoints -------------------------------------------------------------------------------------

def input_file(path, flag):
    """Refuse a path that is not an existing file, naming the flag."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a folder, not a file")


def output_dir(path, flag):
    """Create the folder (and its parents) or say why not, before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create this folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: not writable")


def looks_local(path):
    """A path rather than a hub id ('owner/name' or 'name')."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1


def checkpoint_dir(path, flag, tokenizer=False):
    """Refuse, before anything loads, a local checkpoint that is no folder, or has no config.json (a model) or no
    tokenizer files (tokenizer=True)."""
    if looks_local(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such folder (a checkpoint folder, or a hub id such as owner/name)")
    if not tokenizer and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path}: no config.json in this folder, so no checkpoint")
    if tokenizer and os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"{flag} {path}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES)})")


def from_pretrained(loader, path, flag, **kwargs):
    """loader.from_pretrained(path), with a checkpoint whose files are missing, unreadable or cut short (a partial
    download), or a config.json transformers cannot read, as one line naming the flag. Other errors are not the
    user's to fix, and keep their traceback."""
    checkpoint_dir(path, flag, tokenizer=loader.__name__.endswith("Tokenizer"))
    from safetensors import SafetensorError
    user_errors = (OSError, SafetensorError) + ((ValueError,) if loader.__name__ == "AutoConfig" else ())
    try:
        return loader.from_pretrained(path, **kwargs)
    except user_errors as e:
        reason = " ".join(str(e).split()) or type(e).__name__       # the whole message, on one line
        raise UserError(f"{flag} {path}: cannot load it: {reason}") from None
