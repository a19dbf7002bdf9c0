"""Tests for the CLHA reference implementation. CPU only; no downloads.

    python -m pytest test_clha.py          # the whole suite, a few minutes on 2 cores

Every expected value is computed another way than the code under test: loops written straight from the
paper's equations, hand calculations, or an independent implementation (e.g. a per-token log_softmax).
"""

import itertools
import math

import pytest
import torch

import clha_loss


# ---------------------------------------------------------------------------------------------------------
# clha_loss.py: Eqs. 2-7 against loops written from the equations
# ---------------------------------------------------------------------------------------------------------

def loop_clha(logps, rewards, margin, reward_gap, reduction):
    """Eqs. 4-6 one pair at a time, in Python floats."""
    B, K = len(logps), len(logps[0])
    def term(b, i, j):
        k = 0 if reward_gap is None else int(abs(rewards[b][i] - rewards[b][j]) <= reward_gap)   # Eq. 5's k
        f = logps[b][j] - logps[b][i] + margin * (j - i)                    # Eq. 4 (sign corrected) with Eq. 6
        return max(0.0, (1 - k) * f), k == 0
    if reduction == "paper":
        return sum(term(b, i, j)[0] for b in range(B) for i in range(K) for j in range(i + 1, K)) / B
    total = 0.0
    for d in range(1, K):                                                   # the authors' per-distance mean
        kept = [term(b, i, i + d)[0] for b in range(B) for i in range(K - d) if term(b, i, i + d)[1]]
        total += sum(kept) / len(kept) if kept else 0.0
    return total


def loop_pro(logps):
    """Eq. 2 one prompt at a time."""
    total = 0.0
    for p in logps:
        for k in range(len(p) - 1):
            total -= p[k] - math.log(sum(math.exp(p[i]) for i in range(k, len(p))))
    return total / len(logps)


def loop_sft(sum_logps, rewards, gate):
    return -sum(s * ((r > 0) if gate else 1) for s, r in zip(sum_logps, rewards)) / len(sum_logps)


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("reduction", ["paper", "official"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("reward_gap", [3.0, 0.5, None])
def test_clha_loss_matches_loop(K, reduction, ties, reward_gap):
    g = torch.Generator().manual_seed(K * 7 + ties)
    B = 5
    logps = -torch.rand(B, K, generator=g, dtype=torch.float64) * 4
    if ties:   # integer rewards: equal rewards, and gaps exactly at the threshold (|r_i - r_j| = 3 counts as too close)
        rewards = torch.randint(-3, 4, (B, K), generator=g).double()
    else:
        rewards = torch.randn(B, K, generator=g, dtype=torch.float64) * 4
    for margin in (3.0, 0.0, 0.7):
        got = clha_loss.clha_loss(logps, rewards, margin, reward_gap, reduction).item()
        want = loop_clha(logps.tolist(), rewards.tolist(), margin, reward_gap, reduction)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_clha_loss_hand_computed():
    # K = 3, margin 1, gap 3. Pairs: (0,1) |5-1| = 4 > 3 kept, f = -2 - (-1) + 1 = 0 -> 0;
    # (0,2) |5-0| = 5 kept, f = -0.5 + 1 + 2 = 2.5; (1,2) |1-0| = 1 <= 3 dropped. Paper: 2.5.
    # Official: distance 1 has one kept pair with term 0 -> 0; distance 2: 2.5 / 1 -> total 2.5 as well.
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    rewards = torch.tensor([[5.0, 1.0, 0.0]])
    assert clha_loss.clha_loss(logps, rewards, 1.0, 3.0, "paper").item() == pytest.approx(2.5)
    # two prompts, official: distance 1 kept terms {0 (prompt 0), 1.5 (prompt 1)} -> 0.75; distance 2: {2.5, 0 dropped}
    logps2 = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.5, -3.0]])
    rewards2 = torch.tensor([[5.0, 1.0, 0.0], [9.0, 0.0, 8.0]])
    # prompt 1: (0,1) |9-0| kept, f = -1.5 + 1 + 1 = 0.5 ; (1,2) |0-8| kept, f = -3 + 1.5 + 1 = -0.5 -> 0 ; (0,2) |1| dropped
    assert clha_loss.clha_loss(logps2, rewards2, 1.0, 3.0, "official").item() == pytest.approx((0 + 0.5 + 0) / 3 + 2.5)
    assert clha_loss.clha_loss(logps2, rewards2, 1.0, 3.0, "paper").item() == pytest.approx((2.5 + 0.5) / 2)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_clha_known_values(K):
    B = 3
    logps = torch.full((B, K), -1.3)
    # equal log-probs, every pair kept: each pair contributes margin * (j - i)
    want = 3.0 * sum(j - i for i, j in itertools.combinations(range(K), 2))
    assert clha_loss.clha_loss(logps, None, 3.0, None, "paper").item() == pytest.approx(want)
    # PRO at equal log-probs is log K! (a uniform softmax over K, K-1, ..., 2 candidates)
    assert clha_loss.pro_loss(logps).item() == pytest.approx(math.log(math.factorial(K)))
    # every pair inside the reward gap: nothing to learn
    assert clha_loss.clha_loss(logps, torch.zeros(B, K), 3.0, 3.0).item() == 0.0


