"""Shared test fixtures: the tokenizer families readers bring, each trained offline in a second.

    sp              SentencePiece BPE with a dummy prefix and byte fallback, BOS added (LLaMA-1/2, Mistral)
    bpe             byte-level BPE, GPT-2's split, no BOS at all (GPT-NeoX/Pythia, Qwen2)
    bpe_bos         byte-level BPE, Llama-3's split, <|begin_of_text|> added by the tokenizer (Llama-3)
    bpe_unused_bos  byte-level BPE with a bos_token that the tokenizer never adds (SmolLM2)
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import data
from harness import flags
from harness.files import write_jsonl
from tools import demo
from tools.prepare_hh_rlhf import read_hh_rlhf

os.environ["CUDA_VISIBLE_DEVICES"] = ""       # the tests run on the CPU, on any machine, in subprocesses too

FAMILIES = ("sp", "bpe", "bpe_bos", "bpe_unused_bos")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def training_texts(folder):
    """Demo dialogues plus some of every kind of character, so that no tokenizer needs to fall back on bytes."""
    paths = demo.make_demo_data(os.path.join(folder, "raw"), n_train=600, n_test=10)
    samples, _ = read_hh_rlhf(paths["train"])
    return [s["prompt"] + " " + r for s in samples for r in s["responses"]] + ["Ünïcödé — “quotes” 日本語 🙂"] * 5


def byte_level_bpe(texts, folder, split, bos=None, add_bos=False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>"] + ([bos] if bos else [])
    bpe = Tokenizer(models.BPE())
    if split == "gpt2":
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:                                                           # Llama-3: its regex, then bytes
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token=bos)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tokenizer(family, texts, folder):
    """A tokenizer of `family`, saved in HF format in `folder` and loaded back from there, as a user's would be."""
    from transformers import AutoTokenizer
    if family == "sp":
        demo.train_tokenizer(texts, folder, vocab_size=700)
    elif family == "bpe":
        byte_level_bpe(texts, folder, "gpt2")
    elif family == "bpe_bos":
        byte_level_bpe(texts, folder, "llama3", bos="<|begin_of_text|>", add_bos=True)
    else:
        byte_level_bpe(texts, folder, "gpt2", bos="<|im_start|>")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """{family: tokenizer} for every family of FAMILIES, and "dir": a folder for the tests' files."""
    folder = tmp_path_factory.mktemp("tokenizers")
    texts = training_texts(str(folder))
    return {"dir": folder} | {family: make_tokenizer(family, texts, str(folder / family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A LLaMA-style SentencePiece tokenizer trained offline on the demo data (bos 1, eos 2, pad 3)."""
    folder = tmp_path_factory.mktemp("tokenizer")
    paths = demo.make_demo_data(str(folder / "raw"), n_train=600, n_test=10)
    samples, _ = read_hh_rlhf(paths["train"])
    return demo.train_tokenizer([s["prompt"] + " " + r for s in samples for r in s["responses"]],
                                str(folder / "tok"), vocab_size=600)


def ranked(samples):
    """The demo's known quality as rewards (0, 1, 2 -> -3, 1, 5: every pair 4 apart), best first, as rescore.py
    would write them."""
    out = []
    for s in samples:
        rewards = [4.0 * demo.demo_quality(s["prompt"], r) - 3.0 for r in s["responses"]]
        order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        out.append(dict(s, responses=[s["responses"][i] for i in order], rewards=[rewards[i] for i in order]))
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, tokenizer):
    """A tiny random LLaMA saved in HF format with the test tokenizer, and rescored demo train/dev files."""
    folder = tmp_path_factory.mktemp("tiny")
    paths = demo.make_demo_data(str(folder / "raw"), n_train=400, n_test=60, tie=0.0, flip=0.0, seed=1)
    train_samples = ranked(read_hh_rlhf(paths["train"])[0])
    dev_samples = ranked(read_hh_rlhf(paths["test"])[0])
    write_jsonl(str(folder / "train.jsonl"), train_samples)
    write_jsonl(str(folder / "dev.jsonl"), dev_samples)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(str(folder / "base"))
    tokenizer.save_pretrained(str(folder / "base"))
    return {"dir": folder, "base": str(folder / "base"), "train": str(folder / "train.jsonl"),
            "dev": str(folder / "dev.jsonl"), "dev_samples": dev_samples}


def train_args(tiny, out, *extra):
    """train.py's flags for a short run on the tiny fixture: 8 prompts per step, a checkpoint every 3 steps."""
    return ["--model", tiny["base"], "--train", tiny["train"], "--out", str(out), "--global-batch", "8",
            "--batch-size", "2", "--epochs", "1", "--lr", "2e-3", "--log-every", "1", "--save-every", "3",
            "--max-len", "128", "--max-prompt-len", "64", *extra]


def generate(model, tokenizer, prompts, max_new_tokens=128, max_prompt_len=384, batch_size=8):
    """Greedy replies to `prompts` in input order, through evaluate.py's batched loop (what the protocol writes)."""
    import evaluate
    texts = {}
    for idx, batch in evaluate.generate_batches(model, tokenizer, prompts, max_new_tokens, max_prompt_len, batch_size):
        texts.update(zip(idx, batch))
    return [texts[i] for i in range(len(prompts))]


def pairwise_accuracy(model, tokenizer, samples, batch_size=4, max_len=512, max_prompt_len=384, share_prompt=True):
    """Share of the pairs i < j (i the better response) in which the policy gives i the higher p_i (Eq. 3)."""
    import evaluate
    pairs = sum(len(s["responses"]) * (len(s["responses"]) - 1) // 2 for s in samples)
    return sum(evaluate.pair_counts(model, tokenizer, samples, batch_size, max_len, max_prompt_len,
                                    share_prompt)) / pairs


# ---- train.py under torchrun ------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))


def torchrun(nproc, args, env=None, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.join(ROOT, "train.py"), *args]
    if popen:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
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
    """step -> loss from log.jsonl; a resumed run must not have logged a step twice."""
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "split" not in r]
    assert len({r["step"] for r in steps}) == len(steps), [r["step"] for r in steps]
    return {r["step"]: r["loss"] for r in steps}


@pytest.fixture(scope="session")
def two_rank_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "run"
    torchrun(2, train_args(tiny, out, "--max-steps", "9", "--dtype", "float32"))
    return out


@pytest.fixture(scope="session")
def finished(tiny, tmp_path_factory):
    """A finished 6-step run (checkpoints at 3 and 6), one process, and a copy of its exported weights."""
    import train
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32"))
    return out, load_file(str(out / "final" / "model.safetensors"))


def one_line_error(capsys, main, argv, pattern):
    """main(argv) as its command line runs it: exit status 2 and exactly one line on stderr, matching `pattern`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        flags.run(main, argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(pattern, err), err
    return err


def master_weights(out, step):
    """The fp32 weights of a sharded checkpoint, consolidated without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(out / "checkpoints" / f"step_{step:07d}"), str(out / "weights.pt"))
    return torch.load(str(out / "weights.pt"))["model"]
