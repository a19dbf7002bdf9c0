"""Reward rescoring (Sec. 2.1): score each candidate with a reward model, rank best first; Eq. 1.

    python rescore.py --reward-model OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5 \\
        --data data/hh2/train.jsonl --out data/hh2/train.rescored.jsonl
    torchrun --nproc_per_node 8 rescore.py ...         # the same, each rank scores 1/8
    python rescore.py --train-reward-model --base CKPT --data TRAIN.jsonl [--dev DEV.jsonl] --out RM

Scoring prints Fig. 1's noise statistics (see `noise_stats`); --keep-human-order keeps the human
order ("w/o Rescore"). It holds OUT.lock, checks every prompt against the reward model's input
format before its weights load, and resumes from OUT.part<rank> when OUT.settings.json says that the
same model, input and settings made them. Training (Eq. 1) prints its loss and the held-out
pairwise accuracy.
"""

import glob
import json
import math
import os
import random
import re
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

import data
from harness import files, fingerprints, flags, locks, models
from harness import openassistant  # noqa: F401  (registers the paper's reward models)
from harness.flags import opt
from harness.models import checkpoint_dir, from_pretrained
from data import UserError

# ---- input formats -------------------------------------------------------------------------------

def dialogue_turns(prompt):
    """'\\n\\nHuman: Q1\\n\\nAssistant: A1 ... \\n\\nAssistant:' -> [("Human", "Q1"), ...]."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)  # ['', 'Human', ' Q1', 'Assistant', ...]
    if parts[0].strip() or len(parts) < 5 or parts[-2] != "Assistant" or parts[-1].strip():
        raise UserError("not an HH-RLHF prompt ('\\n\\nHuman: ... \\n\\nAssistant:'): "
                        f"{prompt[:80]!r}")
    return [(role, text.strip()) for role, text in zip(parts[1:-2:2], parts[2:-2:2])]


def format_for(config, tokenizer):
    """The text a reward model was trained on, as a function (prompt, response) -> str: the role
    tokens of OpenAssistant's models, else the tokenizer's chat template if it has one, else prompt
    + " " + response + EOS after the tokenizer's own special tokens (what --train-reward-model
    trains on)."""
    eos = tokenizer.eos_token or ""
    turns = lambda prompt, response: dialogue_turns(prompt) + [("Assistant", response.strip())]
    if config.model_type == "gpt_neox_reward_model":    # OpenAssistant: role token + text + EOS
        roles = {"Human": "<|prompter|>", "Assistant": "<|assistant|>"}
        return lambda prompt, response: "".join(roles[r] + text + eos
                                                for r, text in turns(prompt, response))
    if tokenizer.chat_template:
        roles = {"Human": "user", "Assistant": "assistant"}
        return lambda prompt, response: tokenizer.apply_chat_template(
            [{"role": roles[r], "content": text} for r, text in turns(prompt, response)],
            tokenize=False)
    bos = tokenizer.decode(data.special_prefix(tokenizer))   # what the tokenizer puts first, if any
    return lambda prompt, response: bos + prompt + " " + response.strip() + eos


def encode(tokenizer, texts, max_length):
    """Token ids of each text (which holds its special tokens), cut from the LEFT to `max_length`
    so that the response survives; texts are cut to a safe number of characters first, so that a
    30 MB line costs no more than a long one."""
    chars = 2 * max_length * data.max_token_chars(tokenizer)
    ids = tokenizer([t[-chars:] for t in texts], add_special_tokens=False)["input_ids"]
    return [x[-max_length:] for x in ids]

# ---- scoring -------------------------------------------------------------------------------------

def reward_format(path, flag="--reward-model", **config_kwargs):
    """-> (config, tokenizer, format_fn): all of a reward model but its weights, to check every
    prompt against its input format before they load (harness.models.reward_parts: one output, and
    a tokenizer that pads on the right with the token the model's pooling skips)."""
    config, tokenizer = models.reward_parts(path, flag, **config_kwargs)
    return config, tokenizer, format_for(config, tokenizer)


def load_reward_model(path, device="cpu", dtype="float32", flag="--reward-model"):
    """-> (model, tokenizer, format_fn) for any AutoModelForSequenceClassification with one output,
    in `dtype` (OpenAssistant's configs say float16; the authors ran them in float32)."""
    config, tokenizer, format_fn = reward_format(path, flag)
    model = models.load_model(AutoModelForSequenceClassification, path, flag, device, dtype,
                              config=config)
    return model, tokenizer, format_fn


def reward_forward(model, ids, pad_id):
    """One reward per token list, [N] float32. Padding on the RIGHT keeps each token's position of
    training (positions count from 0 whatever the mask), causal attention keeps it out, and both
    poolings (last attended token; rightmost token that is not pad) land on the last real token."""
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)                         # [N, T]
    attention_mask = torch.zeros(len(ids), T, dtype=torch.long)                             # [N, T]
    for n, x in enumerate(ids):
        input_ids[n, :len(x)], attention_mask[n, :len(x)] = torch.tensor(x), 1
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return logits[:, 0].float()                                                     # logits: [N, 1]


