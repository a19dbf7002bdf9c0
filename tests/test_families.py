"""The tokenizer and model families readers bring: tokenization at the prompt/response boundary, and training,
export and reload of LLaMA, Mistral, Qwen2 and GPT-NeoX (tied and untied embeddings) under torchrun. CPU only.

    python -m pytest test_families.py
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Qwen2Config)

import data
from harness import flags, models
from harness.files import write_jsonl
from tools import demo
from tools.prepare_hh_rlhf import read_hh_rlhf
import evaluate
import train
from conftest import FAMILIES, ranked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
HH_TEST = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base", "test.jsonl.gz")
PROMPT = "\n\nHuman: Hi there!\n\nAssistant: Hello!\n\nHuman: How do I make tea? 🍵\n\nAssistant:"
RESPONSES = ["Sure! First boil some water.\n\n1. Steep.\n2. Enjoy “slowly”.", "No.", "日本語で? Okay.", "42 cups"]


# ---- tokenization: the ids are the tokenizer's own encoding of the dialogue text -----------------------------

def expected_rows(tokenizer, prompt, responses):
    """Written from the tokenizer alone: the joined dialogue with the tokenizer's own special tokens, and the
    prompt as the tokenizer encodes it by itself; the response is the rest, then EOS."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    rows = []
    for response in responses:
        joined = tokenizer(prompt + " " + response, add_special_tokens=True)["input_ids"]
        assert joined[:len(prompt_ids)] == prompt_ids          # no token of these families crosses the boundary
        rows.append((prompt_ids, joined[len(prompt_ids):] + [tokenizer.eos_token_id]))
    return rows


def check_sample(tokenizer, sample):
    rows = data.encode_sample(tokenizer, sample, max_len=100_000, max_prompt_len=50_000)
    assert rows == expected_rows(tokenizer, sample["prompt"], sample["responses"]), sample["id"]
    generation_prompt = evaluate.left_padded(tokenizer, [sample["prompt"]], 50_000)[0][0].tolist()
    assert generation_prompt == rows[0][0]                     # generation starts where the training prompt ends
    for (_, response_ids), response in zip(rows, sample["responses"]):
        assert tokenizer.decode(response_ids[:-1]).strip() == response      # the response's tokens, whole


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_the_tokenizers_own_encoding(tokenizers, family):
    tokenizer = tokenizers[family]
    check_sample(tokenizer, {"id": "hand-made", "prompt": PROMPT, "responses": RESPONSES})
    for sample in read_hh_rlhf(demo.make_demo_data(str(tokenizers["dir"] / "demo"), 50, 4)["train"])[0]:
        check_sample(tokenizer, sample)
    # the bug this replaces: a byte-level reply tokenized alone starts glued to the prompt ('Sure' after ':')
    first = tokenizer.convert_ids_to_tokens(data.encode_sample(tokenizer, {"prompt": PROMPT, "responses": RESPONSES})
                                            [0][1][0])
    assert first == {"sp": "▁Sure"}.get(family, "ĠSure")
    # special tokens: BOS where the tokenizer adds one itself, never a bos_token it does not add (SmolLM2)
    assert data.special_prefix(tokenizer) == ([tokenizer.bos_token_id] if family in ("sp", "bpe_bos") else [])


@pytest.mark.skipif(not os.path.exists(HH_TEST), reason=f"real HH-RLHF data not found at {HH_TEST}")
@pytest.mark.parametrize("family", FAMILIES)
def test_real_dialogues_tokenize_as_the_joined_text(tokenizers, family):
    samples, _ = read_hh_rlhf(HH_TEST)
    for sample in samples[::3]:                                # every third: 768 dialogues, 1,536 replies
        check_sample(tokenizers[family], sample)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_and_eos(tokenizers, family):
    tokenizer = tokenizers[family]
    prefix, eos = data.special_prefix(tokenizer), tokenizer.eos_token_id
    plain_prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    whole = tokenizer(PROMPT + " " + RESPONSES[0], add_special_tokens=False)["input_ids"][len(plain_prompt):]
    sample = {"prompt": PROMPT, "responses": RESPONSES[:2]}
    # the prompt is cut from the left, special tokens counted: its end, where the reply starts, survives
    (prompt_ids, response_ids), _ = data.encode_sample(tokenizer, sample, max_len=200, max_prompt_len=6)
    assert prompt_ids == prefix + plain_prompt[-(6 - len(prefix)):] and response_ids == whole + [eos]
    assert data.encode_prompt(tokenizer, PROMPT, 6) == prompt_ids
    # a response that fits with its EOS keeps it; one that fits without it, or is cut, ends without EOS
    for room, expected in ((len(whole) + 1, whole + [eos]), (len(whole), whole), (len(whole) - 3, whole[:-3])):
        (prompt_ids, response_ids), _ = data.encode_sample(tokenizer, sample, 6 + room, 6)
        assert response_ids == expected, room


