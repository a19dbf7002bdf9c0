"""Prompts with ranked candidates, and the batches that train.py and evaluate.py share (Sec. 3.1).

    python tools/prepare_hh_rlhf.py --hh-dir hh-rlhf --out data/hh2   # HH-RLHF -> these samples

This file needs only clha_loss.py of ours, so it copies alone into a project on other data
(HH-RLHF's own parsing is in tools/prepare_hh_rlhf.py, files are written whole by harness/files.py).
A sample is one JSON line per prompt (also the authors' format, gzip or not):
    {"id": "harmless-base/test/17", "subset": "harmless-base",   # subset/split/line of the raw file
     "prompt": "\\n\\nHuman: ...\\n\\nAssistant:",  # the dialogue up to its last "Assistant:"
     "responses": ["...", "..."],              # K >= 2 candidate replies, best first once rescored
     "rewards": [4.58, -0.16] or null,         # reward-model scores, null until rescore.py has run
     "sft_index": 0}                           # which response the SFT term trains on

A candidate is the tokenizer's own encoding of prompt + " " + response, then EOS if it fits. A batch
holds B prompts with all K candidates: one row per candidate, as the authors do; or each prompt once
with its K candidates after it; or (the default) those prompt groups packed into rows. Two prompts
packed in one row (P, Q: the prompts; 1, 2: each one's candidates; . masked):

    P . . . . . . . . .    positions 0 1 2 3 4 3 0 1 1 2, as if each candidate had a row alone:
    P P . . . . . . . .    a token sees its own prompt and its own candidate, never another
    P P P . . . . . . .    candidate or prompt; each candidate's first response token is
    P P P 1 . . . . . .    predicted by its prompt's last token
    P P P 1 1 . . . . .
    P P P . . 2 . . . .
    . . . . . . Q . . .
    . . . . . . Q 1 . .
    . . . . . . Q . 2 .
    . . . . . . Q . 2 2
"""

import functools
import gzip
import json
import math
import sys
import unicodedata
import zlib
from collections import Counter

import torch

from clha_loss import response_logps

SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
ASSISTANT = "\n\nAssistant:"


class UserError(ValueError):
    """A mistake the user can fix, in a flag, a path or a line of data, with a message that says
    what to change; every script prints it as one line and exits with 2 (harness/flags.py). It lives
    in the lowest module that raises it, so that this file copies alone."""


# ---- tokenization --------------------------------------------------------------------------------

def special_prefix(tokenizer):
    """The ids the tokenizer itself puts before a text: BOS for LLaMA-1/2/3 and Mistral, nothing for
    Qwen2, GPT-NeoX or SmolLM2, whatever `bos_token` they define. We follow it, not guess."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return next(with_specials[:n] for n in range(len(with_specials) - len(plain) + 1)
                if with_specials[n:n + len(plain)] == plain)


@functools.lru_cache(maxsize=16)
def max_token_chars(tokenizer):
    """The most characters one token stands for, so that text[:n * this] keeps text's first n
    tokens: a 30 MB line is cut before it is tokenized, not after."""
    return max(map(len, tokenizer.get_vocab()))


def split_tokens(tokenizer, text, boundary):
    """The tokenizer's own encoding of `text`, split at character `boundary` by the tokens' offsets:
    (the tokens that end before it, the rest); a token that crosses it goes with the rest."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [end for _, end in encoded["offset_mapping"]]
    split = next((n for n, end in enumerate(ends) if end > boundary), len(ends))
    return encoded["input_ids"][:split], encoded["input_ids"][split:]


def encode_prompt(tokenizer, prompt, max_prompt_len):
    """The prompt as generation starts from it: the special prefix, then the prompt's last tokens,
    `max_prompt_len` in all, as training cuts it (the space that opens the reply is the reply's)."""
    prefix = special_prefix(tokenizer)
    keep = max_prompt_len - len(prefix)
    if keep < 1:
        raise UserError(f"--max-prompt-len {max_prompt_len} leaves no room after {len(prefix)} "
                        "special tokens")
    prompt = prompt[-2 * keep * max_token_chars(tokenizer):]     # no need to tokenize what is cut
    return prefix + split_tokens(tokenizer, prompt + " ", len(prompt))[0][-keep:]


