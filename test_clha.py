"""Tests for the CLHA reference implementation. CPU only; no downloads.

    python -m pytest test_clha.py          # the whole suite, a few minutes on 2 cores

Every expected value is computed another way than the code under test: loops written straight from the
paper's equations, hand calculations, or an independent implementation (e.g. a per-token log_softmax).
"""

import dataclasses
import glob
import gzip
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPTNeoXConfig, GPTNeoXModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import clha_loss
import data
from data import UserError
from harness import checkpoints, files, fingerprints, flags, models
from harness.files import write_jsonl
from tools import benchmark, demo, prepare_hh_rlhf
from tools.prepare_hh_rlhf import read_hh_rlhf
import evaluate
import rescore
import train
from conftest import ROOT, generate, kill_everything, losses, master_weights, pairwise_accuracy, torchrun, train_args


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
    # prompt 1: (0,1) |9-0| kept, f = -1.5 + 1 + 1 = 0.5; (1,2) |0-8| kept, f = -3 + 1.5 + 1 = -0.5 -> 0;
    # (0,2) |1| dropped
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
    with pytest.raises(ValueError, match=r"sequences \[1\] have no response tokens"):
        clha_loss.sequence_logps(logits, ids, mask)
    mask[1, 0:3] = True
    with pytest.raises(ValueError, match=r"rows \[1\] have a response token at position 0"):
        clha_loss.sequence_logps(logits, ids, mask)


# ---------------------------------------------------------------------------------------------------------
# data.py: reading HH-RLHF, the sample format, tokenization, sampling
# ---------------------------------------------------------------------------------------------------------


HH_TEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "hh-rlhf",
                       "harmless-base", "test.jsonl.gz")


@pytest.mark.skipif(not os.path.exists(HH_TEST), reason=f"real HH-RLHF data not found at {HH_TEST}")
def test_read_real_hh_rlhf():
    samples, skipped = read_hh_rlhf(HH_TEST)
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
        "",                                                                                   # blank: ignored
        json.dumps({"chosen": "\n\nHuman: Q\n\nAssistant:  two spaces ", "rejected": "\n\nHuman: Q\n\nAssistant: ok"}),
    ]
    path = tmp_path / "harmless-base" / "train.jsonl"
    path.parent.mkdir()
    write_lines(path, lines)
    samples, skipped = read_hh_rlhf(str(path))
    assert skipped == {"empty reply": 1, "prompts differ": 1}
    assert [s["id"] for s in samples] == ["harmless-base/train/1", "harmless-base/train/5"]
    assert samples[0]["prompt"] == multi_turn
    assert samples[0]["responses"] == ["Here:\n\n1. Apple\n2. Pear\n\nEnjoy!", "No."]
    assert samples[1]["responses"] == ["two spaces", "ok"] and samples[1]["rewards"] is None
    write_lines(path, lines[:2] + ['{"chosen": "\\n\\nHuman: cut off'])
    with pytest.raises(ValueError, match=r"train.jsonl:3: not valid JSON"):
        read_hh_rlhf(str(path))


def test_sample_files_and_authors_format(tmp_path):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Any tips?\n\nAssistant:"
    raw = tmp_path / "helpful-base" / "test.jsonl"
    raw.parent.mkdir()
    write_lines(raw, [json.dumps({"chosen": dialogue + " Drink water.", "rejected": dialogue + " No."})])
    ours, _ = read_hh_rlhf(str(raw))
    turns = ["<|prompter|>Hi", "<|assistant|>Hello!", "<|prompter|>Any tips?", "<|assistant|>"]
    authors = {"prefix": [turns, turns], "suffix": ["Drink water.", "No."], "reward": [1.5, -0.5], "sft_index": 0,
               "meta": {"path": "../../data/raw_data/hhrlhf/helpful-base/test.jsonl", "line_num": 1,
                        "task": "dialogue"}}
    write_lines(tmp_path / "authors.jsonl", [json.dumps(authors)])
    theirs = data.read_samples(str(tmp_path / "authors.jsonl"))
    assert [(s["prompt"], s["responses"], s["subset"]) for s in theirs] == \
           [(s["prompt"], s["responses"], s["subset"]) for s in ours]
    assert theirs[0]["rewards"] == [1.5, -0.5]
    # our format round-trips; a bad line names file and line
    write_jsonl(str(tmp_path / "ours.jsonl"), ours)
    assert data.read_samples(str(tmp_path / "ours.jsonl")) == ours
    bad = dict(ours[0], rewards=[1.0])
    write_lines(tmp_path / "bad.jsonl", [json.dumps(ours[0] | {"id": "x"}), json.dumps(bad)])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'rewards' must be null or a list of 2 finite numbers"):
        data.read_samples(str(tmp_path / "bad.jsonl"))


def test_splits_and_extra_responses(tmp_path):
    for subset in data.SUBSETS:
        for split, n in (("train", 6), ("test", 100)):
            lines = [json.dumps({"chosen": f"\n\nHuman: {subset} {split} {i}?\n\nAssistant: yes",
                                 "rejected": f"\n\nHuman: {subset} {split} {i}?\n\nAssistant: no"}) for i in range(n)]
            (tmp_path / "hh" / subset).mkdir(parents=True, exist_ok=True)
            with gzip.open(tmp_path / "hh" / subset / f"{split}.jsonl.gz", "wt") as f:
                f.write("\n".join(lines) + "\n")
    prepare_hh_rlhf.build_splits(str(tmp_path / "hh"), str(tmp_path / "out"), dev_size=40, seed=1)
    train_samples = data.read_samples(str(tmp_path / "out" / "train.jsonl"))
    dev = data.read_samples(str(tmp_path / "out" / "dev.jsonl"))
    tests = {s: data.read_samples(str(tmp_path / "out" / "test" / f"{s}.jsonl")) for s in data.SUBSETS}
    assert len(train_samples) == 24 and len(dev) == 40 and sum(map(len, tests.values())) == 400 - 40
    test_ids = {s["id"] for t in tests.values() for s in t}
    assert not test_ids & {s["id"] for s in dev}                           # dev is removed from test
    assert all(s["id"].startswith(subset) for subset, t in tests.items() for s in t)
    # HH-RLHF_3: a third response from another file, matched by prompt; unmatched samples are dropped
    extra = [dict(s, id=f"x{i}", responses=["yes", "maybe"]) for i, s in enumerate(train_samples[:5])]
    write_jsonl(str(tmp_path / "extra.jsonl"), extra)
    three = prepare_hh_rlhf.add_responses(train_samples, str(tmp_path / "extra.jsonl"))
    assert [s["responses"] for s in three] == [["yes", "no", "maybe"]] * 5
    # the usual extra file: one reply per prompt, e.g. ChatGPT's
    write_jsonl(str(tmp_path / "one.jsonl"), [dict(s, responses=["maybe"]) for s in extra])
    assert prepare_hh_rlhf.add_responses(train_samples, str(tmp_path / "one.jsonl")) == three


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


def test_two_processes_match_one(tiny, two_rank_run, tmp_path):
    # 2 ranks x 2 prompts x 2 accumulation steps == 1 rank x 2 prompts x 4: the same global batch of 8. The one
    # rank has one row per candidate, the two ranks packed rows (the default): the same numbers.
    # fp32 compute, so that the only differences are the order of floating-point sums.
    torchrun(1, train_args(tiny, tmp_path / "one", "--max-steps", "9", "--dtype", "float32", "--no-share-prompt"))
    one, two = losses(tmp_path / "one"), losses(two_rank_run)
    assert list(one) == list(range(1, 10))
    assert [one[s] for s in one] == pytest.approx([two[s] for s in one], rel=1e-5)
    w1, w2 = master_weights(tmp_path / "one", 9), master_weights(two_rank_run, 9)
    w0 = LlamaForCausalLM.from_pretrained(tiny["base"]).state_dict()
    for name in w1:   # equal up to rounding: far closer than what 9 steps of training moved them
        assert (w1[name] - w2[name]).norm() < 1e-3 * (w1[name] - w0[name]).norm(), name


