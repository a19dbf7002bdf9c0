"""The paper's evaluation protocol (Sec. 3.4, Tables 2-3): greedy generation, reward-model score,
character BLEU.

    python evaluate.py --model CKPT --reward-model RM --data test/*.jsonl --out runs/clha2
    torchrun --nproc_per_node 8 evaluate.py ...             # the same, each rank takes 1/8
    python evaluate.py --compare runs/sft runs/pro2 runs/clha2

The first two print a Markdown table in Table 2's layout (a BLEU / Reward column pair per subset,
then Total = the mean over all samples) and a second one with each subset's size, the policy's
teacher-forced pairwise accuracy and its count of empty generations; both go to DIR/table.md.
`--compare` prints the runs side by side, one row per run, as in Table 3. Files written to DIR
(harness/files.py, harness/locks.py):
    .lock                 held while a run works on DIR: a second one is refused
    parts/rank<r>.jsonl   each rank's records, appended and flushed per batch, each with its
                          sample's SHA-256: a rerun resumes, and redoes the samples that changed
    generations.jsonl     the merged records in input order: id, subset, prompt, generation,
                          reference, reward (the raw reward-model score), bleu, pairs_correct, pairs
    results.json          per subset and Total: n, bleu, reward, pair_acc (all x100), empty
    settings.json         the models (their contents) and decoding settings; others are refused

Protocol (reference-notes.md, "Evaluation"): greedy decoding of at most 128 new tokens from the
prompt cut on the left to 384 tokens; the text is cut at the first "Human:" / "Assistant:" (either
case). Reward is sigmoid(RM score) averaged over a subset; BLEU is nltk's sentence_bleu([reference],
hypothesis) on raw strings, i.e. character 4-grams, against the sample's first response. Each
torchrun rank holds a whole policy and reward model and takes the prompts i % world == rank; rank 0
merges. Both run in --dtype, float32 by default as the authors ran them (bfloat16 is faster on
GPUs, and moves rewards and greedy choices a little).
"""

import glob
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import rescore
from harness import files, fingerprints, flags, locks, models
from harness.files import write_jsonl
from harness.flags import opt
from harness.models import checkpoint_dir, from_pretrained
from data import (UserError, encode_prompt, make_batch, pad_id, policy_logps, read_samples,
                  to_device)

STOP_STRINGS = ("Human:", "human:", "Assistant:", "assistant:")
# what a run writes in --out
OUTPUTS = (".lock", "parts", "settings.json", "generations.jsonl", "results.json", "table.md")
# what summarize() reads of a record, and what each must be
RECORD_FIELDS = {"subset": "a string", "generation": "a string", "reward": "a finite number",
                 "bleu": "a finite number", "pairs_correct": "a whole number",
                 "pairs": "a whole number"}
RESULT_FIELDS = ("n", "bleu", "reward", "pair_acc", "empty")


# ---- metrics -------------------------------------------------------------------------------------