def encode_sample(tokenizer, sample, max_len=512, max_prompt_len=384):
    """-> K rows (prompt ids, response ids), one per candidate: the tokenizer's own encoding of
    prompt + " " + response, so a byte-level BPE (Llama-3, Qwen2) sees ':' 'ĠHello' as in the
    dialogue. The prompt is cut from the left as encode_prompt cuts it, the response from the right
    to fit `max_len`; only a response that fits whole ends with EOS."""
    prefix, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    keep = max_prompt_len - len(prefix)
    if keep < 1 or max_len - max_prompt_len < 1:
        raise UserError(f"--max-prompt-len {max_prompt_len} and --max-len {max_len} leave no room "
                        f"for the prompt after {len(prefix)} special tokens, or for the response")
    chars = 2 * max_len * max_token_chars(tokenizer)
    prompt, rows = sample["prompt"][-chars:], []
    for response in sample["responses"]:
        prompt_ids, response_ids = split_tokens(tokenizer, prompt + " " + response.strip()[:chars],
                                                len(prompt))
        prompt_ids = prefix + prompt_ids[-keep:]
        if not prompt_ids:                 # Eq. 3 needs a token before the response to predict it
            raise UserError(f"sample {sample.get('id')}: its prompt has no token of its own before "
                            "the response")
        room = max_len - len(prompt_ids)
        rows.append((prompt_ids, response_ids + [eos] if len(response_ids) < room else
                     response_ids[:room]))
    return rows


# ---- batches: B prompts with all K candidates, in one of three layouts ---------------------------