def test_cpu_offload_and_compile_give_the_default_losses(tiny, two_rank_run, tmp_path):
    """--cpu-offload (FSDP2's CPUOffloadPolicy: fp32 shards, gradients and AdamW state in host memory) and --compile
    (each decoder layer's forward through torch.compile) train to the default path's losses. One run tests both,
    to keep the suite short. The compiler backend is aot_eager: dynamo and AOT autograd trace each layer with
    FSDP2's hooks and the activation checkpoint around it, without inductor's C++ code generation, which takes a
    minute on 2 cores (inductor itself gives the same losses, checked by hand)."""
    out = tmp_path / "run"
    torchrun(2, train_args(tiny, out, "--max-steps", "9", "--dtype", "float32", "--cpu-offload", "--compile"),
             env={"TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"})
    assert losses(out) == pytest.approx(losses(two_rank_run), rel=1e-5)
    w1, w2 = master_weights(out, 9), master_weights(two_rank_run, 9)
    w0 = LlamaForCausalLM.from_pretrained(tiny["base"]).state_dict()
    for name in w1:
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


@pytest.fixture
def one_process():
    """A gloo process group of one, as `python train.py` makes, torn down after the test."""
    import torch.distributed as dist
    yield train.init_distributed()
    if dist.is_initialized():
        dist.destroy_process_group()


def test_sharded_model_and_export_give_from_pretrained_logits(tiny, tokenizer, one_process, tmp_path):
    from transformers import AutoConfig
    rank, _, device = one_process
    cfg = train.Config(model=tiny["base"], out=str(tmp_path))
    model = train.build_model(cfg, AutoConfig.from_pretrained(tiny["base"]), device, rank)   # meta -> shards -> rank 0
    ids = torch.tensor([tokenizer("\n\nHuman: How do I make tea?\n\nAssistant: Boil water.")["input_ids"]] * 2)
    with torch.no_grad():
        sharded = model(input_ids=ids).logits.float()
        # the same checkpoint loaded the plain way, computing in bf16 as the mixed-precision policy does.
        # This catches garbage in LLaMA's non-persistent rotary buffers after to_empty().
        plain = LlamaForCausalLM.from_pretrained(tiny["base"], dtype=torch.bfloat16)(input_ids=ids).logits.float()
        # Both compute in bf16 from the same bf16-rounded weights: equal, where stale buffers differ by ~7e-3.
        assert torch.allclose(sharded, plain, atol=1e-4, rtol=0), (sharded - plain).abs().max()
        # the export keeps the source checkpoint's dtype (float32 here), or the one asked for
        checkpoints.export_hf(cfg, model, tokenizer, rank)
        exported = LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
        assert exported.dtype == torch.float32
        fp32 = LlamaForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)(input_ids=ids).logits
        assert torch.equal(exported(input_ids=ids).logits, fp32)
        checkpoints.export_hf(dataclasses.replace(cfg, export_dtype="bfloat16"), model, tokenizer, rank)
        exported = LlamaForCausalLM.from_pretrained(str(tmp_path / "final"))
        assert exported.dtype == torch.bfloat16
        assert torch.allclose(exported(input_ids=ids).logits.float(), sharded, atol=1e-4, rtol=0)
        assert sorted(os.listdir(tmp_path)) == ["final"]                          # no final.tmp left


def test_validation_is_a_mean_over_prompts(tiny, tokenizer, one_process):
    """5 dev prompts in micro-batches of 2, 2 and 1: each prompt weighs the same, the half-full batch included."""
    from transformers import AutoConfig
    rank, world, device = one_process
    cfg = train.Config(model=tiny["base"], dtype="float32", batch_size=2)
    model = train.build_model(cfg, AutoConfig.from_pretrained(tiny["base"]), device, rank)
    dev = tiny["dev_samples"][:5]
    got = train.validate(cfg, model, dev, tokenizer, rank, world, device)
    with torch.no_grad():
        alone = [train.objective(cfg, model, data.make_batch(tokenizer, [s], cfg.max_len, cfg.max_prompt_len))[1]
                 for s in dev]
    for key in ("loss", "loss_rank", "loss_sft", "acc", "pairs_kept", "sft_on"):
        assert got[key] == pytest.approx(sum(m[key].item() for m in alone) / 5, rel=1e-5), key
    assert got["logp_rank"] == pytest.approx((sum(m["logp_rank"] for m in alone) / 5).tolist(), abs=1e-4)
    kept = sum(m["pairs_kept"].item() for m in alone)                   # acc_kept: a mean over the kept pairs
    assert got["acc_kept"] == pytest.approx(sum((m["acc_kept"] * m["pairs_kept"]).item() for m in alone) / kept)


def held_out_accuracy(model_dir, samples):
    from transformers import AutoTokenizer
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return pairwise_accuracy(model, AutoTokenizer.from_pretrained(model_dir), samples, max_len=128,
                                      max_prompt_len=64)


@pytest.mark.parametrize("loss", ["clha", "pro"])
def test_training_separates_held_out_pairs(tiny, tmp_path, loss):
    # the tiny fixture's pairs are separable (no flipped labels, rewards 4 apart); the dev pairs are held out
    before = held_out_accuracy(tiny["base"], tiny["dev_samples"])
    train.main(train_args(tiny, tmp_path, "--loss", loss, "--max-steps", "30", "--dtype", "float32",
                          "--log-every", "10", "--no-activation-checkpointing"))
    after = held_out_accuracy(str(tmp_path / "final"), tiny["dev_samples"])
    assert before < 0.7 and after > 0.85, (before, after)


def test_bad_setups_fail_before_training(tiny, tmp_path):
    def fails(match, *extra, out=tmp_path / "run"):
        with pytest.raises(UserError, match=match):
            train.main(train_args(tiny, out, *extra)[2:] + ["--model", tiny["base"]])
    samples = data.read_samples(tiny["train"])
    fails(r"--train .*nope.jsonl: no such file", "--train", str(tmp_path / "nope.jsonl"))
    fails(r"--global-batch 7 is not a multiple of --batch-size 2", "--global-batch", "7")
    three = [dict(samples[0], responses=samples[0]["responses"] + ["Maybe."], rewards=[1.0, 0.0, -1.0])] + samples[1:]
    write_jsonl(str(tmp_path / "three.jsonl"), three)
    fails(r"three.jsonl: sample raw/train/2 has 2 responses, the first has 3", "--train", str(tmp_path / "three.jsonl"))
    write_jsonl(str(tmp_path / "raw.jsonl"), [dict(s, rewards=None) for s in samples])
    fails(r"has no rewards: run rescore.py on it first, or pass --no-rescore", "--train", str(tmp_path / "raw.jsonl"))
    fails(r"--max-len 128 with --max-prompt-len 120 leaves 8 tokens for a response", "--max-prompt-len", "120")
    write_jsonl(str(tmp_path / "human.jsonl"), [dict(s, rewards=s["rewards"][::-1]) for s in samples])
    fails(r"human.jsonl: sample \S+ is not sorted by reward, best first", "--train", str(tmp_path / "human.jsonl"))
    fails(r"--save-every 0: must be at least 1", "--save-every", "0")
    with pytest.raises(UserError, match="invalid float value: 'none'"):   # "none" is for --reward-gap, --alpha
        flags.parse(train.Config, ["--lr", "none"])
    (tmp_path / "used" / "checkpoints" / "step_0000003").mkdir(parents=True)
    fails(r"already holds a run \(checkpoints/ or final/\): pass --resume", out=tmp_path / "used")
    with pytest.raises(UserError, match=r"--model is required \(python train.py with no flags at all runs the demo"):
        train.main(["--lr", "1e-4"])                      # flags without --model are not silently ignored
    model = LlamaForCausalLM.from_pretrained(tiny["base"])
    model._no_split_modules = set()                       # a model whose decoder layers we cannot find
    with pytest.raises(UserError, match=r"declares no decoder layers \(_no_split_modules\) to shard"):
        train.apply_fsdp(model, torch.bfloat16, activation_checkpointing=False)