def cut_at_stop(text):
    """The text before the first stop string, stripped: the model's turn ends where it starts
    the next one."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut].strip()


def sentence_bleu(hypothesis, reference):
    """The authors' BLEU: nltk's sentence_bleu([reference], hypothesis) on strings, so n-grams are
    of characters.

        BLEU = BP * (p_1 p_2 p_3 p_4)^(1/4),   BP = 1 if c > r else exp(1 - r / c)
        p_n  = sum over hypothesis n-grams g of min(count_hyp(g), count_ref(g))
               / max(1, number of hypothesis n-grams)
    c, r: the lengths in characters of hypothesis and reference. Without smoothing, a p_n of 0
    makes the score 0 (nltk gives exp(log(float_min) / 4) ~ 1e-77 there, 0 at any printed
    precision); c = 0 gives 0.
    """
    c, r = len(hypothesis), len(reference)
    log_p = 0.0
    for n in range(1, 5):
        hyp = Counter(hypothesis[i:i + n] for i in range(c - n + 1))
        ref = Counter(reference[i:i + n] for i in range(r - n + 1))
        matches = sum(min(k, ref[g]) for g, k in hyp.items())    # clipped counts
        if matches == 0:
            return 0.0
        log_p += math.log(matches / max(1, sum(hyp.values()))) / 4
    brevity_penalty = 1.0 if c > r else math.exp(1 - r / c)
    return brevity_penalty * math.exp(log_p)


# ---- generation and teacher-forced scoring -------------------------------------------------------

def left_padded(tokenizer, prompts, max_prompt_len):
    """Prompts -> (input_ids, attention_mask) [B, T]: [BOS] + the prompt cut from the left, padded
    on the left so that every row's last token sits at T - 1 and generation continues all rows."""
    encoded = [encode_prompt(tokenizer, p, max_prompt_len) for p in prompts]
    T = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), T), pad_id(tokenizer), dtype=torch.long)   # [B, T]
    attention_mask = torch.zeros(len(encoded), T, dtype=torch.long)                   # [B, T]
    for b, ids in enumerate(encoded):
        input_ids[b, T - len(ids):] = torch.tensor(ids)
        attention_mask[b, T - len(ids):] = 1
    return input_ids, attention_mask


@torch.inference_mode()
def generate_batches(model, tokenizer, prompts, max_new_tokens=128, max_prompt_len=384,
                     batch_size=8, progress=False):
    """Yield (indices into prompts, generated texts) one batch at a time, longest prompts first:
    little padding, and running out of memory shows at once. Greedy with the KV cache; a row stops
    at EOS or once it has written a stop string (the text after it is cut anyway, and greedy
    tokens before it do not depend on what follows)."""
    lengths = [len(encode_prompt(tokenizer, p, max_prompt_len)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    with tqdm(total=len(prompts), desc="evaluate", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            input_ids, attention_mask = left_padded(tokenizer, [prompts[i] for i in idx],
                                                    max_prompt_len)
            new_tokens = greedy(model, input_ids, attention_mask, max_new_tokens, tokenizer)
            yield idx, [cut_at_stop(tokenizer.decode(t, skip_special_tokens=True))
                        for t in new_tokens.tolist()]
            bar.update(len(idx))


def greedy(model, input_ids, attention_mask, max_new_tokens, tokenizer=None, eos_id=None,
           pad=None):
    """Greedy search with the KV cache on left-padded prompts -> the new tokens
    [B, <= max_new_tokens]. With a tokenizer, a row also stops at EOS and after a stop string."""
    stop = {}
    if tokenizer is not None:
        stop = dict(stop_strings=list(STOP_STRINGS), tokenizer=tokenizer)
        eos_id, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    out = model.generate(input_ids=input_ids.to(model.device),
                         attention_mask=attention_mask.to(model.device), do_sample=False,
                         num_beams=1, max_new_tokens=max_new_tokens, use_cache=True,
                         eos_token_id=eos_id, pad_token_id=pad, **stop)          # [B, T + new]
    return out[:, input_ids.shape[1]:]                 # EOS and the padding after it are special


@torch.inference_mode()
def pair_counts(model, tokenizer, samples, batch_size=4, max_len=512, max_prompt_len=384,
                share_prompt=True, pack_len=1024):
    """For each sample, how many of its pairs i < j have p_i > p_j: Eq. 3's mean log-prob of each
    response (with its EOS, as in training) given the prompt, teacher-forced as train.py computes
    it. A tie counts as wrong."""
    counts = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = make_batch(tokenizer, chunk, max_len, max_prompt_len, share_prompt, pack_len)
        logps = policy_logps(model, to_device(batch, model.device))[0].tolist()  # [B*K] Eq. (3)
        for s in chunk:                                     # prompt-major; K varies by sample
            p, logps = logps[:len(s["responses"])], logps[len(s["responses"]):]
            counts.append(sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))))
    return counts


# ---- results and tables --------------------------------------------------------------------------