def pad_id(tokenizer):
    """Any id works where nothing attends to it; LLaMA has no pad token, so fall back to EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def shared_rows(encoded):
    """One sample's K (prompt ids, response ids) -> (shared ids, [(candidate ids, own prompt
    tokens)]): the longest run of prompt tokens all K share; with a byte-level BPE the last ones can
    differ (a token crossing into the reply is the reply's) and stay each candidate's own."""
    prompts = [prompt for prompt, _ in encoded]
    n = 0
    while n < min(map(len, prompts)) and len({p[n] for p in prompts}) == 1:
        n += 1
    return prompts[0][:n], [(p[n:] + response, len(p) - n) for p, response in encoded]


def pack(lengths, pack_len):
    """The row of each group, in as few rows of at most `pack_len` tokens as hold them (a longer
    group gets a row of its own), balanced: the longest row sets every row's padding, so the
    longest groups go first, each to the shortest row so far."""
    rows = 1
    while True:
        load, count, where = [0] * rows, [0] * rows, [0] * len(lengths)
        for g in sorted(range(len(lengths)), key=lambda g: -lengths[g]):
            r = min(range(rows), key=load.__getitem__)
            where[g], load[r], count[r] = r, load[r] + lengths[g], count[r] + 1
        if all(n <= pack_len or c == 1 for n, c in zip(load, count)):
            return where
        rows += 1


def collate(groups, samples, pad_id, share_prompt, pack_len=None, multiple=8):
    """Groups (shared ids, [(candidate ids, own prompt tokens)]) -> the batch, padded on the right.
    A group is a prompt with its K candidates (share_prompt), or one candidate with its prompt; each
    has a row, or with pack_len they share rows of at most pack_len tokens. `predict`: the row and
    column of the logit that predicts each response token, in candidate order, prompt-major
    (candidate n = b * K + k); `lengths`: the response tokens of each candidate."""
    sizes = [len(shared) + sum(len(ids) for ids, _ in cands) for shared, cands in groups]
    row_of = pack(sizes, pack_len) if pack_len else list(range(len(groups)))
    R, fill = max(row_of) + 1, [0] * (max(row_of) + 1)
    L = -(-max(sum(n for n, r in zip(sizes, row_of) if r == row) for row in range(R)) // multiple) \
        * multiple
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)   # [R, L]
    positions = torch.zeros(R, L, dtype=torch.long)            # [R, L] within each group
    segment = torch.zeros(R, L, dtype=torch.long)              # [R, L] group + 1, 0: padding
    part = torch.zeros(R, L, dtype=torch.long)                 # [R, L] 0: shared, k + 1: cand. k
    predict, targets, lengths, tokens = [], [], [], 0
    for g, ((shared, cands), r) in enumerate(zip(groups, row_of)):
        at, P = fill[r], len(shared)
        input_ids[r, at:at + P], positions[r, at:at + P] = torch.tensor(shared), torch.arange(P)
        start = at + P
        for k, (ids, own_prompt) in enumerate(cands):
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            positions[r, start:end] = torch.arange(P, P + len(ids))   # as if it had the row alone
            part[r, start:end] = k + 1
            for t in range(own_prompt, len(ids)):           # token t is predicted by the one before
                predict.append((r, start + t - 1 if t > 0 else at + P - 1))
                targets.append(ids[t])
            lengths.append(len(ids) - own_prompt)
            tokens, start = tokens + P + len(ids), end
        segment[r, at:start], fill[r] = g + 1, start
    i = torch.arange(L)
    # [R, L, L] True where a token may attend: its own group, causally, the shared part or itself
    sees = (segment[:, :, None] == segment[:, None, :]) & (i[:, None] >= i[None, :]) \
        & ((part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :]))
    rows, cols = torch.tensor(predict).T                       # [M] each
    # the columns whose logits are needed, per row, so that the LM head runs on those alone
    needed = [sorted(set(cols[rows == r].tolist())) for r in range(R)]
    keep = torch.tensor([c + c[-1:] * (max(map(len, needed)) - len(c)) for c in needed])   # [R, n]
    K = len(samples[0]["responses"])
    has_rewards = all(s["rewards"] is not None and len(s["responses"]) == K for s in samples)
    return {"input_ids": input_ids,
            # one candidate per row, no packing: the usual [R, L] padding mask and positions
            "attention_mask": sees[:, None] if share_prompt or pack_len else segment > 0,
            "position_ids": positions if share_prompt or pack_len else None,
            "predict": (rows, cols), "keep": keep,
            "slots": torch.tensor([needed[r].index(c) for r, c in predict]),   # [M] place in keep
            "targets": torch.tensor(targets), "lengths": torch.tensor(lengths),
            "longest": max(lengths),                      # a plain number: no GPU sync to find it
            "tokens": tokens,                             # the tokens of the B*K sequences
            "computed": sum(sizes),                       # the tokens this layout computes
            "rewards": torch.tensor([s["rewards"] for s in samples], dtype=torch.float32)
            if has_rewards else None,                     # [B, K]
            "sft_index": torch.tensor([s["sft_index"] for s in samples]),   # [B]
            "K": K}


def make_batch(tokenizer, samples, max_len=512, max_prompt_len=384, share_prompt=False,
               pack_len=None):
    """Samples -> one batch of their B prompts and all K candidates: a row per candidate, or with
    share_prompt a row per prompt, or with share_prompt and pack_len prompts packed in rows."""
    encoded = [encode_sample(tokenizer, s, max_len, max_prompt_len) for s in samples]
    groups = [shared_rows(e) for e in encoded] if share_prompt else \
        [(prompt, [(response, 0)]) for e in encoded for prompt, response in e]
    return collate(groups, samples, pad_id(tokenizer), share_prompt,
                   pack_len if share_prompt else None)


def policy_logps(model, batch):
    """Eq. 3 for each candidate of a make_batch batch, any layout -> mean and summed response
    log-probs [N], N = B * K prompt-major: one forward for all (under FSDP each forward all-gathers
    every layer), the LM head only on the columns that predict a response token (`keep`)."""
    mask, impl = batch["attention_mask"], model.config._attn_implementation
    if mask.dim() == 2 and impl in ("sdpa", "eager"):   # else transformers tests mask.all(): a sync
        causal = torch.ones(mask.shape[1], mask.shape[1], dtype=torch.bool, device=mask.device)
        mask = mask[:, None, None, :] & causal.tril()                      # [R, 1, L, L]
    if mask.dim() == 4 and impl == "eager":                 # eager adds the mask: 0 or -inf
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask,
                   position_ids=batch["position_ids"],
                   logits_to_keep=batch["keep"]).logits             # [R, n, V]
    scores = logits[batch["predict"][0], batch["slots"]]            # [M, V]
    return response_logps(scores, batch["targets"], batch["lengths"], batch["longest"])   # Eq. 3


def pinned(batch):
    """The batch in page-locked memory (a step ahead, in train.py's thread): a copy to the GPU from
    pageable memory would first wait for everything queued on the GPU."""
    return tensors(batch, torch.Tensor.pin_memory)


def to_device(batch, device):
    """The batch's tensors on `device`, copied without waiting for the GPU once pinned."""
    return tensors(batch, lambda v: v.to(device, non_blocking=True))


def tensors(batch, fn):
    """The batch with fn applied to each tensor (`predict` is a pair of them)."""
    apply = lambda v: fn(v) if torch.is_tensor(v) else v
    return {k: tuple(map(apply, v)) if isinstance(v, tuple) else apply(v) for k, v in batch.items()}


# ---- sampling ------------------------------------------------------------------------------------

def step_batches(lengths, global_batch, seed, epoch, group_by_length=False, window=32):
    """Sample indices of each optimizer step in one epoch, set by (seed, epoch) alone; the shuffle's
    last len(lengths) % global_batch are left out. group_by_length sorts by length within windows of
    `window` steps, then shuffles the steps: less padding per micro-batch, still a random epoch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    order = order[:len(order) // global_batch * global_batch]
    if group_by_length:
        span = window * global_batch
        order = [i for w in range(0, len(order), span)
                 for i in sorted(order[w:w + span], key=lengths.__getitem__)]
    steps = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    if group_by_length:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=g).tolist()]
    return steps


def iterate_steps(lengths, global_batch, seed, epochs, start=0, group_by_length=False):
    """Yield (step number, epoch, sample indices of that step) from optimizer step `start` on: a
    resumed run sees exactly the batches an uninterrupted one would have seen."""
    per_epoch = len(lengths) // global_batch
    for epoch in range(start // per_epoch, epochs):
        for i, step in enumerate(step_batches(lengths, global_batch, seed, epoch, group_by_length)):
            if epoch * per_epoch + i >= start:
                yield epoch * per_epoch + i, epoch, step


def micro_batch(step, batch_size, world_size, rank, micro):
    """The indices `rank` trains on in accumulation step `micro` of an optimizer step: the same
    micro-batches whatever the split (1 rank x 2 accumulation == 2 ranks x 1)."""
    start = (micro * world_size + rank) * batch_size
    return step[start:start + batch_size]


def sample_length(sample):
    """Characters of the prompt and longest response: a tokenizer-free proxy for sequence length."""
    return len(sample["prompt"]) + max(len(r) for r in sample["responses"])


# ---- reading and writing sample files ------------------------------------------------------------

def json_lines(path):
    """Yield (line number, object) for each non-empty line, gzip or not; a broken line is an error
    naming file:line."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    line_no = 0
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").lstrip("\ufeff")
                    obj = json.loads(line) if line.strip() else None
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not UTF-8 text (byte {e.start}: "
                                    f"{raw[e.start:e.end]!r})") from None
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
                if line.strip() and not isinstance(obj, dict):
                    raise UserError(f"{path}:{line_no}: expected a JSON object, got "
                                    f"{type(obj).__name__}")
                if obj is not None:
                    yield line_no, obj
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"{path}:{line_no + 1}: broken gzip data ({e}); is the file "
                        "complete?") from None


def visible(text):
    """Whether the text shows anything: a character that is not whitespace, a control or a format
    character (a zero-width space alone is no reply, though str.strip keeps it)."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in text)


def check_sample(s, where, min_responses=2):
    """Raise a UserError naming `where` (file:line) unless `s` is a well-formed sample."""
    for key, kind in (("id", str), ("prompt", str), ("responses", list), ("sft_index", int)):
        if not isinstance(s.get(key), kind) or isinstance(s.get(key), bool):
            raise UserError(f"{where}: field {key!r} must be a {kind.__name__}, got "
                            f"{s.get(key)!r:.40}")
    if not visible(s["prompt"]):
        raise UserError(f"{where}: the prompt is empty")
    K, rewards = len(s["responses"]), s.get("rewards")
    if K < min_responses or not all(isinstance(r, str) and visible(r) for r in s["responses"]):
        raise UserError(f"{where}: 'responses' must hold at least {min_responses} strings with "
                        "visible text")
    if rewards is not None and not (isinstance(rewards, list) and len(rewards) == K and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)
            for r in rewards)):
        raise UserError(f"{where}: 'rewards' must be null or a list of {K} finite numbers, one per "
                        f"response; got {rewards!r:.60}")
    if not 0 <= s["sft_index"] < K:
        raise UserError(f"{where}: sft_index {s['sft_index']} is not a response index (K = {K})")
    if not isinstance(s.get("subset", ""), str):
        raise UserError(f"{where}: field 'subset' must be a string")


def read_samples(path, min_responses=2, check=None):
    """Samples from a file in our format or the authors' (detected per line). check(sample): a
    further test of each sample; the UserError it raises is reported at file:line."""
    samples = []
    for line_no, obj in json_lines(path):
        where = f"{path}:{line_no}"
        sample = _from_authors_format(obj, where) if "prefix" in obj else obj
        check_sample(sample, where, min_responses)
        try:
            check and check(sample)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        samples.append(sample)
    if not samples:
        raise UserError(f"{path}: no samples, the file is empty")
    repeated = [i for i, n in Counter(s["id"] for s in samples).items() if n > 1]
    if repeated:
        raise UserError(f"{path}: {len(repeated)} ids occur more than once, e.g. {repeated[0]!r}")
    return samples


def _from_authors_format(obj, where):
    """The authors' {"prefix", "suffix", "reward", "sft_index"} line -> our sample."""
    prefix, suffix = obj.get("prefix"), obj.get("suffix")
    list_of = lambda x, kind: isinstance(x, list) and all(isinstance(v, kind) for v in x)
    if not (list_of(prefix, list) and prefix and list_of(prefix[0], str) and list_of(suffix, str)):
        raise UserError(f"{where}: the authors' format needs 'prefix' as lists of turn strings and "
                        "'suffix' as a list of response strings")
    prompt = "".join(prefix[0]).replace("<|prompter|>", "\n\nHuman: ") \
        .replace("<|assistant|>", "\n\nAssistant: ")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    subset = next((s for s in SUBSETS if s in str(meta.get("path", ""))), "unknown")
    return {"id": f"{subset}/{meta.get('line_num', where)}", "subset": subset,
            "prompt": prompt.rstrip(), "responses": suffix, "rewards": obj.get("reward"),
            "sft_index": obj.get("sft_index", 0)}


if __name__ == "__main__":     # the splits are made by tools/prepare_hh_rlhf.py: one line, status 2
    print("error: data.py is a library; the splits: python tools/prepare_hh_rlhf.py --hh-dir "
          "hh-rlhf --out data/hh2", file=sys.stderr)
    raise SystemExit(2)