# ---------------------------------------------------------------------------------------------------------
# rescore.py: the OpenAssistant reward models, rescoring, resume, Eq. 1
# ---------------------------------------------------------------------------------------------------------

PROMPT = "\n\nHuman: How do I bake bread? \n\nAssistant: Do you have flour?\n\nHuman:  Yes, and yeast.\n\nAssistant:"
OA_ROLES = ["<|prompter|>", "<|assistant|>"]


def rm_sample(id_, responses, prompt=PROMPT, sft_index=0):
    return {"id": id_, "subset": "test", "prompt": prompt, "responses": responses, "rewards": None,
            "sft_index": sft_index}


# ---- fixtures: a tiny OpenAssistant-format checkpoint, written the way the real ones are laid out ---------------

@pytest.fixture(scope="module")
def oa_checkpoint(tmp_path_factory):
    """(path, backbone GPTNeoXModel, out_proj weight, out_proj bias, tokenizer) of a tiny OA reward model."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    path = str(tmp_path_factory.mktemp("oa_rm"))
    texts = [PROMPT + " Mix flour, water and yeast, then bake it.", "Sure! First boil some water. I am not sure."] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|padding|>"] + OA_ROLES))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|padding|>",
                                        additional_special_tokens=OA_ROLES)
    tokenizer.save_pretrained(path)
    # config.json as OpenAssistant's: their model type, architecture and the legacy GPT-NeoX rotary keys
    config = {"model_type": "gpt_neox_reward_model", "architectures": ["GPTNeoXRewardModel"], "pooling": "last",
              "vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "rotary_pct": 0.25, "rotary_emb_base": 10000, "max_position_embeddings": 256,
              "use_parallel_residual": True, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "torch_dtype": "float16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    torch.manual_seed(0)
    backbone_config = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "pooling")}
    backbone = GPTNeoXModel(GPTNeoXConfig(**backbone_config)).eval()
    weight, bias = torch.randn(1, 32), torch.randn(1)
    state = {"gpt_neox." + k: v.contiguous() for k, v in backbone.state_dict().items()}
    state |= {"out_proj.weight": weight, "out_proj.bias": bias,
              "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9)}   # old checkpoints carry this buffer
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path, backbone, weight, bias, tokenizer


def oa_text(turns, eos="<|endoftext|>"):
    return "".join(("<|prompter|>" if role == "Human" else "<|assistant|>") + text + eos for role, text in turns)


def hand_reward(oa, ids):
    """Eq. of the OA model written out: the backbone on one unpadded sequence, its last hidden state, the head."""
    _, backbone, weight, bias = oa[:4]
    with torch.no_grad():
        hidden = backbone(torch.tensor([ids])).last_hidden_state[0, -1]
    return (hidden @ weight[0] + bias[0]).item()


# ---- OpenAssistant models: loading, format, pooling, truncation ---------------------------------------------------

def test_oa_checkpoint_loads_by_path_without_missing_keys(oa_checkpoint):
    from transformers import AutoModelForSequenceClassification
    model, info = AutoModelForSequenceClassification.from_pretrained(oa_checkpoint[0], output_loading_info=True,
                                                                     dtype=torch.float32)
    assert type(model).__name__ == "GPTNeoXRewardModel" and model.config.pooling == "last"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(model.out_proj.weight, oa_checkpoint[2])


def test_oa_format_on_a_two_turn_prompt(oa_checkpoint):
    _, tokenizer, format_fn = rescore.load_reward_model(oa_checkpoint[0])
    assert format_fn(PROMPT, "  Mix and bake. \n") == (
        "<|prompter|>How do I bake bread?<|endoftext|><|assistant|>Do you have flour?<|endoftext|>"
        "<|prompter|>Yes, and yeast.<|endoftext|><|assistant|>Mix and bake.<|endoftext|>")
    ids = tokenizer(format_fn(PROMPT, "ok"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|prompter|>") and ids[-1] == tokenizer.eos_token_id
    with pytest.raises(UserError, match="not an HH-RLHF prompt"):
        format_fn("How do I bake bread?", "ok")


def test_oa_scores_equal_a_hand_forward_in_a_padded_batch(oa_checkpoint):
    model, tokenizer, format_fn = rescore.load_reward_model(oa_checkpoint[0])
    responses = ["Mix flour.", "Sure! First boil some water, then bake it for forty minutes.", "No.",
                 "I am not sure, sorry.", "Bake it."]
    got = rescore.score(model, tokenizer, format_fn, [PROMPT] * 5, responses, batch_size=3)
    turns = [("Human", "How do I bake bread?"), ("Assistant", "Do you have flour?"), ("Human", "Yes, and yeast.")]
    lengths = set()
    for response, reward in zip(responses, got):
        ids = tokenizer(oa_text(turns + [("Assistant", response)]), add_special_tokens=False)["input_ids"]
        lengths.add(len(ids))
        assert reward == pytest.approx(hand_reward(oa_checkpoint, ids), abs=1e-5)
    assert len(lengths) == 5                                       # every batch had padding


def test_oa_left_truncation(oa_checkpoint):
    model, tokenizer, format_fn = rescore.load_reward_model(oa_checkpoint[0])
    ids = tokenizer(format_fn(PROMPT, "Mix flour."), add_special_tokens=False)["input_ids"]
    assert len(ids) > 12
    got = rescore.score(model, tokenizer, format_fn, [PROMPT, PROMPT], ["Mix flour.", "No."], max_length=12)
    assert got[0] == pytest.approx(hand_reward(oa_checkpoint, ids[-12:]), abs=1e-5)


# ---- re-ranking, statistics, resume ----------------------------------------------------------------------------

def test_rerank_and_keep_human_order():
    s = rm_sample("a", ["chosen", "rejected", "third"], sft_index=1)
    out = rescore.rerank(s, [0.5, 2.0, 0.5])
    assert out["responses"] == ["rejected", "chosen", "third"]       # ties keep the human order
    assert out["rewards"] == [2.0, 0.5, 0.5] and out["sft_index"] == 0
    kept = rescore.rerank(s, [0.5, 2.0, 0.5], keep_human_order=True)
    assert kept["responses"] == s["responses"] and kept["rewards"] == [0.5, 2.0, 0.5] and kept["sft_index"] == 1
    # the paper's SFT target: the human-chosen response ("rejected" here, index 1 of the input) wherever it lands
    human = rescore.rerank(dict(s, sft_index=0), [0.5, 2.0, 0.1], sft_human_chosen=True)
    assert human["responses"] == ["rejected", "chosen", "third"] and human["sft_index"] == 1


def test_noise_stats_by_hand():
    stats = rescore.noise_stats([[1.0, 5.0], [4.0, -2.0, 6.0], [0.5, 3.5]], [5.0, -1.0, 0.0], reward_gap=3.0)
    # pairs i < j: (1, 5) (4, -2) (4, 6) (-2, 6) (0.5, 3.5); r_i < r_j in all but (4, -2); gap <= 3: (4, 6), (0.5, 3.5)
    assert stats["pairs"] == 5 and stats["disagree"] == pytest.approx(4 / 5)
    assert stats["within_gap"] == pytest.approx(2 / 5)
    assert stats["sft_off"] == pytest.approx(2 / 3)                # a reward of exactly 0 turns the SFT term off
    # sorted rewards -2, 0.5, 1, 3.5, 4, 5, 6: quartiles at positions 0, 1.5, 3, 4.5, 6
    assert [stats[k] for k in ("min", "q1", "median", "q3", "max")] == [-2.0, 0.75, 3.5, 4.5, 6.0]
    assert stats["mean"] == pytest.approx(18 / 7)


def fake_scorer(table, calls=None, crash_at_call=None):
    """A score_fn from a table {response: reward}; it records what is scored and crashes on call n."""
    calls = [] if calls is None else calls
    def score_fn(prompts, responses):
        calls.append(list(responses))
        if len(calls) == crash_at_call:
            raise KeyboardInterrupt("simulated crash")
        return [table[r] for r in responses]
    return score_fn


def test_rescore_file_reranks_and_reports(tmp_path, monkeypatch, capsys):
    samples = [rm_sample("a", ["bad", "good"]), rm_sample("b", ["bad", "good", "meh"], sft_index=2)]
    write_jsonl(str(tmp_path / "in.jsonl"), samples)
    scorer = fake_scorer({"good": 4.0, "bad": -1.0, "meh": 3.5})
    stats = rescore.rescore_file("fake", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), score_fn=scorer)
    out = data.read_samples(str(tmp_path / "out.jsonl"))
    assert [s["responses"] for s in out] == [["good", "bad"], ["good", "meh", "bad"]]
    assert [s["rewards"] for s in out] == [[4.0, -1.0], [4.0, 3.5, -1.0]] and [s["sft_index"] for s in out] == [0, 0]
    # human-order pairs: (-1, 4) disagree, gap 5; (-1, 4) disagree; (-1, 3.5) disagree, gap 4.5; (4, 3.5) gap 0.5
    assert stats["disagree"] == 0.75 and stats["within_gap"] == 0.25 and stats["sft_off"] == 0.0
    assert "disagrees with the human order: 75.0%" in capsys.readouterr().out
    stats = rescore.rescore_file("fake", str(tmp_path / "in.jsonl"), str(tmp_path / "kept.jsonl"),
                                 keep_human_order=True, score_fn=scorer)
    kept = data.read_samples(str(tmp_path / "kept.jsonl"))
    assert [s["responses"] for s in kept] == [s["responses"] for s in samples]
    assert [s["sft_index"] for s in kept] == [0, 2] and kept[1]["rewards"] == [-1.0, 4.0, 3.5]
    assert stats["sft_off"] == 0.5                                  # sample a keeps "bad" (-1) as its SFT target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "kept.jsonl", "out.jsonl"]   # no part files


def test_resume_after_a_crash(tmp_path, monkeypatch):
    responses = [f"reply {n}" for n in range(40)]
    table = {r: float(n % 7) - 3 for n, r in enumerate(responses)}
    samples = [rm_sample(f"s{n}", responses[2 * n:2 * n + 2]) for n in range(20)]
    write_jsonl(str(tmp_path / "in.jsonl"), samples)
    rescore.rescore_file("fake", str(tmp_path / "in.jsonl"), str(tmp_path / "whole.jsonl"), batch_size=1,
                         score_fn=fake_scorer(table))

    crashing = fake_scorer(table, crash_at_call=2)   # crash while scoring the second chunk (8 samples a chunk)
    with pytest.raises(KeyboardInterrupt):
        rescore.rescore_file("fake", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), batch_size=1,
                             score_fn=crashing)
    part = tmp_path / "out.jsonl.part0"
    assert len(part.read_text().splitlines()) == 8 and not (tmp_path / "out.jsonl").exists()
    with open(part, "a") as f:                         # a crash in the middle of writing a line
        f.write('{"id": "s8", "rewa')

    calls = []
    rescore.rescore_file("fake", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), batch_size=1,
                         score_fn=fake_scorer(table, calls))
    assert sorted(r for c in calls for r in c) == sorted(responses[16:])          # only the unfinished samples
    out = data.read_samples(str(tmp_path / "out.jsonl"))
    assert [s["id"] for s in out] == [s["id"] for s in samples]                   # every id once, in input order
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert not part.exists()


def test_errors_name_the_file_and_line(tmp_path):
    scorer = fake_scorer({"a": 1.0, "b": 0.0})
    rescore_ = lambda: rescore.rescore_file("fake", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                                            score_fn=scorer)
    with pytest.raises(UserError, match="--data .*in.jsonl: no such file"):
        rescore_()
    (tmp_path / "in.jsonl").write_text(json.dumps(rm_sample("x", ["a", "b"])) + "\n{broken\n")
    with pytest.raises(UserError, match=r"in.jsonl:2"):
        rescore_()
    write_jsonl(str(tmp_path / "in.jsonl"), [rm_sample("x", ["a", "b"]), rm_sample("y", ["a", "b"])])
    settings = {"--reward-model": fingerprints.fingerprint("fake"),
                "--data": fingerprints.fingerprint(str(tmp_path / "in.jsonl")), "--max-length": 1024, "--dtype": "float32"}
    (tmp_path / "out.jsonl.settings.json").write_text(json.dumps(settings))
    (tmp_path / "out.jsonl.part0").write_text('{"id": "x", "rewards": [1.0, 0.0]}\nnot json\n{"id": "y"')
    with pytest.raises(UserError, match=r"out.jsonl.part0:2"):
        rescore_()
    (tmp_path / "out.jsonl.part0").write_text('{"id": "z", "rewards": [1.0, 0.0]}\n')   # left from another file
    with pytest.raises(UserError, match="'z' with 2 rewards in its part files is not in the input"):
        rescore_()


# ---- Eq. 1 and reward-model training -----------------------------------------------------------------------------

def test_rm_loss_by_hand():
    chosen, rejected = [2.0, -1.0, 30.0], [0.5, 1.0, -30.0]
    expected = sum(math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / 3   # -log sigmoid(d)
    assert rescore.rm_loss(torch.tensor(chosen), torch.tensor(rejected)).item() == pytest.approx(expected, rel=1e-6)
    assert rescore.preference_pairs([rm_sample("a", ["x", "y", "z"])]) == [
        (PROMPT, "x", "y"), (PROMPT, "x", "z"), (PROMPT, "y", "z")]


@pytest.fixture(scope="module")
def rm_demo(tmp_path_factory):
    """Demo data with clean labels, a tokenizer trained on it, and a tiny random LLaMA classifier as the base."""
    root = tmp_path_factory.mktemp("demo")
    paths = demo.make_demo_data(str(root / "raw"), n_train=300, n_test=100, flip=0, tie=0, seed=1)
    for split in ("train", "test"):
        write_jsonl(str(root / f"{split}.jsonl"), read_hh_rlhf(paths[split], "demo", split)[0])
    samples = data.read_samples(str(root / "train.jsonl"))
    tokenizer = demo.train_tokenizer([s["prompt"] + " " + r for s in samples for r in s["responses"]],
                                     str(root / "base"), vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, num_labels=1)
    LlamaForSequenceClassification(config).save_pretrained(str(root / "base"))
    return root


def test_llama_scores_equal_a_hand_forward_in_a_padded_batch(rm_demo):
    assert rescore.load_reward_model(str(rm_demo / "base"), dtype="bfloat16")[0].dtype == torch.bfloat16   # --dtype
    model, tokenizer, format_fn = rescore.load_reward_model(str(rm_demo / "base"))
    assert model.dtype == torch.float32                                           # the authors' default
    assert model.config.pad_token_id == 3 and format_fn("\n\nHuman: Hi\n\nAssistant:", " Hello ") == (
        "<s>\n\nHuman: Hi\n\nAssistant: Hello</s>")
    samples = data.read_samples(str(rm_demo / "test.jsonl"))[:4]
    prompts, responses = [s["prompt"] for s in samples for _ in (0, 1)], [r for s in samples for r in s["responses"]]
    got = rescore.score(model, tokenizer, format_fn, prompts, responses, batch_size=8)
    lengths = set()
    for p, r, reward in zip(prompts, responses, got):
        ids = tokenizer("<s>" + p + " " + r.strip() + "</s>", add_special_tokens=False)["input_ids"]
        lengths.add(len(ids))
        assert 3 not in ids and ids[-1] == 2           # LLaMA pools the rightmost non-pad token: EOS, never a pad
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        assert reward == pytest.approx((model.score.weight[0] @ hidden).item(), abs=1e-5)
    assert len(lengths) > 1                            # the batch was padded


def test_reward_model_with_two_outputs_is_refused(tmp_path, rm_demo):
    from transformers import AutoTokenizer
    config = LlamaConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_labels=2)
    LlamaForSequenceClassification(config).save_pretrained(str(tmp_path))
    AutoTokenizer.from_pretrained(str(rm_demo / "base")).save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="2 outputs"):
        rescore.load_reward_model(str(tmp_path))


def test_train_reward_model_learns_separable_pairs(rm_demo, tmp_path):
    accuracy = rescore.train_reward_model(str(rm_demo / "train.jsonl"), str(tmp_path / "rm"), str(rm_demo / "base"),
                                          dev=str(rm_demo / "test.jsonl"), lr=3e-3, batch_size=16, max_length=128)
    assert accuracy >= 0.85                           # chance is 0.5; the random base scores about that
    model, tokenizer, format_fn = rescore.load_reward_model(str(tmp_path / "rm"))   # saved in HF format, loads back
    pairs = rescore.preference_pairs(data.read_samples(str(rm_demo / "test.jsonl")))
    assert rescore.reward_accuracy(model, tokenizer, format_fn, pairs, 16, 128) == pytest.approx(accuracy)


# ---- torchrun ----------------------------------------------------------------------------------------------------

def test_torchrun_two_processes_match_one(oa_checkpoint, tmp_path):
    replies = ["Mix flour.", "Sure! First boil some water.", "No.", "I am not sure, sorry.", "Bake it.", "Why?"]
    samples = [rm_sample(f"s{n}", [replies[n % 6], replies[(n + 1) % 6], replies[(n + 3) % 6]][:2 + n % 2])
               for n in range(7)]                                   # K = 2 and K = 3 mixed
    write_jsonl(str(tmp_path / "in.jsonl"), samples)
    one = rescore.rescore_file(oa_checkpoint[0], str(tmp_path / "in.jsonl"), str(tmp_path / "one.jsonl"), batch_size=2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "rescore.py", "--reward-model", oa_checkpoint[0], "--data", str(tmp_path / "in.jsonl"),
                          "--out", str(tmp_path / "two.jsonl"), "--batch-size", "2"],
                         cwd=os.path.dirname(os.path.abspath(rescore.__file__)), env=env, capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = data.read_samples(str(tmp_path / "one.jsonl")), data.read_samples(str(tmp_path / "two.jsonl"))
    key = lambda s: (s["id"], s["responses"], s["sft_index"])
    assert [key(s) for s in a] == [key(s) for s in b]
    for x, y in zip(a, b):
        assert x["rewards"] == pytest.approx(y["rewards"], abs=1e-5)
    assert f"disagrees with the human order: {one['disagree']:.1%}" in run.stdout and run.stdout.count("wrote") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "one.jsonl", "two.jsonl"]


# ---------------------------------------------------------------------------------------------------------
# evaluate.py: BLEU, stop strings, batched greedy generation, rewards, resume, torchrun
# ---------------------------------------------------------------------------------------------------------

N_NEW = 10                      # max_new_tokens in these tests


# ---- fixtures: demo test samples in two subsets, a tokenizer, a tiny policy and a tiny reward model ------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    paths = demo.make_demo_data(str(tmp / "raw"), n_train=40, n_test=12, seed=1)
    samples, _ = read_hh_rlhf(paths["test"], "harmless-base", "test")
    train_samples, _ = read_hh_rlhf(paths["train"], "x", "train")
    tokenizer = demo.train_tokenizer([s["prompt"] + " " + r for s in samples + train_samples for r in s["responses"]],
                                     str(tmp / "tok"), vocab_size=400)
    samples[0]["responses"].append("I do not know.")                    # one prompt ranks K = 3 responses
    files = []
    for subset, part in (("harmless-base", samples[:5]), ("helpful-base", samples[5:])):
        for n, s in enumerate(part):
            s.update(id=f"{subset}/test/{n}", subset=subset)
        files.append(str(tmp / f"{subset}.jsonl"))
        write_jsonl(files[-1], part)
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3, initializer_range=0.3)   # wide weights: peaked, varied greedy output
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(**config)).eval()
    reward_model = LlamaForSequenceClassification(LlamaConfig(**config, num_labels=1)).eval()
    for name, model in (("policy", policy), ("rm", reward_model)):
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    return {"tmp": tmp, "files": files, "samples": [s for f in files for s in data.read_samples(f)],
            "tokenizer": tokenizer, "policy": policy, "policy_dir": str(tmp / "policy"), "rm_dir": str(tmp / "rm")}


def run_eval(env, out, **settings):
    """evaluate.py's protocol in this process, on the env fixture."""
    return evaluate.evaluate(evaluate.Config(**{"model": env["policy_dir"], "reward_model": env["rm_dir"],
                                                "data": env["files"], "out": out, "batch_size": 3,
                                                "max_new_tokens": N_NEW, "max_prompt_len": 48, **settings}))