def crossing_tokenizer(tokenizers):
    """A byte-level BPE without pre-tokenization: it merges across spaces, so tokens cross the prompt/reply boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from conftest import training_texts
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(training_texts(str(tokenizers["dir"] / "merged")), trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def test_a_token_across_the_boundary_belongs_to_the_response(tokenizers):
    """A byte-level BPE without pre-tokenization merges across spaces ('?ĊĊAssistant:ĠSure'): that token is the
    response's, and generation starts where the training prompt ends, not after the prompt's own last token."""
    tokenizer = crossing_tokenizer(tokenizers)
    prompt = "\n\nHuman: How do I make tea?\n\nAssistant:"
    (prompt_ids, response_ids), _ = data.encode_sample(tokenizer, {"prompt": prompt, "responses": ["Sure!", "No."]})
    crossing = tokenizer.convert_ids_to_tokens(response_ids[0])
    assert crossing.startswith("?ĊĊAssistant:Ġ")               # the premise: this token crosses the boundary
    joined = tokenizer(prompt + " Sure!")["input_ids"]
    assert prompt_ids + response_ids == joined + [tokenizer.eos_token_id]
    assert tokenizer.decode(prompt_ids) + tokenizer.decode(response_ids[:1]) == prompt + " " + crossing[-4:]
    assert data.encode_prompt(tokenizer, prompt, 384) == prompt_ids


# ---- the model families: train under torchrun, export, reload ----------------------------------------------

MODELS = {   # family -> (config class, tokenizer family, tied embeddings)
    "llama": (LlamaConfig, "sp", False),                       # LLaMA-1/2
    "mistral": (MistralConfig, "bpe_bos", False),
    "qwen2": (Qwen2Config, "bpe", True),                       # no BOS at all
    "gpt_neox": (GPTNeoXConfig, "bpe_unused_bos", False),      # Pythia: bos_token <|endoftext|>, never added
    "smollm2": (LlamaConfig, "bpe_unused_bos", True),          # LLaMA with tied embeddings and no BOS
}
BFLOAT16 = {"qwen2"}                                           # saved in bf16, so exported in bf16
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


@pytest.fixture(scope="module")
def family_data(tokenizers):
    folder = tokenizers["dir"] / "family_data"
    paths = demo.make_demo_data(str(folder), n_train=48, n_test=8, flip=0, tie=0, seed=3)
    for split in ("train", "test"):
        write_jsonl(str(folder / f"{split}.rm.jsonl"), ranked(read_hh_rlhf(paths[split])[0]))
    return {"train": str(folder / "train.rm.jsonl"), "dev": str(folder / "test.rm.jsonl")}


def save_base(family, tokenizers, folder):
    config_class, tokenizer_family, tied = MODELS[family]
    tokenizer = tokenizers[tokenizer_family]
    kv = {} if config_class is GPTNeoXConfig else {"num_key_value_heads": 2}
    config = config_class(vocab_size=len(tokenizer), tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=data.pad_id(tokenizer), **SIZE, **kv)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    (model.to(torch.bfloat16) if family in BFLOAT16 else model).save_pretrained(folder)   # Qwen2.5 ships bf16
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", MODELS)
def test_sharded_model_equals_from_pretrained(family, tokenizers, tmp_path):
    """Each family's meta-device init, FSDP2 sharding and rank-0 broadcast give from_pretrained's logits (this
    catches non-persistent buffers such as rotary inv_freq left as garbage by to_empty)."""
    import torch.distributed as dist
    base = save_base(family, tokenizers, str(tmp_path / "base"))
    rank, _, device = train.init_distributed()
    try:
        cfg = train.Config(model=base, dtype="float32")
        model = train.build_model(cfg, AutoConfig.from_pretrained(base), device, rank)
        ids = torch.tensor([tokenizers[MODELS[family][1]](PROMPT + " " + RESPONSES[0])["input_ids"]])
        with torch.no_grad():
            sharded = model(input_ids=ids).logits
            plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits
        assert torch.allclose(sharded, plain, atol=1e-5, rtol=0), (sharded - plain).abs().max()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def family_runs(tokenizers, family_data, tmp_path_factory):
    """One torchrun of 2 processes that calls train.main once per family (a process group each time): the
    families' runs, without paying the start of torchrun and the imports once per family."""
    folder = tmp_path_factory.mktemp("families")
    runs = {family: (save_base(family, tokenizers, str(folder / family / "base")), folder / family / "run")
            for family in MODELS}
    argvs = [["--model", base, "--train", family_data["train"], "--dev", family_data["dev"], "--out", str(out),
              "--global-batch", "8", "--batch-size", "2", "--max-steps", "3", "--lr", "1e-3", "--max-len", "128",
              "--max-prompt-len", "64", "--dtype", "float32", "--log-every", "1", "--save-every", "3"]
             for base, out in runs.values()]
    (folder / "argvs.json").write_text(json.dumps(argvs))
    # A default process group made again must not meet the last one's keys in torchrun's store: each run gets
    # a store of its own, on a free port that rank 0 finds and hands to rank 1 through a file.
    (folder / "driver.py").write_text(f"""import json, os, socket, sys, time
sys.path.insert(0, {ROOT!r})
import train
os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
for n, argv in enumerate(json.load(open(sys.argv[1]))):
    port_file = os.path.join({str(folder)!r}, f"port{{n}}")
    if os.environ["RANK"] == "0":
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            open(port_file + ".tmp", "w").write(str(free.getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)
    while not os.path.exists(port_file):
        time.sleep(0.05)
    os.environ["MASTER_PORT"] = open(port_file).read()
    train.main(argv)
""")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(folder / "driver.py"), str(folder / "argvs.json")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return runs


