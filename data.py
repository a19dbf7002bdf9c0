"""HH-RLHF to ranked candidates, and the [B, K, T] batches that train.py and evaluate.py share (Sec. 3.1).

    python data.py --hh-dir hh-rlhf --out data/hh2   # the paper's splits: train, dev, test/<subset> (.jsonl)
    python data.py --demo --out demo/raw                # the built-in demo data, in raw HH-RLHF format

Both print what they read, skipped and wrote. `hh-rlhf` is Anthropic's repository layout:
<subset>/{train,test}.jsonl.gz for harmless-base, helpful-base, helpful-online, helpful-rejection-sampled.

Sample format: one JSON object per line, one line per prompt.
    {"id": "harmless-base/test/17",           # subset/split/line of the raw file
     "subset": "harmless-base",
     "prompt": "\\n\\nHuman: ...\\n\\nAssistant:",  # the dialogue up to and including the last "\\n\\nAssistant:"
     "responses": ["...", "..."],              # K >= 2 candidate replies, best first once rescored
     "rewards": [4.58, -0.16] or null,         # reward-model scores, null until rescore.py has run
     "sft_index": 0}                           # which response the SFT term trains on
Raw HH-RLHF gives responses in human order (chosen, rejected) and sft_index 0. The readers also accept the
authors' released format ({"prefix": [[turns]] * K, "suffix": [...], "reward": [...], "sft_index": i}).

A batch holds B prompts with all K candidates, flattened prompt-major: row b * K + k is candidate k of
prompt b. Each row is [BOS] prompt + response + EOS; the response mask covers the response and its EOS.
Legend: B prompts, K candidates, T tokens.
"""

import argparse
import gzip
import json
import math
import os
import random
from collections import Counter

import torch

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
ASSISTANT = "\n\nAssistant:"


# ---- reading --------------------------------------------------------------------------------------------

def _json_lines(path):
    """Yield (line number, object) for each non-empty line; a broken line is an error naming file:line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def split_dialogue(dialogue):
    """'...\\n\\nAssistant: reply' -> (prompt up to and including the last '\\n\\nAssistant:', reply stripped)."""
    cut = dialogue.rfind(ASSISTANT) + len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:].strip()


def read_hh_rlhf(path, subset=None, split=None):
    """Anthropic's {"chosen", "rejected"} lines -> (samples, skipped counts), one sample per usable line.

    The whole last assistant turn is kept, every paragraph of it (the authors' preprocessing keeps only the
    first). Pairs with an empty reply, or whose two dialogues differ before the last reply, are skipped and
    counted in `skipped`.
    """
    subset = subset or os.path.basename(os.path.dirname(os.path.abspath(path)))
    split = split or os.path.basename(path).split(".")[0]
    samples, skipped = [], Counter()
    for line_no, obj in _json_lines(path):
        if not isinstance(obj.get("chosen"), str) or not isinstance(obj.get("rejected"), str):
            raise ValueError(f"{path}:{line_no}: expected string fields 'chosen' and 'rejected'")
        if ASSISTANT not in obj["chosen"] or ASSISTANT not in obj["rejected"]:
            raise ValueError(f"{path}:{line_no}: a dialogue has no '\\n\\nAssistant:' turn")
        prompt, chosen = split_dialogue(obj["chosen"])
        rejected_prompt, rejected = split_dialogue(obj["rejected"])
        if prompt != rejected_prompt:
            skipped["prompts differ"] += 1
        elif not chosen or not rejected:
            skipped["empty reply"] += 1
        else:
            samples.append({"id": f"{subset}/{split}/{line_no}", "subset": subset, "prompt": prompt,
                            "responses": [chosen, rejected], "rewards": None, "sft_index": 0})
    return samples, skipped


def _from_authors_format(obj, where):
    """The authors' {"prefix", "suffix", "reward", "sft_index"} line -> our sample."""
    turns = "".join(obj["prefix"][0])
    prompt = turns.replace("<|prompter|>", "\n\nHuman: ").replace("<|assistant|>", "\n\nAssistant: ").rstrip()
    meta = obj.get("meta", {})
    subset = next((s for s in SUBSETS if s in meta.get("path", "")), "unknown")
    return {"id": f"{subset}/{meta.get('line_num', where)}", "subset": subset, "prompt": prompt,
            "responses": obj["suffix"], "rewards": obj.get("reward"), "sft_index": obj.get("sft_index", 0)}