@pytest.fixture(scope="module")
def full_run(env):
    """One single-process run of the whole protocol."""
    out = str(env["tmp"] / "run1")
    return out, run_eval(env, out)


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for subset in a:
        assert a[subset] == pytest.approx(b[subset], abs=1e-4), subset


def read_text(path):
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


# ---- BLEU and stop strings -----------------------------------------------------------------------------------

def test_sentence_bleu_hand_computed():
    assert evaluate.sentence_bleu("the cat sat", "the cat sat") == 1.0          # all p_n = 1, c = r: BP = 1
    assert evaluate.sentence_bleu("abcxyz", "abcdef") == 0.0                    # 4-grams abcx bcxy cxyz: none shared
    assert evaluate.sentence_bleu("", "abc") == 0.0                             # c = 0
    assert evaluate.sentence_bleu("abc", "abc") == 0.0                          # no 4-gram at all: p_4 = 0 / max(1, 0)
    # "abcd" vs "abcde": p_1..p_4 = 4/4, 3/3, 2/2, 1/1; c = 4 < r = 5: BP = exp(1 - 5/4)
    assert evaluate.sentence_bleu("abcd", "abcde") == pytest.approx(math.exp(-0.25))
    # "abcdx" vs "abcdefg": unigrams a b c d x -> 4/5; ab bc cd dx -> 3/4; abc bcd cdx -> 2/3; abcd bcdx -> 1/2
    # geometric mean (4/5 * 3/4 * 2/3 * 1/2)^(1/4) = (1/5)^(1/4); c = 5 < r = 7: BP = exp(1 - 7/5) = 0.670320
    assert evaluate.sentence_bleu("abcdx", "abcdefg") == pytest.approx(0.2 ** 0.25 * math.exp(-0.4))   # 0.448266
    # clipping: "ababab" vs "ababx" (c = 6 > r = 5, BP = 1): a x3, b x3 clipped to 2 + 2 -> 4/6;
    # ab x3 -> 2, ba x2 -> 1: 3/5; aba x2 -> 1, bab x2 -> 1: 2/4; abab x2 -> 1, baba -> 0: 1/3
    assert evaluate.sentence_bleu("ababab", "ababx") == pytest.approx((4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_cut_at_stop():
    assert evaluate.cut_at_stop(" Sure, boil water.\n\nHuman: and then?") == "Sure, boil water."
    assert evaluate.cut_at_stop("a assistant: b Human: c") == "a"               # the first stop string wins
    assert evaluate.cut_at_stop("Human: hi") == ""
    assert evaluate.cut_at_stop("  no stop here \n") == "no stop here"
    assert evaluate.cut_at_stop("human being: fine") == "human being: fine"      # only the exact strings stop


# ---- prompts, generation, teacher forcing ------------------------------------------------------------------------

def test_prompts_truncated_left_and_padded_left(env):
    tok = env["tokenizer"]
    long, short = "\n\nHuman: How do I make tea?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"
    ids_long, ids_short = (tok(p, add_special_tokens=False)["input_ids"] for p in (long, short))
    input_ids, mask = evaluate.left_padded(tok, [long], 5)
    assert input_ids.tolist() == [[1] + ids_long[-4:]] and mask.tolist() == [[1] * 5]   # BOS + the last 4 tokens
    input_ids, mask = evaluate.left_padded(tok, [long, short], 384)
    pad = len(ids_long) - len(ids_short)
    assert input_ids.tolist() == [[1] + ids_long, [3] * pad + [1] + ids_short]
    assert mask.tolist() == [[1] * (len(ids_long) + 1), [0] * pad + [1] * (len(ids_short) + 1)]


def greedy_by_hand(model, tokenizer, prompt, max_prompt_len, n_new):
    """Greedy decoding without the KV cache or padding: the whole sequence through the model at every step."""
    ids = [1] + tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_prompt_len - 1):]   # 1 = BOS
    new = []
    with torch.no_grad():
        for _ in range(n_new):
            token = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return evaluate.cut_at_stop(tokenizer.decode(new))