def test_reductions_agree_for_two_candidates():
    logps = -torch.rand(6, 2) * 5
    rewards = torch.tensor([[10.0, -10.0]]).expand(6, 2)   # every pair kept
    paper = clha_loss.clha_loss(logps, rewards, 3.0, 3.0, "paper")
    official = clha_loss.clha_loss(logps, rewards, 3.0, 3.0, "official")
    assert paper.item() == pytest.approx(official.item())


@pytest.mark.parametrize("K", [2, 3, 4])
def test_pro_and_sft_match_loops(K):
    g = torch.Generator().manual_seed(K)
    logps = -torch.rand(4, K, generator=g, dtype=torch.float64) * 6
    assert clha_loss.pro_loss(logps).item() == pytest.approx(loop_pro(logps.tolist()), rel=1e-12)
    sums = -torch.rand(4, generator=g, dtype=torch.float64) * 50
    rewards = torch.tensor([1.5, -0.2, 0.0, 3.0], dtype=torch.float64)   # reward 0 is not > 0: gated out
    for gate in (True, False):
        got = clha_loss.sft_loss(sums, rewards, gate).item()
        assert got == pytest.approx(loop_sft(sums.tolist(), rewards.tolist(), gate), rel=1e-12)


@pytest.mark.parametrize("K", [2, 3])
def test_objective_combines_eq7(K):
    g = torch.Generator().manual_seed(11)
    B = 4
    logps = -torch.rand(B, K, generator=g, dtype=torch.float64) * 3
    sums = logps * 20
    rewards = torch.tensor([[4.0, -1.0, 2.0], [-2.0, 3.0, 0.5], [0.1, 0.0, 9.0], [7.0, 7.5, -7.0]],
                           dtype=torch.float64)[:, :K]
    sft_index = torch.tensor([0, 0, 1, 0])
    alpha = 0.05 * (K - 1) ** 2
    total, m = clha_loss.clha_objective(logps, sums, rewards, sft_index)
    targets = [sft_index[b].item() for b in range(B)]
    want_sft = loop_sft([sums[b, t].item() for b, t in enumerate(targets)],
                        [rewards[b, t].item() for b, t in enumerate(targets)], gate=True)
    want = loop_clha(logps.tolist(), rewards.tolist(), 3.0, 3.0, "paper") + alpha * want_sft
    assert total.item() == pytest.approx(want, rel=1e-12)
    assert m["loss_sft"].item() == pytest.approx(want_sft, rel=1e-12)
    # metrics by hand: the SFT targets' rewards are 4, -2, 0.0, 7 -> on for 2 of 4 prompts
    assert m["sft_on"].item() == pytest.approx(0.5)
    pairs = [(b, i, j) for b in range(B) for i, j in itertools.combinations(range(K), 2)]
    kept = [(b, i, j) for b, i, j in pairs if abs(rewards[b, i] - rewards[b, j]) > 3.0]
    assert m["pairs_kept"].item() == pytest.approx(len(kept) / len(pairs))
    assert m["acc"].item() == pytest.approx(sum(logps[b, i] > logps[b, j] for b, i, j in pairs).item() / len(pairs))
    assert m["acc_kept"].item() == pytest.approx(sum(logps[b, i] > logps[b, j] for b, i, j in kept).item() / len(kept))
    assert torch.allclose(m["logp_rank"], logps.mean(0))
    # PRO: Eq. 2 plus the ungated SFT term; "w/o L_clha": the gated SFT term alone
    total, _ = clha_loss.clha_objective(logps, sums, None, sft_index, loss="pro")
    ungated = loop_sft([sums[b, t].item() for b, t in enumerate(targets)], [0] * B, gate=False)
    assert total.item() == pytest.approx(loop_pro(logps.tolist()) + alpha * ungated, rel=1e-12)
    total, _ = clha_loss.clha_objective(logps, sums, rewards, sft_index, loss="sft")
    assert total.item() == pytest.approx(alpha * want_sft, rel=1e-12)