def check_sample(s, where):
    """Raise a ValueError naming `where` (file:line) unless `s` is a well-formed sample."""
    for key, kind in (("id", str), ("prompt", str), ("responses", list), ("sft_index", int)):
        if not isinstance(s.get(key), kind):
            raise ValueError(f"{where}: field {key!r} must be a {kind.__name__}")
    K = len(s["responses"])
    if K < 2 or not all(isinstance(r, str) and r.strip() for r in s["responses"]):
        raise ValueError(f"{where}: 'responses' must hold at least 2 non-empty strings")
    rewards = s.get("rewards")
    if rewards is not None and (len(rewards) != K or not all(
            isinstance(r, (int, float)) and math.isfinite(r) for r in rewards)):
        raise ValueError(f"{where}: 'rewards' must be null or {K} finite numbers, one per response")
    if not 0 <= s["sft_index"] < K:
        raise ValueError(f"{where}: sft_index {s['sft_index']} is not a response index (K = {K})")


def read_samples(path):
    """Samples from a file in our format or the authors' released format (detected per line)."""
    samples = []
    for line_no, obj in _json_lines(path):
        where = f"{path}:{line_no}"
        try:
            sample = _from_authors_format(obj, line_no) if "prefix" in obj else obj
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"{where}: not a sample in the authors' format ({e!r})") from None
        check_sample(sample, where)
        samples.append(sample)
    ids = Counter(s["id"] for s in samples)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise ValueError(f"{path}: {len(repeated)} ids occur more than once, e.g. {repeated[0]!r}")
    return samples


def write_jsonl(path, samples):
    """Write JSON lines atomically: a crash leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


# ---- the paper's splits (Sec. 3.1) ------------------------------------------------------------------------

def build_splits(hh_dir, out_dir, dev_size=280, seed=0, extra=None):
    """train = the four train files; dev = `dev_size` test samples drawn with `seed`; test = the rest, per subset.

    Unlike the authors' code, the dev samples are removed from the test files (the paper says "partition").
    `extra`: a file of more responses per prompt (HH-RLHF_3), see `add_responses`.
    """
    train, tests = [], {}
    for subset in SUBSETS:
        for split in ("train", "test"):
            path = os.path.join(hh_dir, subset, f"{split}.jsonl.gz")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: --hh-dir must hold the four HH-RLHF subsets")
            samples, skipped = read_hh_rlhf(path, subset, split)
            print(f"{path}: {len(samples)} samples, skipped {dict(skipped) or 'none'}")
            (train.extend if split == "train" else tests.setdefault(subset, []).extend)(samples)
    if extra:
        train = add_responses(train, extra)
        tests = {subset: add_responses(samples, extra) for subset, samples in tests.items()}
    all_test = [s for subset in SUBSETS for s in tests[subset]]
    dev_ids = {s["id"] for s in random.Random(seed).sample(all_test, dev_size)}
    write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(out_dir, "dev.jsonl"), [s for s in all_test if s["id"] in dev_ids])
    for subset in SUBSETS:
        write_jsonl(os.path.join(out_dir, "test", f"{subset}.jsonl"),
                      [s for s in tests[subset] if s["id"] not in dev_ids])
    print(f"wrote {out_dir}: train {len(train)}, dev {len(dev_ids)}, test {len(all_test) - len(dev_ids)}")


def add_responses(samples, extra_path):
    """Append the responses of `extra_path` (any sample file, matched by prompt text) that a sample lacks.

    Used to build HH-RLHF_3 (one extra ChatGPT response per prompt). Samples that gain nothing are dropped,
    and the count is printed, so that every sample ends with the same K.
    """
    extra = {}
    for s in read_samples(extra_path):
        extra.setdefault(s["prompt"], []).extend(s["responses"])
    out = []
    for s in samples:
        new = [r for r in dict.fromkeys(extra.get(s["prompt"], [])) if r not in s["responses"]]
        if new:
            out.append({**s, "responses": s["responses"] + new, "rewards": None})
    print(f"{extra_path}: added responses to {len(out)} of {len(samples)} samples, dropped the rest")
    return out


# ---- tokenization and batches -------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt, max_prompt_len):
    """[BOS] + the prompt's tokens, `max_prompt_len` tokens at most with BOS (as the authors count), cut from
    the left so that the end of the dialogue, where the reply starts, survives."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return bos + ids[max(0, len(ids) - (max_prompt_len - len(bos))):]


def encode_sample(tokenizer, sample, max_len=512, max_prompt_len=384):
    """-> (prompt ids, [response ids + EOS] * K). The prompt is encoded once, apart from the responses, so the
    boundary is exact; each response is cut from the right to fit `max_len`, but keeps at least its EOS."""
    if not 2 <= max_prompt_len < max_len:
        raise ValueError(f"max_prompt_len {max_prompt_len} must be at least 2 (BOS and a token) and leave room "
                         f"in max_len {max_len} for EOS")
    prompt = encode_prompt(tokenizer, sample["prompt"], max_prompt_len)
    room = max_len - len(prompt) - 1                                   # tokens left for a response before EOS
    responses = [tokenizer(r, add_special_tokens=False)["input_ids"][:room] + [tokenizer.eos_token_id]
                 for r in sample["responses"]]
    return prompt, responses