def test_batched_generation_equals_one_at_a_time(env):
    model, tok = env["policy"], env["tokenizer"]
    prompts = [s["prompt"] for s in env["samples"][:7]]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 2                 # padding really happens
    batched = generate(model, tok, prompts, max_new_tokens=N_NEW, max_prompt_len=48, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=N_NEW, max_prompt_len=48)[0] for p in prompts]
    assert batched == single
    assert len(set(batched)) > 3                                              # the prompts matter
    # and both equal a plain greedy loop on the prompt cut to its last 12 tokens
    cut = generate(model, tok, prompts[:3], max_new_tokens=N_NEW, max_prompt_len=12, batch_size=3)
    assert cut == [greedy_by_hand(model, tok, p, 12, N_NEW) for p in prompts[:3]]


def test_pairwise_accuracy_matches_per_sequence_log_softmax(env):
    model, tok, samples = env["policy"], env["tokenizer"], env["samples"]
    correct = pairs = 0
    with torch.no_grad():
        for s in samples:
            prompt = [1] + tok(s["prompt"], add_special_tokens=False)["input_ids"][-384:]
            p = []
            for response in s["responses"]:                                   # Eq. 3, one sequence at a time
                target = tok(response, add_special_tokens=False)["input_ids"] + [2]
                logprobs = model(torch.tensor([prompt + target])).logits[0].log_softmax(-1)
                p.append(sum(logprobs[len(prompt) + t - 1, y].item() for t, y in enumerate(target)) / len(target))
            correct += sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p)))
            pairs += len(p) * (len(p) - 1) // 2
    assert pairs == len(samples) + 2                                          # the K = 3 sample has 3 pairs
    accuracy = pairwise_accuracy(model, tok, samples, batch_size=3)
    assert accuracy == pytest.approx(correct / pairs)
    assert 0 < accuracy < 1                                                   # a random model gets some of each