@torch.inference_mode()
def score(model, tokenizer, format_fn, prompts, responses, batch_size=16, max_length=1024,
          progress=False):
    """One scalar reward per (prompt, response); batches of rows of similar length pad little."""
    ids = encode(tokenizer, [format_fn(p, r) for p, r in zip(prompts, responses)], max_length)
    order = sorted(range(len(ids)), key=lambda n: -len(ids[n]))   # longest first: OOM shows at once
    rewards = [0.0] * len(ids)
    for start in tqdm(range(0, len(ids), batch_size), desc="scoring", disable=not progress):
        rows = order[start:start + batch_size]
        scored = reward_forward(model, [ids[n] for n in rows], tokenizer.pad_token_id).tolist()
        for n, r in zip(rows, scored):
            rewards[n] = r
    return rewards


def check_finite(rewards, givers, dtype):
    """Refuse a reward that is not a finite number before it reaches a part file (a NaN sorts
    anywhere and makes every mean NaN); givers: per reward, who gave it to what (the message)."""
    for reward, gave in zip(rewards, givers):
        if not math.isfinite(reward):
            hint = (f"an overflow in --dtype {dtype}? --dtype float32 with a new --out avoids it"
                    if dtype != "float32" else "are its weights broken?")
            raise UserError(f"{gave} a reward of {reward}; {hint}")


def rerank(sample, rewards, keep_human_order=False, sft_human_chosen=False):
    """The sample with its rewards, responses best first and the top one the SFT target, as the
    authors do. keep_human_order ("w/o Rescore"): order and sft_index as they were;
    sft_human_chosen: the SFT target stays the human-chosen response wherever it lands (Sec. 2.3
    as written: gate the human-preferred sample)."""
    if keep_human_order:
        return {**sample, "rewards": rewards}
    order = sorted(range(len(rewards)), key=lambda k: -rewards[k])  # stable: ties keep human order
    return {**sample, "responses": [sample["responses"][k] for k in order],
            "rewards": [rewards[k] for k in order],
            "sft_index": order.index(sample["sft_index"]) if sft_human_chosen else 0}