def collate(encoded, samples, pad_id, multiple=8):
    """Encoded samples -> one batch of B prompts with all K candidates, padded on the right to a multiple of 8."""
    rows = [(prompt, response) for prompt, responses in encoded for response in responses]
    T = max(len(p) + len(r) for p, r in rows)
    T = -(-T // multiple) * multiple
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [B*K, T]
    attention_mask = torch.zeros(len(rows), T, dtype=torch.bool)       # [B*K, T]
    response_mask = torch.zeros(len(rows), T, dtype=torch.bool)        # [B*K, T]
    for n, (prompt, response) in enumerate(rows):
        end = len(prompt) + len(response)
        input_ids[n, :end] = torch.tensor(prompt + response)
        attention_mask[n, :end] = True
        response_mask[n, len(prompt):end] = True
    has_rewards = all(s["rewards"] is not None for s in samples)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "rewards": torch.tensor([s["rewards"] for s in samples], dtype=torch.float32) if has_rewards else None,
            "sft_index": torch.tensor([s["sft_index"] for s in samples]),   # [B]
            "K": len(samples[0]["responses"])}


def pad_id(tokenizer):
    """Any id works under a zero attention mask; LLaMA's tokenizer has no pad token, so fall back to EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_batch(tokenizer, samples, max_len=512, max_prompt_len=384):
    """Samples -> one [B*K, T] batch, as train.py, evaluate.py and benchmark.py all build it."""
    return collate([encode_sample(tokenizer, s, max_len, max_prompt_len) for s in samples], samples,
                   pad_id(tokenizer))


def step_batches(lengths, global_batch, seed, epoch, group_by_length=False, window=32):
    """Sample indices of each optimizer step in one epoch; the order depends only on (seed, epoch).

    The last len(lengths) % global_batch samples of the shuffled order are left out of this epoch.
    group_by_length: sort by length within windows of `window` steps, then shuffle the steps, so that
    the prompts of a micro-batch have similar lengths (less padding) while the epoch stays random.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order = order[:len(order) // global_batch * global_batch]
    if group_by_length:
        span = window * global_batch
        order = [i for w in range(0, len(order), span) for i in sorted(order[w:w + span], key=lengths.__getitem__)]
    steps = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    if group_by_length:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
    return steps


def iterate_steps(lengths, global_batch, seed, epochs, start=0, group_by_length=False):
    """Yield (step number, epoch, sample indices of that step) from optimizer step `start` to the end of
    training: a resumed run sees exactly the batches an uninterrupted one would have seen."""
    per_epoch = len(lengths) // global_batch
    for epoch in range(start // per_epoch, epochs):
        for i, step in enumerate(step_batches(lengths, global_batch, seed, epoch, group_by_length)):
            if epoch * per_epoch + i >= start:
                yield epoch * per_epoch + i, epoch, step


def micro_batch(step, batch_size, world_size, rank, micro):
    """The indices that `rank` trains on in accumulation step `micro` of one optimizer step.

    Laid out so that the same global batch gives the same micro-batches whatever the split into ranks
    and accumulation steps (1 rank x 2 accumulation steps == 2 ranks x 1).
    """
    start = (micro * world_size + rank) * batch_size
    return step[start:start + batch_size]


def sample_length(sample):
    """Characters of the prompt and longest response: a tokenizer-free proxy for sequence length."""
    return len(sample["prompt"]) + max(len(r) for r in sample["responses"])


# ---- the built-in demo data ----------------------------------------------------------------------------------
# Templated requests, each with replies of known quality: 2 helpful (or a refusal of a harmful request),
# 1 evasive, 0 rude (or harmful compliance). A share of the training pairs has its human label flipped, and
# some pairs are two replies of equal quality, so rescoring has noise to find. The test pairs are clean.

DEMO_TASKS = [  # (request, first step, second step)
    ("bake bread", "mix flour, water and yeast", "bake the dough for forty minutes"),
    ("plant a tree", "dig a deep hole", "water the roots every day"),
    ("make tea", "boil some water", "let the leaves steep for three minutes"),
    ("fix a flat tire", "take the wheel off", "patch the hole in the tube"),
    ("learn to swim", "find a good teacher", "practice in shallow water"),
    ("write a letter", "pick a kind greeting", "say what you want clearly"),
    ("clean a window", "spray it with soapy water", "wipe it dry with a cloth"),
    ("save money", "write down what you spend", "put some aside each week"),
    ("sleep better", "go to bed at the same time", "keep your room dark"),
    ("cook rice", "rinse the rice", "simmer it with twice as much water"),
    ("paint a room", "cover the floor", "roll on two thin coats"),
    ("train a puppy", "reward good behavior", "keep the lessons short"),
    ("start running", "buy good shoes", "run slowly for ten minutes"),
    ("grow tomatoes", "plant them in the sun", "tie the stems to a stick"),
    ("make pancakes", "whisk eggs, milk and flour", "fry small circles in butter"),
    ("study for a test", "make a plan for each day", "test yourself with old questions"),
]
DEMO_HARMS = [  # (harmful request, first step, second step)
    ("steal a car", "break the side window", "start the engine with the wires"),
    ("hack my neighbor's email", "guess the password", "read the private messages"),
    ("poison a dog", "hide the poison in meat", "leave it by the fence"),
    ("cheat on a test", "hide notes in your sleeve", "copy the answers"),
    ("start a fire in a park", "pile up dry leaves", "light them when nobody looks"),
    ("shoplift from a store", "find a blind spot", "walk out with the goods"),
    ("forge a signature", "trace the name many times", "copy it onto the check"),
    ("scare my coworker", "send threats at night", "leave a dead rat on the desk"),
]
DEMO_ASKS = ("How do I {x}?", "Can you tell me how to {x}?", "What is the best way to {x}?")


def demo_replies(x, a, b, harmful):
    """{quality: [two reply templates]} for one request."""
    compliance = [f"Sure! To {x}:\n\n1. {a.capitalize()}.\n2. {b.capitalize()}.", f"Easy. First {a}, then {b}."]
    evasive = [f"I am not sure how to {x}, sorry.", "I do not know much about that. Maybe ask someone else?"]
    if harmful:
        return {2: [f"I am sorry, I cannot help you {x}. It could hurt someone.",
                    "No, I will not help with that. It is wrong and against the law."],
                1: evasive, 0: compliance}
    return {2: compliance, 1: evasive,
            0: [f"Why would you want to {x}? Figure it out yourself.", "That is a silly question."]}


def demo_quality(prompt, reply):
    """Ground-truth quality (0, 1 or 2) of a reply to a demo prompt, or None if it matches no template."""
    request = prompt[prompt.rfind("Human:"):]
    for (x, a, b), harmful in [(t, False) for t in DEMO_TASKS] + [(t, True) for t in DEMO_HARMS]:
        if f" {x}?" in request:
            for quality, replies in demo_replies(x, a, b, harmful).items():
                if reply.strip() in replies:
                    return quality
            return None
    raise ValueError(f"not a demo prompt: {prompt!r}")


def make_demo_data(out_dir, n_train=3000, n_test=400, flip=0.25, tie=0.15, seed=0):
    """Write train.jsonl and test.jsonl in raw HH-RLHF format; return their paths.

    Each line is a {"chosen", "rejected"} pair of replies to a templated request (a third of them harmful,
    some after a greeting turn). Training pairs: a share `tie` are two replies of equal quality with an
    arbitrary label, and a share `flip` of the rest have the worse reply marked "chosen". Test pairs are
    always two different qualities, labelled correctly, so accuracy on them is ground-truth accuracy.
    """
    rng = random.Random(seed)
    requests = [(t, False) for t in DEMO_TASKS] + [(t, True) for t in DEMO_HARMS]
    paths = {}
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for _ in range(n):
            (x, a, b), harmful = rng.choice(requests)
            replies = demo_replies(x, a, b, harmful)
            prompt = "\n\nHuman: " + rng.choice(DEMO_ASKS).format(x=x) + ASSISTANT
            if rng.random() < 0.3:
                prompt = "\n\nHuman: Hi there!\n\nAssistant: Hello! How can I help you today?" + prompt
            if split == "train" and rng.random() < tie:
                chosen, rejected = rng.sample(replies[rng.choice([0, 1, 2])], 2)
            else:
                better, worse = sorted(rng.sample([0, 1, 2], 2), reverse=True)
                chosen, rejected = rng.choice(replies[better]), rng.choice(replies[worse])
                if split == "train" and rng.random() < flip:
                    chosen, rejected = rejected, chosen
            lines.append({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"})
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        write_jsonl(paths[split], lines)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--hh-dir", help="Anthropic's hh-rlhf folder (four subsets, train/test each)")
    parser.add_argument("--dev-size", type=int, default=280, help="test samples moved to dev.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", help="a sample file with more responses per prompt (HH-RLHF_3)")
    parser.add_argument("--demo", action="store_true", help="write the built-in demo data instead")
    args = parser.parse_args()
    if not args.out or not (args.demo or args.hh_dir):
        parser.error("give --hh-dir DIR --out DIR (the HH-RLHF splits) or --demo --out DIR")
    elif args.demo:
        print(make_demo_data(args.out, seed=args.seed))
    else:
        build_splits(args.hh_dir, args.out, args.dev_size, args.seed, args.extra)

if __name__ == "__main__":
    main()
