"""Loading a checkpoint or a tokenizer, with a folder or file that cannot be used as one line; and
building a model whose parameters take no memory until FSDP has sharded them."""

import os

import torch

from data import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def looks_local(path):
    """A path rather than a hub id ('owner/name' or 'name')."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1


def checkpoint_dir(path, flag, tokenizer=False):
    """Refuse, before anything loads, a local checkpoint that is no folder, or has no config.json (a
    model) or no tokenizer files (tokenizer=True)."""
    if looks_local(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such folder (a checkpoint folder, or a hub id such as "
                        "owner/name)")
    if not tokenizer and os.path.isdir(path) \
            and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path}: no config.json in this folder, so no checkpoint")
    if tokenizer and os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                                     for f in TOKENIZER_FILES):
        raise UserError(f"{flag} {path}: no tokenizer in this folder (none of "
                        f"{', '.join(TOKENIZER_FILES)})")


def from_pretrained(loader, path, flag, **kwargs):
    """loader.from_pretrained(path), with a checkpoint whose files are missing, unreadable or cut
    short (a partial download), or a config.json transformers cannot read, as one line naming the
    flag. Other errors are not the user's to fix, and keep their traceback."""
    checkpoint_dir(path, flag, tokenizer=loader.__name__.endswith("Tokenizer"))
    from safetensors import SafetensorError
    user_errors = (OSError, SafetensorError) \
        + ((ValueError,) if loader.__name__ == "AutoConfig" else ())
    try:             # nothing in a model folder runs code: never its own modelling files
        return loader.from_pretrained(path, **{"trust_remote_code": False, **kwargs})
    except user_errors as e:
        reason = " ".join(str(e).split()) or type(e).__name__       # the whole message, on one line
        raise UserError(f"{flag} {path}: cannot load it: {reason}") from None


class parameters_on_meta:
    """Build a model whose parameters take no memory (the meta device) while its buffers are
    computed for real by each module's own __init__ (rotary inv_freq and the like). Those buffers
    are in no checkpoint, and transformers rebuilds them only for the modules it knows."""

    def __enter__(self):
        self.register = register = torch.nn.Module.register_parameter

        def on_meta(module, name, param):
            if param is not None and not param.is_meta:      # (a tied weight is already meta)
                param = torch.nn.Parameter(param.to("meta"), param.requires_grad)
            register(module, name, param)
        torch.nn.Module.register_parameter = on_meta

    def __exit__(self, *exc):
        torch.nn.Module.register_parameter = self.register
