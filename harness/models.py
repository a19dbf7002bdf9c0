"""Loading a checkpoint or a tokenizer, with a folder or file that cannot be used as one line, and
running none of the checkpoint's code nor any from the hub; what the batch layouts need of a
tokenizer and a model config, and a reward model of both; and building a model whose parameters take
no memory until FSDP has sharded them."""

import importlib.util
import os

import torch
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

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
    if not loader.__name__.endswith(("Config", "Tokenizer")):
        # nor code from the hub: with `kernels` installed, transformers (5.25) swaps layers for
        # kernels it downloads, by default; offline or untrusted, that is an error on a GPU
        kwargs = {"use_kernels": False, **kwargs}
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


def load_model(loader, path, flag, device, dtype, **kwargs):
    """loader.from_pretrained(path) in `dtype` on `device`, in eval mode, running no code of the
    folder. Weights go straight to a GPU only through device_map, which needs accelerate; without
    it, each process first builds the whole model in host memory (8 x 27 GB for LLaMA-7B, fp32)."""
    device = torch.device(device)
    placed = {"device_map": {"": device}} if device.type != "cpu" and importlib.util.find_spec(
        "accelerate") else {}
    model = from_pretrained(loader, path, flag, dtype=getattr(torch, dtype), **placed, **kwargs)
    return model.to(device).eval()


def check_causal_lm(config, path, flag="--model"):
    """A policy is a model AutoModelForCausalLM builds (a reward model is not), before it loads."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(f"{flag} {path}: a {config.model_type} model, which AutoModelForCausalLM "
                        "cannot build; the policy must be a causal language model")


def check_tokenizer(tokenizer, flag):
    """What batching needs of a tokenizer: character offsets (a fast tokenizer) and an EOS token."""
    if not tokenizer.is_fast:
        raise UserError(f"{flag}: {type(tokenizer).__name__} is not a fast tokenizer; the prompt/"
                        "response boundary needs its character offsets")
    if tokenizer.eos_token_id is None:
        raise UserError(f"{flag}: the tokenizer has no EOS token, which ends every whole response")


def check_layout(config, max_len, flag="--model"):
    """The shared-prompt layouts' own [R, 1, L, L] mask: sdpa and eager take it; flash attention
    would ignore it, and the mask would not apply a sliding window shorter than a sequence."""
    impl, window = config._attn_implementation, getattr(config, "sliding_window", None)
    if impl not in ("sdpa", "eager"):
        raise UserError(f"{flag}: its attention ({impl}) cannot take the shared-prompt mask: pass "
                        "--no-share-prompt")
    if window and max_len > window:
        raise UserError(f"{flag}: its sliding window ({window}) is shorter than --max-len "
                        f"{max_len}, which the shared-prompt mask would not apply: pass "
                        "--no-share-prompt")


def reward_parts(path, flag, **config_kwargs):
    """A reward model's config and tokenizer, checked before its weights load: one output, and a
    pad token for right padding that the model's pooling agrees with."""
    config = from_pretrained(AutoConfig, path, flag, **config_kwargs)
    tokenizer = from_pretrained(AutoTokenizer, path, flag)
    oa = config.model_type == "gpt_neox_reward_model"        # one output, pooled by the mask
    if not oa and config.num_labels != 1:
        raise UserError(f"{flag} {path}: the model has {config.num_labels} outputs (num_labels); "
                        "a reward model has one")
    if tokenizer.pad_token is None:   # many causal LMs ship without one; right padding: EOS is safe
        if tokenizer.eos_token is None:
            raise UserError(f"{flag} {path}: its tokenizer has neither a pad nor an EOS token to "
                            "pad a batch with; set pad_token in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    # transformers' *ForSequenceClassification pool the rightmost token that is not pad_token_id
    if not oa and config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    elif not oa and config.pad_token_id != tokenizer.pad_token_id:
        raise UserError(f"{flag} {path}: the model pools by pad_token_id {config.pad_token_id} "
                        f"but the tokenizer pads with {tokenizer.pad_token_id}: fix pad_token_id "
                        "in its config.json")
    return config, tokenizer