def noise_stats(human_rewards, sft_rewards, reward_gap):
    """Fig. 1's noise, from each sample's rewards in human order and each SFT target's reward."""
    # float32, as in the training batches, so within_gap counts exactly the pairs clha_loss drops
    pairs = torch.tensor([(r[i], r[j]) for r in human_rewards
                          for i in range(len(r)) for j in range(i + 1, len(r))])
    gaps = pairs[:, 0] - pairs[:, 1]
    rewards = torch.tensor([x for r in human_rewards for x in r], dtype=torch.float64)
    quartiles = torch.quantile(rewards, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    # disagree: the reward model prefers the human-rejected response of the pair
    return {"samples": len(human_rewards), "pairs": len(pairs),
            "disagree": (pairs[:, 0] < pairs[:, 1]).float().mean().item(),
            "within_gap": (gaps.abs() <= reward_gap).float().mean().item(),   # Eq. 5's k = 1
            "sft_off": sum(r <= 0 for r in sft_rewards) / len(sft_rewards),   # Eq. 7's lambda = 1
            **dict(zip(("min", "q1", "median", "q3", "max"), quartiles.tolist())),
            "mean": rewards.mean().item()}


def rescore_file(reward_model, data_path, out, keep_human_order=False, batch_size=16,
                 reward_gap=3.0, max_length=1024, sft_human_chosen=False, dtype="float32",
                 score_fn=None):
    """Score every response of `data_path`, write `out` (rewards, re-ranked), print and return the
    noise statistics. Under torchrun, rank r scores the samples i % world == r into out.part<r>;
    then rank 0 writes `out` in input order and returns the statistics, the others None. A rerun
    resumes. score_fn(prompts, responses) -> rewards replaces the model (tests, benchmarks)."""
    flags.input_file(data_path, "--data")
    if os.path.isdir(out):
        raise UserError(f"--out {out}: is a folder; give the output file's name")
    if os.path.exists(out) and os.path.samefile(out, data_path):      # by name, link or other path
        raise UserError(f"--out {out} is the --data file {data_path}: the output would replace "
                        "the input; give --out another name")
    flags.output_dir(os.path.dirname(os.path.abspath(out)), "--out")
    if score_fn is None:
        checkpoint_dir(reward_model, "--reward-model")
    with locks.ranks() as (rank, world), locks.lock(out + ".lock", "--out", out):
        # the data, each prompt checked against the reward model's format before its weights load
        format_fn = reward_format(reward_model)[2] if score_fn is None else lambda p, r: ""
        samples = data.read_samples(
            data_path, check=lambda s: [format_fn(s["prompt"], r) for r in s["responses"]])
        # what runs on --out write is no part of the reward model, should --out lie inside it
        ours = [out + end for end in ("", ".lock", ".settings.json")] + part_files(out)
        settings = {"--reward-model": fingerprints.fingerprint(reward_model, exclude=ours),
                    "--data": fingerprints.fingerprint(data_path), "--max-length": max_length,
                    "--dtype": dtype}
        K = {s["id"]: len(s["responses"]) for s in samples}
        todo = locks.unfinished(samples, part_files(out), out + ".settings.json", settings,
                                scored(K), f"--out {out} (its part files)")

        # the reward model loads only if this rank has work left; the bar counts its whole share
        share = samples[rank::world]                      # (locks.unfinished's partition)
        if todo and score_fn is None:
            model, tokenizer, format_fn = load_reward_model(reward_model, locks.local_device(),
                                                            dtype)
            score_fn = lambda prompts, responses: score(model, tokenizer, format_fn, prompts,
                                                        responses, batch_size, max_length)
        with tqdm(total=len(share), initial=len(share) - len(todo), desc=f"rescoring {data_path}",
                  disable=rank != 0 or not todo) as bar:
            score_share(todo, score_fn, f"{out}.part{rank}", bar, batch_size, data_path,
                        reward_model, dtype)
        locks.barrier()
        if rank != 0:
            return None
        return merge(out, samples, keep_human_order, sft_human_chosen, reward_gap)


def score_share(todo, score_fn, part, bar, batch_size, data_path, reward_model, dtype):
    """Score `todo` a chunk at a time (enough rows for length-sorted batches) and append each
    chunk's records to this rank's part file, flushed: a kill loses at most the chunk in hand."""
    chunk = max(1, batch_size * 16 // len(todo[0]["responses"])) if todo else 1
    with files.appending(part, "the samples scored so far") as write:
        for start in range(0, len(todo), chunk):
            batch = todo[start:start + chunk]
            rewards = score_fn(*zip(*[(s["prompt"], r) for s in batch for r in s["responses"]]))
            givers = (f"--data {data_path}: sample {s['id']!r}, response {k} ({r[:30]!r}): "
                      f"--reward-model {reward_model} gave it"
                      for s in batch for k, r in enumerate(s["responses"]))
            check_finite(rewards, givers, dtype)
            rewards = iter(rewards)
            write([json.dumps({"id": s["id"], "rewards": [next(rewards) for _ in s["responses"]]})
                   + "\n" for s in batch])
            bar.update(len(batch))


def scored(K):
    """read_parts' `keep` for our part files: each record a finite reward per response of the input
    sample of its id (K: {id: responses})."""
    def keep(record):
        rewards, id_ = record["rewards"], record["id"]
        if not isinstance(rewards, list) or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in rewards):
            raise files.WrongRecord(f"sample {id_!r}: 'rewards' is not a list of numbers")
        for r in rewards:
            if not math.isfinite(r):
                raise files.WrongRecord(f"sample {id_!r} has a reward of {r}, not a finite "
                                        "number (an overflow? rescore with --dtype float32)")
        if id_ not in K:
            raise files.WrongRecord(f"sample {id_!r} with {len(rewards)} rewards in its part files "
                                    "is not in the input: they are left from another data file")
        if len(rewards) != K[id_]:
            raise files.WrongRecord(f"sample {id_!r} has {len(rewards)} rewards for its {K[id_]} "
                                    "responses in --data")
        return True
    return keep


def part_files(out):
    """out.part<rank>, of every earlier run, whatever its number of ranks."""
    return sorted(glob.glob(glob.escape(out) + ".part*"))


def merge(out, samples, keep_human_order, sft_human_chosen, reward_gap):
    """Rank 0, once every rank is done: one output in input order, written atomically; parts go."""
    parts = part_files(out)
    done = {id_: r["rewards"] for id_, r in files.read_parts(
        parts, scored({s["id"]: len(s["responses"]) for s in samples})).items()}
    missing = [s["id"] for s in samples if s["id"] not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} samples were not scored, e.g. {missing[0]!r}")
    rescored = [rerank(s, done[s["id"]], keep_human_order, sft_human_chosen) for s in samples]
    files.write_jsonl(out, rescored)
    for path in parts + [out + ".settings.json"]:
        os.remove(path)
    stats = noise_stats([done[s["id"]] for s in samples],
                        [s["rewards"][s["sft_index"]] for s in rescored], reward_gap)
    print("wrote {out}: {samples} samples, {pairs} pairs\n"
          "  reward model disagrees with the human order: {disagree:.1%} of pairs\n"
          "  within reward_gap {gap} (ignored by Eq. 5): {within_gap:.1%} of pairs\n"
          "  SFT target with reward <= 0 (Eq. 7's SFT term off): {sft_off:.1%} of samples\n"
          "  rewards: min {min:.3f}  q1 {q1:.3f}  median {median:.3f}  q3 {q3:.3f}  max {max:.3f}"
          "  mean {mean:.3f}".format(out=out, gap=reward_gap, **stats))
    return stats

# ---- training a reward model (Eq. 1) -------------------------------------------------------------

def rm_loss(chosen_rewards, rejected_rewards):
    """Eq. 1, L_RM = -log sigmoid(r(x, y_c) - r(x, y_r)) over pairs; logsigmoid cannot overflow."""
    return -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()    # Eq. (1)


def preference_pairs(samples):
    """(x, y_c, y_r) for each pair i < j of each sample, in file order: y_c = responses[i]."""
    return [(s["prompt"], s["responses"][i], s["responses"][j]) for s in samples
            for i in range(len(s["responses"])) for j in range(i + 1, len(s["responses"]))]


def reward_accuracy(model, tokenizer, format_fn, pairs, batch_size=16, max_length=1024):
    """Share of the (x, y_c, y_r) pairs in which the reward model scores y_c higher."""
    prompts, chosen, rejected = zip(*pairs)
    r_c = score(model, tokenizer, format_fn, prompts, chosen, batch_size, max_length)
    r_r = score(model, tokenizer, format_fn, prompts, rejected, batch_size, max_length)
    return sum(c > r for c, r in zip(r_c, r_r)) / len(pairs)


def train_reward_model(train, out, base, dev=None, epochs=1, lr=1e-5, batch_size=16,
                       max_length=1024, seed=0, decay=False):
    """Eq. 1 on the human-order pairs of `train` from the HF checkpoint `base`, saved to `out`; a
    step trains on batch_size // 2 pairs (sequences per forward, as in scoring). decay: the learning
    rate falls linearly to 0, so training ends settled, not where the last noisy steps left it.
    Returns the pairwise accuracy on `dev`, or on a held-out 10% of `train`."""
    torch.manual_seed(seed)
    samples = data.read_samples(train)
    if dev:
        dev_samples = data.read_samples(dev)
    else:
        random.Random(seed).shuffle(samples)
        n_dev = max(1, len(samples) // 10)
        samples, dev_samples = samples[n_dev:], samples[:n_dev]
    pairs, dev_pairs = preference_pairs(samples), preference_pairs(dev_samples)
    print(f"{len(pairs)} training pairs, {len(dev_pairs)} held-out pairs "
          f"({dev or f'10% of {train}'})")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, tokenizer, format_fn = reward_format(base, "--base", num_labels=1)   # as scored later
    model = from_pretrained(AutoModelForSequenceClassification, base, "--base", config=config,
                            dtype=torch.float32).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    n_pairs, g = max(1, batch_size // 2), torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(pairs) // n_pairs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda n: 1 - n / steps if decay else 1.0)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(pairs), generator=g).tolist()
        for step, start in enumerate(range(0, len(pairs), n_pairs)):
            batch = [pairs[n] for n in order[start:start + n_pairs]]
            # chosen and rejected go through one forward: one padded batch instead of two
            texts = ([format_fn(x, y_c) for x, y_c, _ in batch]
                     + [format_fn(x, y_r) for x, _, y_r in batch])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                rewards = reward_forward(model, encode(tokenizer, texts, max_length),
                                         tokenizer.pad_token_id)                          # [2P]
            loss = rm_loss(rewards[:len(batch)], rewards[len(batch):])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if step % 50 == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}")
        model.eval()
        accuracy = reward_accuracy(model, tokenizer, format_fn, dev_pairs, batch_size, max_length)
        print(f"epoch {epoch}: held-out pairwise accuracy {accuracy:.3f} on {len(dev_pairs)} pairs")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"saved the reward model to {out}")
    return accuracy

# ---- command line --------------------------------------------------------------------------------

@dataclass
class Config:
    reward_model: str = opt("", "path or hub id: OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5")
    data: str = opt("", "input samples, in data.py's format or the authors'")
    out: str = opt("", "output sample file (.jsonl, or .jsonl.gz to gzip it); with "
                       "--train-reward-model, the folder for the model")
    keep_human_order: bool = opt(False, "keep the human order and sft_index ('w/o Rescore')")
    sft_human_chosen: bool = opt(False, "SFT target: the human-chosen response, as Sec. 2.3 says, "
                                        "not the top-reward one, as the authors' code does")
    dtype: str = opt("float32", "reward model dtype: float32 as the authors ran it, or bfloat16 / "
                                "float16 (faster on GPUs; rewards move by ~1e-2)",
                     choices=["float32", "bfloat16", "float16"])
    batch_size: int = opt(16, "sequences per forward", at_least=1)
    max_length: int = opt(1024, "tokens per sequence, cut from the left", at_least=2)
    reward_gap: float = opt(3.0, "ties in the statistics: pairs this close (Eq. 5's k)", at_least=0)
    train_reward_model: bool = opt(False, "train a reward model (Eq. 1) on --data, not score")
    base: str = opt("", "--train-reward-model: the HF checkpoint to start from")
    dev: str = opt("", "--train-reward-model: held-out samples (default: 10%% of --data)")
    epochs: int = opt(1, "--train-reward-model: passes over the pairs", at_least=1)
    lr: float = opt(1e-5, "--train-reward-model: AdamW learning rate", above=0)
    seed: int = opt(0, "--train-reward-model: seed of the order and held-out split", at_least=0)
    lr_decay: bool = opt(False, "--train-reward-model: lr falls linearly to 0 (the demo's)")


def main(argv=None):
    # the description is the docstring's first paragraph; argparse joins its two lines
    cfg = flags.parse(Config, argv, __doc__.split("\n\n")[0])
    for name in ("base" if cfg.train_reward_model else "reward_model", "data", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name.replace('_', '-')} is required")
    locks.local_device()                     # one line if this node has too few GPUs
    if int(os.environ.get("RANK", 0)) == 0:
        print(cfg)
    if not cfg.train_reward_model:
        return rescore_file(cfg.reward_model, cfg.data, cfg.out, cfg.keep_human_order,
                            cfg.batch_size, cfg.reward_gap, cfg.max_length, cfg.sft_human_chosen,
                            cfg.dtype)
    for flag, path in (("--data", cfg.data), ("--dev", cfg.dev)):
        if path:
            flags.input_file(path, flag)
    if cfg.batch_size < 2:
        raise UserError(f"--batch-size {cfg.batch_size}: training needs at least 2 (one pair)")
    flags.output_dir(cfg.out, "--out")
    train_reward_model(cfg.data, cfg.out, cfg.base, cfg.dev or None, cfg.epochs, cfg.lr,
                       cfg.batch_size, cfg.max_length, cfg.seed, cfg.lr_decay)


if __name__ == "__main__":
    flags.run(main)