def test_gradient_directions():
    K = 4
    logps = torch.tensor([[-2.0, -1.9, -1.8, -1.7]], requires_grad=True)
    rewards = torch.tensor([[9.0, 5.0, 1.0, -3.0]])          # neighbours 4 apart: every pair kept at gap 3
    clha_loss.clha_loss(logps, rewards).backward()
    assert logps.grad[0, 0] < 0          # raising the best candidate lowers the loss
    assert logps.grad[0, K - 1] > 0      # lowering the worst candidate lowers the loss
    logps.grad = None
    clha_loss.pro_loss(logps).backward()
    assert logps.grad[0, 0] < 0 and logps.grad[0, K - 1] > 0

    # a pair inside the reward gap gets no gradient, even though its hinge is active
    logps = torch.tensor([[-3.0, -1.0]], requires_grad=True)
    clha_loss.clha_loss(logps, torch.tensor([[1.0, -1.5]]), reward_gap=3.0).backward()
    assert torch.equal(logps.grad, torch.zeros(1, 2))

    # a gated-out prompt (target reward <= 0) gets no SFT gradient; a gated-in one does
    sums = torch.tensor([-40.0, -30.0], requires_grad=True)
    clha_loss.sft_loss(sums, torch.tensor([-0.5, 2.0])).backward()
    assert sums.grad[0] == 0 and sums.grad[1] < 0


def loop_sequence_logps(logits, input_ids, response_mask):
    """Eq. 3 token by token with log_softmax, in float64."""
    means, sums = [], []
    for n in range(len(input_ids)):
        total, count = 0.0, 0
        for t in range(1, input_ids.shape[1]):
            if response_mask[n, t]:
                total += torch.log_softmax(logits[n, t - 1].double(), dim=-1)[input_ids[n, t]].item()
                count += 1
        means.append(total / count)
        sums.append(total)
    return torch.tensor(means, dtype=torch.float64), torch.tensor(sums, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_logps_matches_token_loop(dtype):
    g = torch.Generator().manual_seed(3)
    N, T, V = 3, 9, 17
    logits = (torch.randn(N, T, V, generator=g) * 3).to(dtype)
    input_ids = torch.randint(0, V, (N, T), generator=g)
    response_mask = torch.zeros(N, T, dtype=torch.bool)
    response_mask[0, 4:9] = True     # response to the end
    response_mask[1, 2:5] = True     # followed by padding
    response_mask[2, 1] = True       # one token right after BOS
    mean, total = clha_loss.sequence_logps(logits, input_ids, response_mask)
    want_mean, want_sum = loop_sequence_logps(logits, input_ids, response_mask)
    assert mean.dtype == torch.float32 and total.dtype == torch.float32
    assert torch.allclose(mean.double(), want_mean, atol=1e-5)
    assert torch.allclose(total.double(), want_sum, atol=1e-4)


def test_sequence_logps_rejects_bad_masks():
    logits, ids = torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2:] = True
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        clha_loss.sequence_logps(logits, ids, mask)
    mask[1, 0:3] = True
    with pytest.raises(ValueError, match=r"rows \[1\] have a response token at position 0"):
        clha_loss.sequence_logps(logits, ids, mask)


# ---------------------------------------------------------------------------------------------------------
# data.py: reading HH-RLHF, the sample format, tokenization, sampling
# ---------------------------------------------------------------------------------------------------------

