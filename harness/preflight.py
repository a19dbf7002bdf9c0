"""train.py's checks before the model loads: every mistake in its flags, data and tokenizer that can
be seen without the weights, and what Eq. 5 and 7 keep of the data (in the reward model's units).
"""

import os
import statistics

from transformers import AutoConfig, AutoTokenizer

import data
from data import UserError
from harness import checkpoints, flags, logs, models
from harness.fingerprints import fingerprint
from harness.models import from_pretrained

MIN_RESPONSE_TOKENS = 16  # --max-len - --max-prompt-len: fewer, and candidates cut short look alike


def check_setup(cfg, world, log):
    """-> (train samples, dev samples, tokenizer, model config, the fingerprints of the inputs)."""
    if not cfg.train:
        raise UserError("--train is required when --model is given (or drop every flag to run the "
                        "demo)")
    for flag, path in (("--train", cfg.train), ("--dev", cfg.dev)):
        if path:
            flags.input_file(path, flag)
    if cfg.max_len - cfg.max_prompt_len < MIN_RESPONSE_TOKENS:
        raise UserError(f"--max-len {cfg.max_len} with --max-prompt-len {cfg.max_prompt_len} "
                        f"leaves {cfg.max_len - cfg.max_prompt_len} tokens for a response: give it "
                        f"{MIN_RESPONSE_TOKENS}")
    if cfg.global_batch % (cfg.batch_size * world):
        raise UserError(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size "
                        f"{cfg.batch_size} x {world} processes: change one of them")
    config = from_pretrained(AutoConfig, cfg.model, "--model")
    models.check_causal_lm(config, cfg.model)
    if cfg.max_len > getattr(config, "max_position_embeddings", cfg.max_len):
        raise UserError(f"--max-len {cfg.max_len} is longer than the model's "
                        f"{config.max_position_embeddings} positions (max_position_embeddings)")
    flag = "--tokenizer" if cfg.tokenizer else "--model"
    tokenizer = from_pretrained(AutoTokenizer, cfg.tokenizer or cfg.model, flag)
    models.check_tokenizer(tokenizer, flag)
    logs.check_loggers(cfg)                            # the optional libraries, before a long load
    samples, dev = data.read_samples(cfg.train), data.read_samples(cfg.dev) if cfg.dev else []
    check_samples(cfg, samples, dev, log)
    data.make_batch(tokenizer, samples[:1], cfg.max_len, cfg.max_prompt_len)   # they work together
    # by contents (a copied model is the same input, a hub id is its cached revision); the run's
    # own --out is no part of a model it lies in
    inputs = {"--train": fingerprint(cfg.train), "--dev": fingerprint(cfg.dev) if cfg.dev else None,
              "--model": fingerprint(cfg.model, exclude=[cfg.out]),
              "--tokenizer": (fingerprint(cfg.tokenizer, exclude=[cfg.out]) if cfg.tokenizer
                              else None)}
    if (checkpoints.step_dirs(cfg.out) or os.path.exists(os.path.join(cfg.out, "final"))) \
            and not cfg.resume:
        raise UserError(f"--out {cfg.out} already holds a run (checkpoints/ or final/): pass "
                        "--resume, or choose another --out")
    return samples, dev, tokenizer, config, inputs


def check_samples(cfg, samples, dev, log):
    """One K for every sample; rewards where the objective needs them, sorted best first (Eq. 5's
    ranks are reward ranks); and what Eq. 5's threshold and Eq. 7's gate keep: they are in the
    reward model's units."""
    K, needs_rewards = len(samples[0]["responses"]), cfg.rescore and cfg.loss != "pro"
    for path, part in ((cfg.train, samples), (cfg.dev, dev)):
        for s in part:
            if len(s["responses"]) != K:
                raise UserError(f"{path}: sample {s['id']} has {len(s['responses'])} responses, "
                                f"the first has {K}; every sample needs the same K (see "
                                "tools/prepare_hh_rlhf.py --extra)")
            if needs_rewards and s["rewards"] is None:
                raise UserError(f"{path}: sample {s['id']} has no rewards: run rescore.py on it "
                                "first, or pass --no-rescore (the 'w/o Rescore' ablation)")
            r = s["rewards"]
            if needs_rewards and cfg.loss == "clha" and any(a < b for a, b in zip(r, r[1:])):
                raise UserError(f"{path}: sample {s['id']} is not sorted by reward, best first: "
                                "rescore it without --keep-human-order, or pass --no-rescore")
    if len(samples) < cfg.global_batch:
        raise UserError(f"--global-batch {cfg.global_batch} is larger than the {len(samples)} "
                        "training samples")
    if not needs_rewards:
        return
    if cfg.loss == "clha" and cfg.reward_gap is not None:
        gaps = [abs(r[i] - r[j]) for r in (s["rewards"] for s in samples)
                for i in range(K) for j in range(i + 1, K)]
        kept = sum(g > cfg.reward_gap for g in gaps) / len(gaps)
        if kept == 0:
            raise UserError(f"--reward-gap {cfg.reward_gap} keeps no pair of {cfg.train} (its "
                            f"largest reward gap is {max(gaps):.3g}): the gap is in the reward "
                            "model's units, 3.0 suits OpenAssistant's; choose one below the median "
                            f"gap {statistics.median(gaps):.3g}")
        log(f"Eq. 5 keeps {kept:.1%} of the training pairs (|r_i - r_j| > {cfg.reward_gap})"
            + (": warning, very few; is --reward-gap in this reward model's units?"
               if kept < 0.05 else ""))
    sft_on = sum(s["rewards"][s["sft_index"]] > 0 for s in samples) / len(samples)
    log(f"Eq. 7's SFT term is on for {sft_on:.1%} of the prompts (SFT target reward > 0)"
        + (": warning, this reward model's zero may not mean 'good'" if sft_on < 0.05 else ""))