def test_summarize_and_table_hand_computed(tmp_path):
    rec = lambda subset, reward, bleu, text, correct, pairs: dict(subset=subset, reward=reward, bleu=bleu,
                                                                 generation=text, pairs_correct=correct, pairs=pairs)
    records = [rec("A", 0.0, 0.5, "x", 1, 1), rec("A", math.log(3), 0.1, "", 0, 1),    # sigmoid: 1/2, 3/4
               rec("B", -math.log(3), 0.0, "y", 2, 3)]                                # sigmoid: 1/4
    results = evaluate.summarize(records, ["A", "B"])
    assert results["A"] == pytest.approx({"n": 2, "bleu": 30.0, "reward": 62.5, "pair_acc": 50.0, "empty": 1})
    assert results["B"] == pytest.approx({"n": 1, "bleu": 0.0, "reward": 25.0, "pair_acc": 200 / 3, "empty": 0})
    # Total pools the samples: reward (1/2 + 3/4 + 1/4) / 3 = 50, not the mean of the subsets' 62.5 and 25
    assert results["Total"] == pytest.approx({"n": 3, "bleu": 20.0, "reward": 50.0, "pair_acc": 60.0, "empty": 1})
    table = evaluate.format_table([("run", results)]).split("\n")
    assert table[0] == "| Method | A BLEU | A Reward | B BLEU | B Reward | Total BLEU | Total Reward |"
    assert table[2] == "| run | 30.00 | 62.50 | 0.00 | 25.00 | 20.00 | 50.00 |"
    (tmp_path / "rank0.jsonl").write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n{"id": "d", "to')
    with pytest.raises(ValueError, match="rank0.jsonl:2"):                     # a broken line before the last
        files.read_parts([str(tmp_path / "rank0.jsonl")])
    (tmp_path / "rank0.jsonl").write_text('{"id": "a"}\n{"id": "c"}\n{"id": "d", "to')
    assert list(files.read_parts([str(tmp_path / "rank0.jsonl")])) == ["a", "c"]   # a torn last line is skipped


# ---- the whole protocol ------------------------------------------------------------------------------------------

def test_rewards_and_records(env, full_run):
    import rescore
    out, results = full_run
    records = [json.loads(line) for line in read_text(os.path.join(out, "generations.jsonl")).split("\n")[:-1]]
    assert [r["id"] for r in records] == [s["id"] for s in env["samples"]]
    generations = generate(env["policy"], env["tokenizer"], [s["prompt"] for s in env["samples"]],
                                    max_new_tokens=N_NEW, max_prompt_len=48)
    assert [r["generation"] for r in records] == generations
    # the reward model called directly on rescore.py's text, one unpadded sequence at a time
    rm, rm_tok, format_fn = rescore.load_reward_model(env["rm_dir"])
    with torch.no_grad():
        scores = [rm(**rm_tok(format_fn(s["prompt"], g), add_special_tokens=False, return_tensors="pt"))
                  .logits[0, 0].item()
                  for s, g in zip(env["samples"], generations)]
    assert [r["reward"] for r in records] == pytest.approx(scores, abs=1e-4)
    for subset, idx in (("harmless-base", range(0, 5)), ("helpful-base", range(5, 12)), ("Total", range(12))):
        assert results[subset]["n"] == len(idx)
        assert results[subset]["reward"] == pytest.approx(100 * sum(1 / (1 + math.exp(-scores[i])) for i in idx)
                                                          / len(idx), abs=1e-3)
        assert results[subset]["empty"] == sum(generations[i] == "" for i in idx)
    assert_same_results(json.loads(read_text(os.path.join(out, "results.json"))), results)
    assert "| harmless-base BLEU | harmless-base Reward | helpful-base BLEU" in read_text(os.path.join(out, "table.md"))


def test_resume_after_interrupt_yields_every_prompt_once(env, full_run):
    out1, results = full_run
    out = str(env["tmp"] / "resumed")
    os.makedirs(os.path.join(out, "parts"))
    shutil.copy(os.path.join(out1, "settings.json"), out)
    lines = read_text(os.path.join(out1, "parts", "rank0.jsonl")).split("\n")
    with open(os.path.join(out, "parts", "rank0.jsonl"), "w", encoding="utf-8") as f:   # 4 lines, a torn fifth
        f.write("\n".join(lines[:4]) + "\n" + lines[4][:25])
    resumed = run_eval(env, out)
    part = [json.loads(line) for line in read_text(os.path.join(out, "parts", "rank0.jsonl")).split("\n")[:-1]]
    assert sorted(r["id"] for r in part) == sorted(s["id"] for s in env["samples"])   # each once, none lost
    assert_same_results(resumed, results)
    with pytest.raises(UserError, match=f"--max-new-tokens {N_NEW}, not {N_NEW + 1}"):   # others: a new --out
        run_eval(env, out, max_new_tokens=N_NEW + 1)


def test_torchrun_two_processes_equal_one(env, full_run, monkeypatch, capsys):
    out1, results = full_run
    out2 = str(env["tmp"] / "run2")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "evaluate.py"), "--model", env["policy_dir"], "--reward-model", env["rm_dir"],
               "--data", *env["files"], "--out", out2, "--batch-size", "3", "--max-new-tokens", str(N_NEW),
               "--max-prompt-len", "48"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(out2, "parts"))) == ["rank0.jsonl", "rank1.jsonl"]
    table = read_text(os.path.join(out2, "table.md"))
    assert table.replace("| run2 |", "| run1 |") == read_text(os.path.join(out1, "table.md"))   # rows named by --out
    assert table in run.stdout                                                # printed too
    assert_same_results(json.loads(read_text(os.path.join(out2, "results.json"))), results)
    # --compare: one row per run
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--compare", out1, out2])
    evaluate.main()
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].startswith(f"| {out1} |") and rows[3].startswith(f"| {out2} |")


# ---------------------------------------------------------------------------------------------------------
# benchmark.py: the named architectures, MFU, the GPU suite; --cpu-offload and --compile applied
# ---------------------------------------------------------------------------------------------------------