import gzip
import json
import os

import data

HH_TEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "hh-rlhf",
                       "harmless-base", "test.jsonl.gz")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A LLaMA-style SentencePiece tokenizer trained offline on the demo data (bos 1, eos 2, pad 3)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    paths = data.make_demo_data(str(folder / "raw"), n_train=600, n_test=10)
    samples, _ = data.read_hh_rlhf(paths["train"])
    return data.train_tokenizer([s["prompt"] + " " + r for s in samples for r in s["responses"]],
                                str(folder / "tok"), vocab_size=600)


@pytest.mark.skipif(not os.path.exists(HH_TEST), reason=f"real HH-RLHF data not found at {HH_TEST}")
def test_read_real_hh_rlhf():
    samples, skipped = data.read_hh_rlhf(HH_TEST)
    # shared/data/README.md: 2,312 lines, 4 with an empty reply, 5 whose prompts differ between the two dialogues
    assert len(samples) == 2312 - 4 - 5
    assert skipped == {"empty reply": 4, "prompts differ": 5}
    raw = {n: json.loads(line) for n, line in enumerate(gzip.open(HH_TEST, "rt"), 1)}
    for s in samples:
        line = raw[int(s["id"].split("/")[-1])]
        assert s["subset"] == "harmless-base" and s["id"].startswith("harmless-base/test/")
        for dialogue, response in zip((line["chosen"], line["rejected"]), s["responses"]):
            assert response == dialogue.split("\n\nAssistant:")[-1].strip()   # the whole last turn
            assert dialogue.startswith(s["prompt"]) and s["prompt"].endswith("\n\nAssistant:")
            assert dialogue[len(s["prompt"]):].strip() == response           # prompt + reply rebuild the dialogue
    # 48 final chosen replies have more than one paragraph (measured independently); none lost any
    multi = [s for s in samples if "\n\n" in s["responses"][0]]
    assert len(multi) == 48
    assert all(s["responses"][0].count("\n\n") == raw[int(s["id"].split("/")[-1])]["chosen"].split(
        "\n\nAssistant:")[-1].count("\n\n") for s in multi)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_read_hand_made_dialogues(tmp_path):
    multi_turn = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: List two fruits\n\nAssistant:"
    lines = [
        json.dumps({"chosen": multi_turn + " Here:\n\n1. Apple\n2. Pear\n\nEnjoy!", "rejected": multi_turn + " No."}),
        json.dumps({"chosen": multi_turn + " ", "rejected": multi_turn + " Something"}),                # empty reply
        json.dumps({"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}),  # mismatch
        "",                                                                                              # blank: ignored
        json.dumps({"chosen": "\n\nHuman: Q\n\nAssistant:  two spaces ", "rejected": "\n\nHuman: Q\n\nAssistant: ok"}),
    ]
    path = tmp_path / "harmless-base" / "train.jsonl"
    path.parent.mkdir()
    write_lines(path, lines)
    samples, skipped = data.read_hh_rlhf(str(path))
    assert skipped == {"empty reply": 1, "prompts differ": 1}
    assert [s["id"] for s in samples] == ["harmless-base/train/1", "harmless-base/train/5"]
    assert samples[0]["prompt"] == multi_turn
    assert samples[0]["responses"] == ["Here:\n\n1. Apple\n2. Pear\n\nEnjoy!", "No."]
    assert samples[1]["responses"] == ["two spaces", "ok"] and samples[1]["rewards"] is None
    write_lines(path, lines[:2] + ['{"chosen": "\\n\\nHuman: cut off'])
    with pytest.raises(ValueError, match=r"train.jsonl:3: not valid JSON"):
        data.read_hh_rlhf(str(path))


def test_sample_files_and_authors_format(tmp_path):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Any tips?\n\nAssistant:"
    raw = tmp_path / "helpful-base" / "test.jsonl"
    raw.parent.mkdir()
    write_lines(raw, [json.dumps({"chosen": dialogue + " Drink water.", "rejected": dialogue + " No."})])
    ours, _ = data.read_hh_rlhf(str(raw))
    turns = ["<|prompter|>Hi", "<|assistant|>Hello!", "<|prompter|>Any tips?", "<|assistant|>"]
    authors = {"prefix": [turns, turns], "suffix": ["Drink water.", "No."], "reward": [1.5, -0.5], "sft_index": 0,
               "meta": {"path": "../../data/raw_data/hhrlhf/helpful-base/test.jsonl", "line_num": 1, "task": "dialogue"}}
    write_lines(tmp_path / "authors.jsonl", [json.dumps(authors)])
    theirs = data.read_samples(str(tmp_path / "authors.jsonl"))
    assert [(s["prompt"], s["responses"], s["subset"]) for s in theirs] == \
           [(s["prompt"], s["responses"], s["subset"]) for s in ours]
    assert theirs[0]["rewards"] == [1.5, -0.5]
    # our format round-trips; a bad line names file and line
    data.write_jsonl(str(tmp_path / "ours.jsonl"), ours)
    assert data.read_samples(str(tmp_path / "ours.jsonl")) == ours
    bad = dict(ours[0], rewards=[1.0])
    write_lines(tmp_path / "bad.jsonl", [json.dumps(ours[0] | {"id": "x"}), json.dumps(bad)])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'rewards' must be null or 2 finite numbers"):
        data.read_samples(str(tmp_path / "bad.jsonl"))


def test_splits_and_extra_responses(tmp_path):
    for subset in data.SUBSETS:
        for split, n in (("train", 6), ("test", 100)):
            lines = [json.dumps({"chosen": f"\n\nHuman: {subset} {split} {i}?\n\nAssistant: yes",
                                 "rejected": f"\n\nHuman: {subset} {split} {i}?\n\nAssistant: no"}) for i in range(n)]
            (tmp_path / "hh" / subset).mkdir(parents=True, exist_ok=True)
            with gzip.open(tmp_path / "hh" / subset / f"{split}.jsonl.gz", "wt") as f:
                f.write("\n".join(lines) + "\n")
    data.build_splits(str(tmp_path / "hh"), str(tmp_path / "out"), dev_size=40, seed=1)
    train = data.read_samples(str(tmp_path / "out" / "train.jsonl"))
    dev = data.read_samples(str(tmp_path / "out" / "dev.jsonl"))
    tests = {s: data.read_samples(str(tmp_path / "out" / "test" / f"{s}.jsonl")) for s in data.SUBSETS}
    assert len(train) == 24 and len(dev) == 40 and sum(map(len, tests.values())) == 400 - 40
    test_ids = {s["id"] for t in tests.values() for s in t}
    assert not test_ids & {s["id"] for s in dev}                           # dev is removed from test
    assert all(s["id"].startswith(subset) for subset, t in tests.items() for s in t)
    # HH-RLHF_3: a third response from another file, matched by prompt; unmatched samples are dropped
    extra = [dict(s, id=f"x{i}", responses=["yes", "maybe"]) for i, s in enumerate(train[:5])]
    data.write_jsonl(str(tmp_path / "extra.jsonl"), extra)
    three = data.add_responses(train, str(tmp_path / "extra.jsonl"))
    assert [s["responses"] for s in three] == [["yes", "no", "maybe"]] * 5


def test_tokenization_positions(tokenizer):
    prompt = "\n\nHuman: Hi there!\n\nAssistant: Hello!\n\nHuman: How do I make tea?\n\nAssistant:"
    sample = {"prompt": prompt, "responses": ["Sure! First boil some water.", "No."], "rewards": [2.0, -1.0],
              "sft_index": 0}
    encoded = data.encode_sample(tokenizer, sample, max_len=512, max_prompt_len=384)
    batch = data.collate([encoded], [sample], tokenizer.pad_token_id)
    ids, mask, attn = batch["input_ids"], batch["response_mask"], batch["attention_mask"]
    assert ids.shape == (2, ids.shape[1]) and ids.shape[1] % 8 == 0
    for n, response in enumerate(sample["responses"]):
        assert ids[n, 0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids[n][mask[n]]) == response + "</s>"               # the response and its EOS
        assert tokenizer.decode(ids[n][attn[n] & ~mask[n]][1:]) == prompt           # BOS + the prompt, exactly
        assert ids[n][mask[n]][-1] == tokenizer.eos_token_id
        assert not (mask[n] & ~attn[n]).any() and (ids[n][~attn[n]] == tokenizer.pad_token_id).all()
    assert batch["rewards"].tolist() == [[2.0, -1.0]] and batch["sft_index"].tolist() == [0]
    # the prompt is cut from the left: its end, where the reply starts, survives
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    short, _ = data.encode_sample(tokenizer, sample, max_len=512, max_prompt_len=6)
    assert short == [tokenizer.bos_token_id] + prompt_ids[-6:]
    assert tokenizer.decode(short[1:]).endswith("tea?\n\nAssistant:")
    # a response too long for max_len is cut from the right, but keeps its EOS; no room at all leaves EOS alone
    full = len(encoded[0])
    _, responses = data.encode_sample(tokenizer, sample, max_len=full + 4, max_prompt_len=full + 2)
    assert responses[0] == tokenizer("Sure! First boil some water.", add_special_tokens=False)["input_ids"][:3] + [2]
    _, responses = data.encode_sample(tokenizer, sample, max_len=10, max_prompt_len=8)
    assert responses == [[tokenizer.eos_token_id]] * 2
    batch = data.collate([data.encode_sample(tokenizer, sample, 10, 8)], [sample], tokenizer.pad_token_id)
    assert batch["response_mask"].sum(1).tolist() == [1, 1] and batch["input_ids"].shape[1] == 16


def test_sampling_ranks_resume_and_seed():
    lengths = [(i * 37) % 101 for i in range(103)]
    B, world, accum = 3, 2, 2
    global_batch = B * world * accum
    for group in (False, True):
        steps = data.step_batches(lengths, global_batch, seed=5, epoch=1, group_by_length=group)
        assert steps == data.step_batches(lengths, global_batch, seed=5, epoch=1, group_by_length=group)
        assert steps != data.step_batches(lengths, global_batch, seed=5, epoch=2, group_by_length=group)
        seen = {r: [i for s in steps for m in range(accum) for i in data.micro_batch(s, B, world, r, m)]
                for r in range(world)}
        assert not set(seen[0]) & set(seen[1])                             # ranks see different prompts
        assert len(seen[0]) == len(seen[1]) == 103 // global_batch * global_batch // 2
        assert len(set(seen[0]) | set(seen[1])) == 103 // global_batch * global_batch   # the epoch, once each
        # 1 rank x 2 accumulation steps trains on exactly the micro-batches of 2 ranks x 1
        for s in steps:
            assert [data.micro_batch(s, B, 1, 0, m) for m in range(world * accum)] == \
                   [data.micro_batch(s, B, world, r, m) for m in range(accum) for r in range(world)]
    # length grouping cuts padding: the spread of lengths inside a micro-batch shrinks
    spread = {g: sum(max(lengths[i] for i in data.micro_batch(s, B, 1, 0, 0)) -
                     min(lengths[i] for i in data.micro_batch(s, B, 1, 0, 0))
                     for s in data.step_batches(lengths, B, 0, 0, g)) for g in (False, True)}
    assert spread[True] < spread[False] / 3
    # resuming at step s yields the batches of an uninterrupted run from s on, across epochs
    run = list(data.iterate_steps(lengths, global_batch, seed=5, epochs=3, group_by_length=True))
    assert [r[0] for r in run] == list(range(3 * (103 // global_batch)))
    assert list(data.iterate_steps(lengths, global_batch, seed=5, epochs=3, start=11, group_by_length=True)) == run[11:]


# ---------------------------------------------------------------------------------------------------------
# train.py: FSDP2 on CPU (gloo), resume, export, learning, bad setups
# ---------------------------------------------------------------------------------------------------------

import signal
import subprocess
import sys
import time

from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import train

ROOT = os.path.dirname(os.path.abspath(__file__))


def ground_truth_rewards(samples):
    """Rewards from the demo's known reply quality (0, 1, 2 -> -3, 1, 5: every pair 4 apart), best first."""
    out = []
    for s in samples:
        rewards = [4.0 * data.demo_quality(s["prompt"], r) - 3.0 for r in s["responses"]]
        order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        out.append(dict(s, responses=[s["responses"][i] for i in order], rewards=[rewards[i] for i in order]))
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random LLaMA saved in HF format with the test tokenizer, and rescored demo train/dev files."""
    folder = tmp_path_factory.mktemp("tiny")
    paths = data.make_demo_data(str(folder / "raw"), n_train=400, n_test=60, tie=0.0, flip=0.0, seed=1)
    train_samples = ground_truth_rewards(data.read_hh_rlhf(paths["train"])[0])
    dev_samples = ground_truth_rewards(data.read_hh_rlhf(paths["test"])[0])
    data.write_jsonl(str(folder / "train.jsonl"), train_samples)
    data.write_jsonl(str(folder / "dev.jsonl"), dev_samples)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(folder / "base"))
    tokenizer.save_pretrained(str(folder / "base"))
    return {"dir": folder, "base": str(folder / "base"), "train": str(folder / "train.jsonl"),
            "dev": str(folder / "dev.jsonl"), "dev_samples": dev_samples}


def train_args(tiny, out, *extra):
    return ["--model", tiny["base"], "--train", tiny["train"], "--out", str(out), "--global-batch", "8",
            "--batch-size", "2", "--epochs", "1", "--lr", "2e-3", "--log-every", "1", "--save-every", "3",
            "--max-len", "128", "--max-prompt-len", "64", *extra]


def torchrun(nproc, args, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(ROOT, "train.py"), *args]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def kill_everything(torchrun_pid):
    """SIGKILL torchrun and its workers, as a node failure would: each worker leads a session of its own."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if parent == torchrun_pid:
            os.killpg(int(pid), signal.SIGKILL)
    os.killpg(torchrun_pid, signal.SIGKILL)


def losses(out):
    """step -> loss from log.jsonl, the last record of each step (a resumed run logs some steps twice)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "split" not in r}


@pytest.fixture(scope="session")
def two_rank_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    torchrun(2, train_args(tiny, out, "--max-steps", "9", "--dtype", "float32"))
    return out


def master_weights(out, step):
    """The fp32 weights of a sharded checkpoint, consolidated without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(out / "checkpoints" / f"step_{step:07d}"), str(out / "weights.pt"))
    return torch.load(str(out / "weights.pt"))["model"]


def test_two_processes_match_one(tiny, two_rank_run, tmp_path):
    # 2 ranks x 2 prompts x 2 accumulation steps == 1 rank x 2 prompts x 4: the same global batch of 8.
    # fp32 compute, so that the only differences are the order of floating-point sums across ranks.
    torchrun(1, train_args(tiny, tmp_path / "one", "--max-steps", "9", "--dtype", "float32"))
    one, two = losses(tmp_path / "one"), losses(two_rank_run)
    assert list(one) == list(range(1, 10))
    assert [one[s] for s in one] == pytest.approx([two[s] for s in one], rel=1e-5)
    w1, w2 = master_weights(tmp_path / "one", 9), master_weights(two_rank_run, 9)
    w0 = LlamaForCausalLM.from_pretrained(tiny["base"]).state_dict()
    for name in w1:   # equal up to rounding: far closer than what 9 steps of training moved them
        assert (w1[name] - w2[name]).norm() < 1e-3 * (w1[name] - w0[name]).norm(), name


def test_kill_and_resume_reproduces_the_run(tiny, two_rank_run, tmp_path):
    out = tmp_path / "killed"
    args = train_args(tiny, out, "--max-steps", "9", "--dtype", "float32")   # as two_rank_run
    run = torchrun(2, args, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_0000003").exists():
        assert run.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    kill_everything(run.pid)                                    # mid-training, no chance to clean up
    run.wait()
    time.sleep(1)
    assert not (out / "final").exists()
    torchrun(2, args + ["--resume"])
    resumed, uninterrupted = losses(out), losses(two_rank_run)
    assert list(resumed) == list(range(1, 10))
    assert [resumed[s] for s in range(4, 10)] == pytest.approx([uninterrupted[s] for s in range(4, 10)], rel=1e-6)
    w1 = load_file(str(out / "final" / "model.safetensors"))
    w2 = load_file(str(two_rank_run / "final" / "model.safetensors"))
    assert all(torch.equal(w1[name], w2[name]) for name in w1)