@pytest.mark.parametrize("family", MODELS)
def test_train_export_reload(family, tokenizers, family_runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    base, out = family_runs[family]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 3] and records[-1]["split"] == "dev"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    # the export, reloaded as a user would, holds exactly the trained fp32 weights of the last checkpoint
    dcp_to_torch_save(str(out / "checkpoints" / "step_0000003"), str(tmp_path / "weights.pt"))
    trained = torch.load(str(tmp_path / "weights.pt"))["model"]
    exported = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype="auto")
    dtype = torch.bfloat16 if family in BFLOAT16 else torch.float32
    assert exported.dtype == dtype                             # the base checkpoint's dtype
    state = exported.state_dict()
    assert all(torch.equal(state[name], trained[name].to(dtype)) for name in trained)
    before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    assert any(not torch.equal(before[name], trained[name]) for name in trained)       # it trained
    # its logits against the trained head applied by hand to its last hidden state
    head, embedding = exported.get_output_embeddings(), exported.get_input_embeddings()
    assert (head.weight is embedding.weight) == MODELS[family][2]                       # tied stays tied
    names = {id(module): name for name, module in exported.named_modules()}
    head_name, embedding_name = names[id(head)] + ".weight", names[id(embedding)] + ".weight"
    ids = torch.tensor([tokenizers[MODELS[family][1]](PROMPT + " " + RESPONSES[1])["input_ids"]])
    with torch.no_grad():
        hidden = exported.base_model(input_ids=ids).last_hidden_state
        by_hand = hidden @ trained.get(head_name, trained[embedding_name]).to(dtype).T
        assert torch.allclose(exported(input_ids=ids).logits, by_hand, atol=1e-5 if dtype == torch.float32 else 2e-2)