def test_architectures_and_mfu_by_hand():
    from transformers import LlamaConfig
    # parameter counts published for the models these configs copy, counted on the meta device (no memory)
    seven_b, one_b = (LlamaConfig(**benchmark.ARCHS[a]) for a in ("llama-7b", "llama-1b"))
    assert benchmark.matmul_params(seven_b) == (6_738_415_616, 6_738_415_616 - 32_000 * 4_096)   # embedding: lookup
    assert benchmark.matmul_params(one_b) == (1_235_814_400, 1_235_814_400)      # tied: multiplied in the head
    # 6 N + 12 L d T at T = 512: 6 x 6,607,343,616 + 12 x 32 x 4,096 x 512 = 39,644,061,696 + 805,306,368
    assert benchmark.flops_per_token(seven_b, 512) == 40_449_368_064
    # CLHA's LM head (32,000 x 4,096) on half the positions: 6 x 131,072,000 / 2 fewer
    assert benchmark.flops_per_token(seven_b, 512, head_share=0.5) == 40_449_368_064 - 393_216_000
    assert benchmark.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert benchmark.peak_flops("NVIDIA H100 PCIe") == 756e12 and benchmark.peak_flops("NVIDIA H200") == 989e12
    assert benchmark.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and benchmark.peak_flops("cpu") is None
    assert benchmark.peak_flops("NVIDIA H100 80GB HBM3", override_tflops=500) == 500e12
    # MFU of 3,000 tokens/s on one H100 at 7B: 40.45e9 x 3,000 / 989e12 = 12.27%
    assert 40_449_368_064 * 3000 / benchmark.peak_flops("H100") == pytest.approx(0.12270, abs=1e-5)


def test_gpu_suite_needs_a_gpu(capsys):
    with pytest.raises(SystemExit) as exit:
        flags.run(benchmark.main, ["--suite"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err == ("error: --suite needs a CUDA GPU (torch.cuda.is_available() is False); "
                                            "for a CPU smoke test run: python tools/benchmark.py --arch llama-tiny\n")


def test_random_init_offload_and_compile_are_applied(one_process):
    """What benchmark.py builds without a checkpoint, and what --cpu-offload and --compile change in the model."""
    from torch.distributed.fsdp import CPUOffloadPolicy
    from transformers import LlamaConfig
    rank, _, device = one_process
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.02)
    cfg = train.Config(model="none", cpu_offload=True, compile=True)
    model = train.build_model(cfg, config, device, rank, weights=False)
    layer = model.model.layers[0]
    assert isinstance(layer._get_fsdp_state()._fsdp_param_group.offload_policy, CPUOffloadPolicy)
    assert hasattr(layer.forward.args[0], "_torchdynamo_orig_callable")            # torch.compile'd
    weight = layer.mlp.up_proj.weight.to_local()                                  # random init, not to_empty's bytes
    assert torch.isfinite(weight).all() and 0.015 < weight.std().item() < 0.025
    assert torch.allclose(model.model.rotary_emb.inv_freq, 1 / 10000 ** (torch.arange(0, 8, 2) / 8))


# ---------------------------------------------------------------------------------------------------------
# The quick start: `python train.py` runs demo.py; here a shortened run through the same code path
# ---------------------------------------------------------------------------------------------------------

def test_readme_check_compares_the_printed_table(tmp_path, monkeypatch, capsys):
    rows = {"CLHA (after)": {"GT pair acc": 98.7, "Reward": 81.1}}
    monkeypatch.setattr(demo, "main", lambda argv: rows)                    # the demo's result, without the demo
    readme = tmp_path / "README.md"
    readme.write_text("text\n```\n==== done in 9 s. Held-out prompts (300):\n| model | GT pair acc | Reward |\n"
                      "|---|---|---|\n| CLHA (after) | 98.7 | 81.1 |\n```\nmore text\n")
    demo.check_readme(str(readme))
    assert "the demo table is what python train.py prints, within 2.0" in capsys.readouterr().out
    readme.write_text(readme.read_text().replace("81.1", "79.2"))          # 1.9 apart: within the tolerance
    demo.check_readme(str(readme))
    for changed in ("78.9", "x"):                                          # 2.2 apart; not a number
        readme.write_text(readme.read_text().replace("79.2", changed).replace("78.9", changed))
        with pytest.raises(UserError, match="its demo table is not, within 2.0, what python train.py prints"):
            demo.check_readme(str(readme))
    rows["CLHA (before)"] = rows["CLHA (after)"]                           # a row more
    with pytest.raises(UserError, match="its demo table is not"):
        demo.check_readme(str(readme))


def test_quick_start_demo(tmp_path, capsys):
    args = ["--out", str(tmp_path / "demo"), "--n-train", "480", "--n-test", "80", "--max-steps", "40"]
    rows = demo.main(args)
    before, after = rows["random-init policy (before)"], rows["CLHA (after)"]
    assert after["GT pair acc"] > before["GT pair acc"] + 20          # it learned the known preferences
    printed = capsys.readouterr().out
    assert "| CLHA (after) |" in printed and "4. training CLHA" in printed
    # a second run reuses every stage's output and only prints the table
    assert demo.main(args) == rows
    assert "==== 4." not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# The reader's edition: one-way imports, pieces that copy alone, nothing resting on a library's internals
# ---------------------------------------------------------------------------------------------------------

def our_modules():
    """Every module of ours but the tests: the top-level files and those of harness/ and tools/."""
    return [p for p in glob.glob("*.py", root_dir=ROOT) + glob.glob("harness/*.py", root_dir=ROOT)
            + glob.glob("tools/*.py", root_dir=ROOT) if not os.path.basename(p).startswith(("test_", "conftest"))
            and not p.endswith("__init__.py")]


def our_imports(path, ours):
    """The modules of this project that a file imports, at any depth of its code (a lazy import counts)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found & ours - {path[:-3].replace("/", ".")}


def test_the_import_graph_has_no_circle():
    ours = {p[:-3].replace("/", ".") for p in our_modules()}
    graph = {p[:-3].replace("/", "."): our_imports(p, ours) for p in our_modules()}
    assert graph["clha_loss"] == set() and graph["data"] == {"clha_loss"}      # the pieces that copy alone
    assert "tools.demo" not in graph["train"]                                  # python train.py execs demo.py
    for method in ("clha_loss", "data", "rescore", "train", "evaluate"):       # the method never needs the tools
        assert not {m for m in graph[method] if m.startswith("tools.")}, method
    for harness in (m for m in graph if m.startswith("harness.")):             # nor does the harness need them,
        assert not graph[harness] & {"train", "rescore", "evaluate"} and not any(   # or the method's scripts
            m.startswith("tools.") for m in graph[harness]), harness
    done, visiting = set(), []

    def visit(module):
        assert module not in visiting, " -> ".join(visiting + [module])
        if module not in done:
            visiting.append(module)
            for imported in graph[module]:
                visit(imported)
            visiting.pop()
            done.add(module)
    for module in graph:
        visit(module)


def test_clha_loss_and_data_copy_alone(tokenizer, tmp_path):
    """The two files in an empty folder, with torch and a tokenizer from transformers: a batch in either layout
    and the objective from it, the same numbers both ways."""
    for name in ("clha_loss.py", "data.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    tokenizer.save_pretrained(tmp_path / "tok")
    script = """
import torch, data, clha_loss
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained("tok")
s = {"id": "a", "prompt": "\\n\\nHuman: How do I make tea?\\n\\nAssistant:", "responses": ["Boil water.", "No."],
     "rewards": [5.0, 1.0], "sft_index": 0}
torch.manual_seed(0)
embed, head = torch.nn.Embedding(len(tok), 16), torch.nn.Linear(16, len(tok))
out = []
for share in (False, True):
    batch = data.make_batch(tok, [s], 64, 32, share_prompt=share)
    logits = head(embed(batch["input_ids"]))           # a bigram model: no attention, so no mask to apply
    rows, cols = batch["predict"]
    mean, total = clha_loss.response_logps(logits[rows, cols], batch["targets"], batch["lengths"])
    loss, metrics = clha_loss.clha_objective(mean.view(1, 2), total.view(1, 2), batch["rewards"], batch["sft_index"])
    out.append(loss.item())
assert abs(out[0] - out[1]) < 1e-5, out
print("loss", out[0])
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and run.stdout.startswith("loss "), run.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["clha_loss.py", "data.py"]


def test_buffers_come_from_the_modules_not_from_an_initialiser(tmp_path, one_process):
    """A model whose non-persistent buffer transformers' initialiser does not know (a rotary embedding under
    another name). The old build (to_empty, then _init_weights) trained on uninitialised memory; so does
    from_pretrained in transformers 5.24. The sharded model must equal the model its own __init__ builds."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    class Positions(LlamaRotaryEmbedding):                   # the class name is what _init_weights looks for
        pass

    class PositionsConfig(LlamaConfig):
        model_type = "llama_positions_test"

    class PositionsLlama(LlamaForCausalLM):
        config_class = PositionsConfig

        def __init__(self, config):
            super().__init__(config)
            self.model.rotary_emb = Positions(config)

    AutoConfig.register("llama_positions_test", PositionsConfig, exist_ok=True)
    AutoModelForCausalLM.register(PositionsConfig, PositionsLlama, exist_ok=True)
    config = PositionsConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    eager = PositionsLlama(config).eval()                    # built for real: its buffers are right
    eager.save_pretrained(tmp_path / "model")
    rank, _, device = one_process
    model = train.build_model(train.Config(model=str(tmp_path / "model"), dtype="float32"), config, device, rank)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)
        assert torch.allclose(model(input_ids=ids).logits, eager(input_ids=ids).logits, atol=1e-5, rtol=0)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        assert not torch.equal(loaded.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)   # the finding


def test_the_last_layer_stays_gathered_after_forward(tiny, one_process):
    """Backward starts with the last decoder layer, so it keeps its gathered weights after forward; the others
    free theirs (and the memory they take does not grow with depth)."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig
    rank, _, device = one_process
    model = train.build_model(train.Config(model=tiny["base"], dtype="float32", activation_checkpointing=False),
                              AutoConfig.from_pretrained(tiny["base"]), device, rank)
    model(input_ids=torch.tensor([[1, 5, 6, 7]]))            # forward only, with autograd on
    first, last = model.model.layers[0], model.model.layers[-1]
    assert isinstance(first.mlp.up_proj.weight, DTensor) and not isinstance(last.mlp.up_proj.weight, DTensor)


def test_other_errors_inside_transformers_keep_their_traceback(tmp_path):
    """cli.from_pretrained turns a missing, unreadable or truncated checkpoint into one line; a ValueError raised
    inside transformers while loading a model is not the user's to fix and is not hidden as if it were."""
    (tmp_path / "config.json").write_text("{}")

    class Broken:
        @staticmethod
        def from_pretrained(path, **kwargs):
            raise ValueError("a bug somewhere inside the library")
    with pytest.raises(ValueError, match="a bug somewhere") as raised:
        models.from_pretrained(Broken, str(tmp_path), "--model")
    assert not isinstance(raised.value, UserError)


# ---------------------------------------------------------------------------------------------------------
# logs.py: TensorBoard and W&B get the scalars of log.jsonl; the picture of runs
# ---------------------------------------------------------------------------------------------------------

def wandb_records(path):
    """The records of an offline W&B run file: W&B writes LevelDB's log format (blocks of 32 KiB, each record in
    chunks with a 7-byte header: checksum, length, type), after a 7-byte ':W&B' header; each record a protobuf."""
    import struct
    from wandb.proto import wandb_internal_pb2
    raw, block, pos, chunks = open(path, "rb").read(), 32768, 7, b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:                                # a block's tail too short for a header
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunks, pos = chunks + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                                         # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def logged_scalars(out):
    """{(split/name, step): value} of every number in log.jsonl, as logs.RunLog hands them to the loggers."""
    scalars = {}
    for r in map(json.loads, open(os.path.join(out, "log.jsonl"))):
        split = r.get("split", "train")
        for k, v in r.items():
            if isinstance(v, (int, float)) and k != "step":
                scalars[f"{split}/{k}", r["step"]] = v
        for i, v in enumerate(r.get("logp_rank", [])):
            scalars[f"{split}/logp_rank{i}", r["step"]] = v
    return scalars


def test_tensorboard_and_wandb_get_the_scalars_of_log_jsonl(tiny, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="pip install tensorboard to test --tensorboard (.ci/run does)")
    pytest.importorskip("wandb", reason="pip install wandb to test --wandb (.ci/run does)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(train_args(tiny, out, "--dev", tiny["dev"], "--max-steps", "3", "--eval-every", "2", "--dtype",
                          "float32", "--tensorboard", "--wandb", "clha-test"))
    want = logged_scalars(out)
    assert ("dev/acc", 2) in want and ("train/loss_rank", 3) in want and ("train/logp_rank1", 1) in want
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in want.items())      # stored as float32
    [run_file] = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    logged = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            logged |= {(k, items["_step"]): v for k, v in items.items() if not k.startswith("_")}
    assert logged == pytest.approx(want)


