"""HH-RLHF to ranked candidates, and the paper's splits (Sec. 3.1): Anthropic's four subsets of
{"chosen", "rejected"} dialogues -> train, dev and test samples in data.py's format.

    python tools/prepare_hh_rlhf.py --hh-dir hh-rlhf --out data/hh2   # hh-rlhf: Anthropic's

It prints what it read, skipped and wrote: train.jsonl, dev.jsonl and test/<subset>.jsonl, each
written whole or not at all. The first step of the pipeline; rescore.py comes next.
"""

import os
import random
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

import data                       # noqa: E402  (after the path above)
from data import ASSISTANT, UserError   # noqa: E402
from harness import files, flags  # noqa: E402


def read_hh_rlhf(path, subset=None, split=None):
    """Anthropic's {"chosen", "rejected"} lines -> (samples, skipped counts): the prompt is all up
    to the last '\\n\\nAssistant:', the reply the rest (the authors' preprocessing keeps its first
    paragraph only). Pairs with an empty reply, or whose dialogues differ before it, are skipped."""
    subset = subset or os.path.basename(os.path.dirname(os.path.abspath(path)))
    split = split or os.path.basename(path).split(".")[0]
    samples, skipped = [], Counter()
    for line_no, obj in data.json_lines(path):
        if not isinstance(obj.get("chosen"), str) or not isinstance(obj.get("rejected"), str):
            raise UserError(f"{path}:{line_no}: expected string fields 'chosen' and 'rejected'")
        if ASSISTANT not in obj["chosen"] or ASSISTANT not in obj["rejected"]:
            raise UserError(f"{path}:{line_no}: a dialogue has no '\\n\\nAssistant:' turn")
        (prompt, chosen), (other, rejected) = [
            (d[:d.rfind(ASSISTANT) + len(ASSISTANT)],
             d[d.rfind(ASSISTANT) + len(ASSISTANT):].strip())
            for d in (obj["chosen"], obj["rejected"])]
        if prompt != other:
            skipped["prompts differ"] += 1
        elif not data.visible(chosen) or not data.visible(rejected):
            skipped["empty reply"] += 1
        else:
            samples.append({"id": f"{subset}/{split}/{line_no}", "subset": subset, "prompt": prompt,
                            "responses": [chosen, rejected], "rewards": None, "sft_index": 0})
    if not samples:
        raise UserError(f"{path}: no usable dialogue pairs (skipped: "
                        f"{dict(skipped) or 'none, the file is empty'})")
    return samples, skipped


def build_splits(hh_dir, out_dir, dev_size=280, seed=0, extra=None):
    """train = the four train files; dev = `dev_size` test samples drawn with `seed`; test = the
    rest, per subset. Unlike the authors' code, dev is removed from test (the paper says
    "partition"). `extra`: a file of more responses per prompt (HH-RLHF_3), see `add_responses`."""
    if not os.path.isdir(hh_dir):
        raise UserError(f"--hh-dir {hh_dir}: no such folder (a clone of "
                        "github.com/anthropics/hh-rlhf)")
    paths = [os.path.join(hh_dir, subset, f"{split}.jsonl.gz") for subset in data.SUBSETS
             for split in ("train", "test")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"--hh-dir {hh_dir}: {missing[0]} is missing (it needs the four subsets, "
                        "train and test)")
    train, tests = [], {}
    for path in paths:
        subset, split = path.split(os.sep)[-2], os.path.basename(path).split(".")[0]
        samples, skipped = read_hh_rlhf(path, subset, split)
        print(f"{path}: {len(samples)} samples, skipped {dict(skipped) or 'none'}")
        (train.extend if split == "train" else tests.setdefault(subset, []).extend)(samples)
    if extra:
        train = add_responses(train, extra)
        tests = {subset: add_responses(samples, extra) for subset, samples in tests.items()}
    all_test = [s for subset in data.SUBSETS for s in tests[subset]]
    if dev_size > len(all_test):
        raise UserError(f"--dev-size {dev_size}: there are only {len(all_test)} test samples")
    dev_ids = {s["id"] for s in random.Random(seed).sample(all_test, dev_size)}
    files.write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    files.write_jsonl(os.path.join(out_dir, "dev.jsonl"),
                      [s for s in all_test if s["id"] in dev_ids])
    for subset in data.SUBSETS:
        files.write_jsonl(os.path.join(out_dir, "test", f"{subset}.jsonl"),
                          [s for s in tests[subset] if s["id"] not in dev_ids])
    print(f"wrote {out_dir}: train {len(train)}, dev {len(dev_ids)}, "
          f"test {len(all_test) - len(dev_ids)}")


def add_responses(samples, extra_path):
    """Append the responses of `extra_path` (any sample file, matched by prompt text) that a sample
    lacks, e.g. one ChatGPT reply per prompt for HH-RLHF_3. Samples that gain nothing are dropped
    (and counted), so that every sample ends with the same K."""
    extra = {}
    for s in data.read_samples(extra_path, min_responses=1):
        extra.setdefault(s["prompt"], []).extend(s["responses"])
    out = []
    for s in samples:
        new = [r for r in dict.fromkeys(extra.get(s["prompt"], [])) if r not in s["responses"]]
        if new:
            out.append({**s, "responses": s["responses"] + new, "rewards": None})
    print(f"{extra_path}: added responses to {len(out)} of {len(samples)} samples, "
          "dropped the rest")
    return out


def main(argv=None):
    parser = flags.Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--hh-dir", required=True, help="Anthropic's hh-rlhf folder (4 subsets)")
    parser.add_argument("--out", required=True,
                        help="folder: train.jsonl, dev.jsonl, test/<subset>.jsonl")
    parser.add_argument("--dev-size", type=int, default=280,
                        help="test samples moved to dev [>= 0]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dev draw")
    parser.add_argument("--extra", default="",
                        help="a file of more responses per prompt (HH-RLHF_3)")
    args = parser.parse_args(argv)
    if args.dev_size < 0:
        raise UserError(f"--dev-size {args.dev_size}: must be at least 0")
    if args.extra and not os.path.isfile(args.extra):
        raise UserError(f"--extra {args.extra}: no such file")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create this folder ({e.strerror})") from None
    build_splits(args.hh_dir, args.out, args.dev_size, args.seed, args.extra)


if __name__ == "__main__":
    flags.run(main)