# ---- the shared-prompt layout: Eq. 3 and a CLHA step's gradients, as with one row per candidate ------------------

LONG = "Sure! " + " ".join(f"Step {n}: mix the flour and water, then knead it well." for n in range(12))


def layout_samples(K):
    """Two prompts with K candidates: one whole; one whose prompt is cut from the left and first reply cut at
    max_len (see layout_case). Rewards 4 apart, best first: every pair is kept at reward_gap 3."""
    rewards = [5.0, 1.0, -3.0, -7.0][:K]
    return [{"id": "a", "prompt": PROMPT, "responses": RESPONSES[:K], "rewards": rewards, "sft_index": 0},
            {"id": "b", "prompt": PROMPT * 4, "responses": [LONG] + RESPONSES[1:K], "rewards": rewards, "sft_index": 0}]


def reference_logps(model, rows):
    """Eq. 3 from its definition, one candidate at a time: its tokens alone in a row (no padding, no mask), and
    the mean and sum over its response tokens of log softmax(logits at t - 1)[y_t]."""
    means, sums = [], []
    for prompt, response in rows:
        logprobs = model(input_ids=torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        token = torch.stack([logprobs[len(prompt) + t - 1, y] for t, y in enumerate(response)])
        means.append(token.mean())
        sums.append(token.sum())
    return torch.stack(means), torch.stack(sums)


def layout_case(model, tokenizer, K, max_len=64, max_prompt_len=32, samples=None):
    """Both layouts against the reference: log-probs, and the gradients of one CLHA objective (Eq. 7). In float32
    to 1e-5 plus 2 ulps (a sum of -200 is only known to 1.5e-5 in float32 itself). In float64 to 1e-12, which only
    a rearrangement of the same arithmetic meets; the gradients to 5e-7 where an RMSNorm computes in float32
    whatever the model's dtype (LLaMA's does), to 1e-12 elsewhere (GPT-NeoX)."""
    fp32_inside = any("RMSNorm" in type(m).__name__ for m in model.modules())
    tol, grad_tol = (dict(atol=1e-5, rtol=2e-7),) * 2
    if model.dtype == torch.float64:
        tol, grad_tol = dict(atol=1e-12, rtol=0), dict(atol=5e-7 if fp32_inside else 1e-12, rtol=0)
    from clha_loss import clha_objective
    rows = [row for s in samples or layout_samples(K) for row in data.encode_sample(tokenizer, s, max_len, max_prompt_len)]
    if samples is None:
        assert len(rows[K][0]) == max_prompt_len and len(rows[K][1]) == max_len - max_prompt_len   # both cuts happen
        assert rows[K][1][-1] != tokenizer.eos_token_id and rows[1][1][-1] == tokenizer.eos_token_id
    samples = samples or layout_samples(K)
    rewards, sft_index = torch.tensor([s["rewards"] for s in samples]), torch.zeros(2, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]

    def objective_and_grads(mean, total):
        loss, _ = clha_objective(mean.view(2, K), total.view(2, K), rewards, sft_index)
        return torch.autograd.grad(loss, params)
    want = reference_logps(model, rows)
    want_grads = objective_and_grads(*want)
    # the layouts: packed into one row that the two groups fill exactly, and into rows shorter than the
    # longer group (which gets its own); one row per prompt; one row per candidate
    sizes = [len(shared) + sum(len(ids) for ids, _ in cands) for shared, cands in
             (data.shared_rows(data.encode_sample(tokenizer, s, max_len, max_prompt_len)) for s in samples)]
    layouts = [(True, sum(sizes), 1), (True, max(sizes) - 1, 2), (True, None, 2), (False, None, 2 * K)]
    for share, pack_len, rows in layouts:
        batch = data.make_batch(tokenizer, samples, max_len, max_prompt_len, share, pack_len)
        assert len(batch["input_ids"]) == rows and batch["computed"] == (sum(sizes) if share else batch["tokens"])
        got = data.policy_logps(model, batch)
        for g, w in zip(got, want):
            assert torch.allclose(g.to(w.dtype), w, **tol), (share, pack_len, (g - w).abs().max())
        for g, w in zip(objective_and_grads(*got), want_grads):
            assert torch.allclose(g, w, **grad_tol), (share, pack_len, (g - w).abs().max())


def plain_model(family, tokenizer, attention="sdpa", dtype=torch.float32):
    config_class, _, tied = MODELS[family]
    kv = {} if config_class is GPTNeoXConfig else {"num_key_value_heads": 2}
    config = config_class(vocab_size=len(tokenizer), tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=data.pad_id(tokenizer), **SIZE, **kv)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("tokenizer_family", FAMILIES)
@pytest.mark.parametrize("family", MODELS)
def test_shared_prompt_layout_equals_one_row_per_candidate(family, tokenizer_family, K, dtype, tokenizers):
    tokenizer = tokenizers[tokenizer_family]
    layout_case(plain_model(family, tokenizer, dtype=dtype), tokenizer, K)
    batch = data.make_batch(tokenizer, layout_samples(K), 64, 32, share_prompt=True)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape[:2] == (2, 1)   # one row per prompt
    assert batch["tokens"] == sum(len(p) + len(r) for s in layout_samples(K)
                                  for p, r in data.encode_sample(tokenizer, s, 64, 32))       # counted as B*K rows


def test_a_packed_row_is_the_picture_in_data_py():
    """Two prompts at K = 2 in one row, drawn by hand: prompt a (2 tokens) with candidates of 2 and 1
    tokens, then prompt b (1 token) with candidates of 1 and 2, then padding to 8. A token sees its own
    prompt and, within it, the shared part and its own candidate, causally; positions restart at 0."""
    groups = [([1, 2], [([3, 4], 0), ([5], 0)]), ([6], [([7], 0), ([8, 9], 0)])]
    samples = [{"responses": ["x", "y"], "rewards": [1.0, 0.0], "sft_index": 0}] * 2
    batch = data.collate(groups, samples, pad_id=0, share_prompt=True, pack_len=16)
    picture = """a . . . . . . . . .
                 a a . . . . . . . .
                 a a 1 . . . . . . .
                 a a 1 1 . . . . . .
                 a a . . 2 . . . . .
                 . . . . . b . . . .
                 . . . . . b 1 . . .
                 . . . . . b . 2 . .
                 . . . . . b . 2 2 .
                 . . . . . . . . . p"""
    rows = [line.split() for line in picture.splitlines()]
    sees = batch["attention_mask"][0, 0]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist()[0][:9] == [0, 1, 2, 3, 2, 0, 1, 1, 2]
    for i in range(9):                       # causally; the first prompt's first token sees only itself
        assert [j for j in range(10) if sees[i, j]] == [j for j, c in enumerate(rows[i][:10]) if c != "."]
    assert not sees[9:, :9].any()            # padding sees no real token, and no real token sees it
    assert not sees[:9, 9:].any()
    rows_, cols = batch["predict"]           # each response token's logit: the token before it, or the
    assert cols.tolist() == [1, 2, 1, 5, 5, 7]   # prompt's last for the first (a shared column)
    assert batch["keep"][0, batch["slots"]].tolist() == cols.tolist()


def test_packing_balances_rows_and_gives_a_long_group_its_own():
    assert data.pack([5, 4, 3, 3, 1], 8) == [0, 1, 1, 0, 1]       # 16 tokens: two rows of 8, by hand
    assert data.pack([20, 3, 3], 8) == [0, 1, 1]                  # 20 > 8: alone; the rest together
    assert data.pack([3, 3, 3], 100) == [0, 0, 0]
    assert data.pack([7, 7, 2], 8) == [0, 1, 2]                   # 7 + 2 > 8: three rows
    assert data.pack([6, 6, 2], 8) == [0, 1, 0]


def test_the_official_reduction_sees_the_same_micro_batch_packed(tokenizers):
    """--reduction official averages within a micro-batch: packing keeps a micro-batch's prompts, so the
    objective is the one-row-per-candidate one, to rounding."""
    tokenizer = tokenizers["bpe"]
    model = plain_model("llama", tokenizer)
    samples = layout_samples(3)
    cfg = train.Config(reduction="official", reward_gap=3.0)
    losses = [train.objective(cfg, model, data.make_batch(tokenizer, samples, 64, 32, share, pack_len))[0]
              for share, pack_len in ((False, None), (True, 128), (True, None))]
    assert all(abs(loss.item() - losses[0].item()) < 1e-5 for loss in losses), losses


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_shared_prompt_layout_with_eager_attention(family, tokenizers):
    """Eager attention adds the mask to its scores: a True/False mask would add 1/0, so it gets 0/-inf."""
    tokenizer = tokenizers[MODELS[family][1]]
    layout_case(plain_model(family, tokenizer, attention="eager"), tokenizer, 3)


def merging_tokenizer():
    """A byte-level BPE with two merges and no pre-tokenization: 'Ġx' first, then ':Ġ'. Before a reply that starts
    with 'x' the prompt's ':' stays a prompt token; before any other the token ':Ġ' crosses into the reply, so that
    candidate's prompt part ends one token earlier: the prompt parts of one sample differ."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    merges = [("Ġ", "x"), (":", "Ġ")]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab |= {a + b: len(vocab) + n for n, (a, b) in enumerate(merges)} | {"<|endoftext|>": len(vocab) + len(merges)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.mark.parametrize("max_prompt_len", [200, 32])
def test_shared_prompt_layout_with_a_token_across_the_boundary(max_prompt_len):
    """Prompt parts that differ in their last tokens stay in each candidate's own part; cut from the left (32),
    they differ from their first token on, and nothing is shared at all. Still exactly the one-row result."""
    tokenizer = merging_tokenizer()
    prompt = "\n\nHuman: How do I make tea?\n\nAssistant:"
    samples = [{"id": "a", "prompt": prompt, "responses": ["x marks it", "Sure!", "xylophone"],
                "rewards": [5.0, 1.0, -3.0], "sft_index": 0}] * 2
    encoded = data.encode_sample(tokenizer, samples[0], max_prompt_len + 24, max_prompt_len)
    ends = [tokenizer.convert_ids_to_tokens(p[-1]) for p, _ in encoded]
    assert ends == [":", "t", ":"] and tokenizer.convert_ids_to_tokens(encoded[1][1][0]) == ":Ġ"   # the premise
    shared, candidates = data.shared_rows(encoded)
    assert [own for _, own in candidates] == ([1, 0, 1] if max_prompt_len == 200 else [32, 32, 32])
    for dtype in (torch.float32, torch.float64):
        layout_case(plain_model("llama", tokenizer, dtype=dtype), tokenizer, 3, max_prompt_len + 24, max_prompt_len,
                    samples)


def test_the_shared_layout_is_refused_where_the_attention_would_misread_it(tokenizers, tmp_path, capsys):
    from types import SimpleNamespace
    for impl in ("flash_attention_2", "flex_attention"):
        with pytest.raises(data.UserError, match=rf"--model: its attention \({impl}\) cannot take the shared-prompt "
                                                 r"mask: pass --no-share-prompt"):
            models.check_layout(SimpleNamespace(_attn_implementation=impl), 512)
    # a sliding window shorter than a sequence: through train.py's command line, one line
    tokenizer = tokenizers["bpe_bos"]
    config = MistralConfig(vocab_size=len(tokenizer), sliding_window=64, eos_token_id=tokenizer.eos_token_id,
                           num_key_value_heads=2, **SIZE)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    train_file = tmp_path / "train.jsonl"
    write_jsonl(str(train_file), [dict(s, id=f"{s['id']}{n}") for n in range(4) for s in layout_samples(2)])
    argv = ["--model", str(tmp_path / "mistral"), "--train", str(train_file), "--out", str(tmp_path / "run"),
            "--global-batch", "8", "--max-len", "128", "--max-prompt-len", "64"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        flags.run(train.main, argv)
    assert capsys.readouterr().err == ("error: --model: its sliding window (64) is shorter than --max-len 128, which "
                                       "the shared-prompt mask would not apply: pass --no-share-prompt\n")