def test_a_missing_logger_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    for flag, module, extra in (("--tensorboard", "torch.utils.tensorboard", []), ("--wandb", "wandb", ["p"])):
        monkeypatch.setitem(sys.modules, module, None)          # as if it were not installed
        with pytest.raises(SystemExit):
            flags.run(train.main, train_args(tiny, tmp_path / "run", flag, *extra))
        assert capsys.readouterr().err == f"error: {flag} needs {flag[2:]}: pip install {flag[2:]}\n"
    assert not (tmp_path / "run" / "log.jsonl").exists()        # found before training


def test_the_plot_of_runs_is_a_png(tiny, two_rank_run, tmp_path):
    pytest.importorskip("matplotlib", reason="pip install matplotlib to test the plot (.ci/run does)")
    from tools import plot as logs_
    out = tmp_path / "curves.png"
    logs_.main(["--plot", str(two_rank_run), str(two_rank_run), "--names", "a", "b", "--out", str(out)])
    png = out.read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (1280, 560) and len(png) > 20_000
    with pytest.raises(UserError, match="--names: 1 names for 2 runs"):
        logs_.main(["--plot", str(two_rank_run), str(two_rank_run), "--names", "a"])


def test_the_step_lifts_with_the_files_it_names(tiny, tmp_path):
    """train.py's build_model, apply_fsdp and clha_step, in an empty folder with what train.py imports
    (data.py, clha_loss.py and harness/) and nothing else: one step of a tiny model under a process
    group of one, which moves its weights."""
    for name in ("train.py", "data.py", "clha_loss.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "harness"), tmp_path / "harness")
    script = f"""
import torch, data, train
from transformers import AutoConfig, AutoTokenizer
rank, world, device = train.init_distributed()
cfg = train.Config(model={tiny["base"]!r}, dtype="float32", max_len=128, max_prompt_len=64, lr=1e-2)
model = train.build_model(cfg, AutoConfig.from_pretrained(cfg.model), device, rank)
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
before = model.lm_head.weight.full_tensor().clone()
samples = data.read_samples({tiny["train"]!r})[:4]
batches = [train.batch_of(cfg, AutoTokenizer.from_pretrained(cfg.model), samples)]
sums, grad_norm, applied, stop = train.clha_step(cfg, model, optimizer, batches, cfg.lr, 0, device)
assert applied and stop == 0 and not torch.equal(before, model.lm_head.weight.full_tensor())
print("loss", sums[0] / 4)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and "loss " in run.stdout, run.stderr[-3000:]


def test_every_link_of_the_readme_and_docs_resolves():
    """Relative links of README.md and docs/*.md name files of the repository (anchors and web
    addresses aside), and the paper-to-code table is within the README's first 100 lines."""
    import re
    pages = ["README.md"] + sorted(glob.glob("docs/*.md", root_dir=ROOT))
    for page in pages:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{page}: {target}"
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(readme) <= 250 and any(line.startswith("| Eq. 7") for line in readme[:100])