def summarize(records, subsets):
    """Per subset and Total: n, BLEU x100, Reward = mean sigmoid(RM score) x100, pairwise accuracy
    x100, empty."""
    def stats(rs):
        return {"n": len(rs),
                "bleu": 100 * sum(r["bleu"] for r in rs) / len(rs),
                "reward": 100 * sum(0.5 + 0.5 * math.tanh(r["reward"] / 2) for r in rs) / len(rs),
                "pair_acc": 100 * sum(r["pairs_correct"] for r in rs) / sum(r["pairs"] for r in rs),
                "empty": sum(r["generation"] == "" for r in rs)}
    results = {subset: stats([r for r in records if r["subset"] == subset]) for subset in subsets}
    results["Total"] = stats(records)                # the mean over all samples, not over subsets
    return results


def format_table(runs):
    """[(name, results)] -> Markdown: Table 2's BLEU / Reward pair per subset, then the sizes,
    pairwise accuracy and empty generations of each run."""
    subsets = list(dict.fromkeys(s for _, res in runs for s in res if s != "Total")) + ["Total"]
    cell = lambda res, s, key: f"{res[s][key]:.2f}" if s in res else "-"
    head = ["Method"] + [f"{s} {m}" for s in subsets for m in ("BLEU", "Reward")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, res in runs:
        cells = [name] + [cell(res, s, k) for s in subsets for k in ("bleu", "reward")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| Method | subset | n | pairwise accuracy | empty generations |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {s} | {res[s]['n']} | {res[s]['pair_acc']:.2f} | {res[s]['empty']} |"
              for name, res in runs for s in subsets if s in res]
    return "\n".join(lines) + "\n"


# ---- the protocol --------------------------------------------------------------------------------

def read_test_files(paths, check=None):
    """Samples of all files in order; a sample's subset is its "subset" field, else its file's."""
    samples = []
    for path in paths:
        stem = os.path.basename(path).split(".")[0]
        samples += [{**s, "subset": s.get("subset") or stem}
                    for s in read_samples(path, check=check)]
    repeated = [i for i, n in Counter(s["id"] for s in samples).items() if n > 1]
    if repeated:
        raise UserError(f"--data: {len(repeated)} sample ids occur in more than one file, e.g. "
                        f"{repeated[0]!r}")
    return samples


def content(sample):
    """What a record was made from: the SHA-256 of its sample's prompt, responses and subset (a
    change redoes it)."""
    used = [sample["prompt"], sample["responses"], sample["subset"]]
    return hashlib.sha256(json.dumps(used, ensure_ascii=False).encode()).hexdigest()


def run_share(todo, cfg, part, progress):
    """Generate, score and append one flushed record per prompt of `todo`, batch by batch."""
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                          else "cpu")
    tokenizer = from_pretrained(AutoTokenizer, cfg.model, "--model")
    models.check_tokenizer(tokenizer, "--model")
    policy = models.load_model(AutoModelForCausalLM, cfg.model, "--model", device, cfg.dtype)
    policy.generation_config = GenerationConfig()     # plain greedy, whatever the checkpoint ships
    if cfg.share_prompt:
        models.check_layout(policy.config, cfg.max_prompt_len + cfg.max_new_tokens)
    rm, rm_tokenizer, format_fn = rescore.load_reward_model(cfg.reward_model, device, cfg.dtype)
    with files.appending(part, "the prompts evaluated so far") as write:
        for idx, texts in generate_batches(policy, tokenizer, [s["prompt"] for s in todo],
                                           cfg.max_new_tokens, cfg.max_prompt_len,
                                           cfg.batch_size, progress):
            chunk = [todo[i] for i in idx]
            rewards = rescore.score(rm, rm_tokenizer, format_fn, [s["prompt"] for s in chunk],
                                    texts, cfg.batch_size)
            givers = (f"--reward-model {cfg.reward_model} gave the generation for sample "
                      f"{s['id']!r}" for s in chunk)
            rescore.check_finite(rewards, givers, cfg.dtype)        # a NaN: the table's Reward NaN
            # teacher forcing within the generation's budget: 384 + 128 = training's 512 tokens
            hits = pair_counts(policy, tokenizer, chunk, cfg.batch_size,
                               cfg.max_prompt_len + cfg.max_new_tokens, cfg.max_prompt_len,
                               cfg.share_prompt, cfg.pack and cfg.pack_len)
            records = [{"id": s["id"], "sample_sha256": content(s), "subset": s["subset"],
                        "prompt": s["prompt"], "generation": text,
                        "reference": s["responses"][0].strip(), "reward": reward,
                        "bleu": sentence_bleu(text, s["responses"][0].strip()),
                        "pairs_correct": correct,
                        "pairs": len(s["responses"]) * (len(s["responses"]) - 1) // 2}
                       for s, text, reward, correct in zip(chunk, texts, rewards, hits)]
            write([json.dumps(r, ensure_ascii=False) + "\n" for r in records])


def is_kind(value, kind):
    """Whether a record's value is what RECORD_FIELDS says."""
    if kind == "a string":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if kind == "a whole number" else math.isfinite(value)


def current(shas):
    """read_parts' `keep`: the records of the samples as they are now (by content), each holding
    what summarize() reads; another sample's record is passed over, a damaged one refused."""
    def keep(record):
        if record.get("sample_sha256") != shas.get(record["id"]):
            return False
        for key, kind in RECORD_FIELDS.items():
            if not is_kind(record.get(key), kind):
                raise files.WrongRecord(f"sample {record['id']!r}: {key!r} is missing or not "
                                        f"{kind}")
        if not 0 <= record["pairs_correct"] <= record["pairs"] or record["pairs"] < 1:
            raise files.WrongRecord(f"sample {record['id']!r}: {record['pairs_correct']} of "
                                    f"{record['pairs']} pairs correct")
        return True
    return keep


def rank_files(parts):
    """parts/rank<r>.jsonl, of every earlier run, whatever its number of ranks."""
    return sorted(glob.glob(os.path.join(glob.escape(parts), "rank*.jsonl")))


def evaluate(cfg, progress=False):
    """The whole protocol for a Config: the policy --model and the --reward-model (folders or hub
    ids) on the --data sample files. Every torchrun rank calls it; rank 0 merges the ranks' records
    and returns the results (see summarize), the other ranks None. A rerun with the same --out
    resumes, and redoes the records of samples whose content changed; other models or decoding
    settings are refused."""
    parts = os.path.join(cfg.out, "parts")
    flags.output_dir(cfg.out, "--out")
    os.makedirs(parts, exist_ok=True)
    lock = os.path.join(cfg.out, ".lock")
    with locks.ranks() as (rank, world), locks.lock(lock, "--out", cfg.out):
        # both models' configs (one that needs its own code is one line), and the data, each prompt
        # checked against the reward model's input format, before anything loads
        models.check_causal_lm(from_pretrained(AutoConfig, cfg.model, "--model"), cfg.model)
        format_fn = rescore.reward_format(cfg.reward_model)[2]
        check = lambda s: format_fn(s["prompt"], s["responses"][0])
        samples = read_test_files(cfg.data, check=check)
        # what this run writes is no part of the models, even where --out lies inside one of them
        ours = [cfg.out] + [os.path.join(cfg.out, name) for name in OUTPUTS]
        settings = {"--model": fingerprints.fingerprint(cfg.model, ours),
                    "--reward-model": fingerprints.fingerprint(cfg.reward_model, ours),
                    "--max-new-tokens": cfg.max_new_tokens, "--max-prompt-len": cfg.max_prompt_len,
                    "--dtype": cfg.dtype}
        shas = {s["id"]: content(s) for s in samples}
        todo = locks.unfinished(samples, rank_files(parts), os.path.join(cfg.out, "settings.json"),
                                settings, current(shas), f"--out {cfg.out}")

        # this rank's share: a full copy of the policy and reward model, loaded only if work is left
        if todo:
            run_share(todo, cfg, os.path.join(parts, f"rank{rank}.jsonl"), progress and rank == 0)
        locks.barrier()
        if rank != 0:
            return None

        # merge the parts in input order, and write the results
        found = files.read_parts(rank_files(parts), keep=current(shas))
        records = [found[s["id"]] for s in samples]
        write_jsonl(os.path.join(cfg.out, "generations.jsonl"), records)
        results = summarize(records, list(dict.fromkeys(s["subset"] for s in samples)))
        files.write_json(os.path.join(cfg.out, "results.json"), results)
        # atomically: a full disk leaves the table of the run before, and says so in one line
        files.write_text(os.path.join(cfg.out, "table.md"),
                         format_table([(os.path.basename(os.path.normpath(cfg.out)), results)]))
        return results


def read_results(folder):
    """A finished run's results.json (--compare), each subset holding what format_table reads."""
    path = os.path.join(folder, "results.json")
    flags.input_file(path, "--compare")
    results = files.read_json(path)
    for subset, res in results.items():
        if not isinstance(res, dict) or not all(is_kind(res.get(k), "a finite number")
                                                for k in RESULT_FIELDS):
            raise UserError(f"--compare {path}: subset {subset!r} lacks one of "
                            f"{', '.join(RESULT_FIELDS)}; rerun evaluate.py with --out {folder}")
    return results


@dataclass
class Config:
    model: str = opt("", "policy checkpoint: folder or hub id with model and tokenizer")
    reward_model: str = opt("", "reward model, loaded by rescore.py (e.g. OpenAssistant/oasst-rm-2-"
                                "pythia-6.9b-epoch-1, the paper's RM_eval)")
    data: list[str] = opt(None, "test sample files, one per subset", nargs="+")
    out: str = opt("", "output folder; an existing one is resumed")
    batch_size: int = opt(8, "prompts per batch", at_least=1)
    max_new_tokens: int = opt(128, "greedy tokens per reply", at_least=1)
    max_prompt_len: int = opt(384, "prompt tokens kept, cut from the left (special tokens "
                                   "included)", at_least=1)
    dtype: str = opt("float32", "policy and reward model dtype: float32 as the authors ran them, "
                                "or bfloat16 (faster on GPUs); float64 makes greedy choices "
                                "independent of the CPU's kernels",
                     choices=["float32", "bfloat16", "float16", "float64"])
    share_prompt: bool = opt(True, "teacher forcing with each prompt once (as train.py)")
    pack: bool = opt(True, "teacher forcing with the prompts packed into rows (as train.py)")
    pack_len: int = opt(1024, "tokens per packed row", at_least=8)
    compare: list[str] = opt(None, "instead: print these finished runs (their --out folders) side "
                                   "by side", nargs="+")


def main(argv=None):
    # the description is the docstring's first paragraph; argparse joins its two lines
    cfg = flags.parse(Config, argv, __doc__.split("\n\n")[0])
    if cfg.compare:
        runs = [(os.path.normpath(d), read_results(d)) for d in cfg.compare]
        print(format_table(runs), end="")
        return
    missing = [f"--{k.replace('_', '-')}" for k in ("model", "reward_model", "data", "out")
               if not getattr(cfg, k)]
    if missing:
        raise UserError(f"{', '.join(missing)} required (or --compare DIR...)")
    for path in cfg.data:
        flags.input_file(path, "--data")
    for flag, path in (("--model", cfg.model), ("--reward-model", cfg.reward_model)):
        checkpoint_dir(path, flag)
        checkpoint_dir(path, flag, tokenizer=True)
    locks.local_device()                     # cuda:LOCAL_RANK current, or one line if there is none
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(vars(cfg)))
    results = evaluate(cfg, progress=True)
    if results is not None:
        with open(os.path.join(cfg.out, "table.md")) as f:
            print(f.read(), end="")


if __name__ == "__main__":
    flags.run(main)
