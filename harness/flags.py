"""Flags from a dataclass, range checks, and a user's mistake as one line.

Each entry script describes its flags as one @dataclass whose fields carry their help text and valid
range (`opt`), parses them with `parse`, and runs its main() through `run`. A mistake found
anywhere, in a flag, a path, a line of data or a resume, is raised as `data.UserError` (data.py is
the lowest module that raises it) with a message that names what to change: `run` prints it as one
line on stderr and exits with status 2, from rank 0 only under torchrun. Any other exception is a
bug in our code and keeps its traceback.
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


class Parser(argparse.ArgumentParser):
    """Every script's command line: a mistake in it is a UserError, not argparse's usage text."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def opt(default, help, *, at_least=None, above=None, choices=None, none=False, nargs=None):
    """A Config field: its default, --help text and valid values. none=True also accepts 'none'."""
    return field(default=default, metadata=dict(help=help, at_least=at_least, above=above,
                                                choices=choices, none=none, nargs=nargs))


def parser_for(config_class, description):
    """An argparse parser with one --flag per field of `config_class`: each default written once."""
    parser = Parser(description=description, allow_abbrev=False)   # --epoch is a typo, not --epochs
    for f in dataclasses.fields(config_class):
        m, flag = f.metadata, "--" + f.name.replace("_", "-")
        limits = [f">= {m['at_least']}" if m["at_least"] is not None else "",
                  f"> {m['above']}" if m["above"] is not None else ""]
        help = m["help"] + "".join(f" [{x}]" for x in limits if x)
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help)
            continue
        kind = (typing.get_args(f.type) or (str,))[0] if f.type.__name__ == "list" else f.type
        if m["none"]:
            kind = (lambda convert: lambda s: None if s.lower() == "none" else convert(s))(kind)
            kind.__name__ = f.type.__name__            # argparse names it in "invalid float value"
        parser.add_argument(flag, type=kind, default=f.default, choices=m["choices"],
                            nargs=m["nargs"], help=help)
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
            # Rank 0 found the same mistake and prints it; once it exits, torchrun stops this
            # process (SIGTERM), which we answer with the same status. Still running after a
            # while: rank 0 did not see it, so say it.
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
            time.sleep(30)
            print(f"error (rank {rank}): {error}", file=sys.stderr, flush=True)
        else:
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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
