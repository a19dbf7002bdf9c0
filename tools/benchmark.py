"""Benchmarks: a CLHA step in each batch layout next to a bare causal-LM step (train.py's FSDP2
setup), and more.

    python tools/benchmark.py                # CPU smoke test: llama-tiny (19.5M), random weights
    python tools/benchmark.py --lengths SAMPLES --arch smollm2-135m   # on a file's own lengths
    python tools/benchmark.py --suite        # one GPU, < 8 min: end to end, then timings
    python tools/benchmark.py --e2e          # the suite's end-to-end block, on any device
    python tools/benchmark.py --arch llama-1b --max-len 512   # one configuration (or --model PATH)
    torchrun --nproc_per_node 8 tools/benchmark.py --arch llama-7b --variant clha_packed   # 8 GPUs
    python tools/benchmark.py --generate --arch llama-1b   # tokens/s of evaluate.py's greedy loop
    python tools/benchmark.py --padding SAMPLES --model TOKENIZER   # train.py's batches' padding
    python tools/benchmark.py --bookkeeping 160800   # rescore.py's bookkeeping at HH-RLHF's size

A step benchmark runs four variants on the same prompts, each in a fresh process: `clha_packed`
(prompt groups packed into rows of --pack-len, train.py's default), `clha_prompts` (one row per
prompt, --no-pack), `clha_rows` (one row per candidate, --no-share-prompt) and `lm`, what plain SFT
costs: next-token cross-entropy over every token of the one-row-per-candidate batch; --variant runs
one of them in this process. It prints one JSON line each (steps/s, tokens/s per GPU counted as the
B*K sequences' tokens whatever the layout, padding share, step time, MFU, peak allocated and
reserved memory) and a Markdown table with the ratios. Without --lengths the prompts are random
tokens of T in all (B prompts x K candidates, no padding); with --lengths each step draws B prompts
of the file, tokenized with --tokenizer (default: a SentencePiece tokenizer of 8,000 pieces trained
on the file, as the demo makes its own). MFU = model FLOPs per token (6 N + 12 L d T, PaLM's count,
N the matmul parameters, the LM head's counted only where it runs) x tokens/s over the GPU's dense
bf16 peak (PEAK_TFLOPS, or --peak-tflops).

--suite and --e2e run tools/suite.py, with the flags below.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

import data                       # noqa: E402  (after the path above)
import train                      # noqa: E402
from harness import flags, logs, models   # noqa: E402
from harness.files import write_jsonl     # noqa: E402
from harness.flags import opt     # noqa: E402
from harness.models import from_pretrained   # noqa: E402
from tools import suite as gpu_suite   # noqa: E402  (the GPU suite and its end-to-end block)

ARCHS = {   # random-weight LlamaConfigs, so that nothing needs a download
    "llama-tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=2048, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,   # SmolLM2
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,     # Llama-3.2
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,     # LLaMA-1
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=2048, tie_word_embeddings=False),
}
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200 NVL", 835),
               ("H200", 989), ("H800", 989), ("A100", 312), ("A800", 312),   # dense bf16,
               ("L40S", 362)]                                                 # first match
# what each variant computes: (share the prompt, pack the prompts into rows); lm: a bare causal-LM
# step
VARIANTS = {"lm": (False, False), "clha_rows": (False, False), "clha_prompts": (True, False),
            "clha_packed": (True, True)}


@dataclass
class Config:
    arch: str = opt("llama-tiny", "a random-weight architecture (no download): "
                    + " | ".join(ARCHS), choices=list(ARCHS))
    model: str = opt("", "a causal LM checkpoint instead of --arch (its weights are not loaded)")
    lengths: str = opt("", "time the step on this sample file's prompts (data.py format)")
    tokenizer: str = opt("", "--lengths: the tokenizer ('' = --model's, or one trained on the "
                             "file)")
    batch_size: list[int] = opt((2,), "prompts per device per micro-batch (several: a run each)",
                                nargs="+")
    pack_len: int = opt(1024, "tokens per packed row (as train.py)", at_least=8)
    k: int = opt(2, "candidates per prompt (random prompts)", at_least=2)
    max_len: int = opt(256, "T, tokens per sequence (with --lengths: at most, as train.py's "
                            "--max-len)", at_least=8)
    steps: int = opt(5, "timed optimizer steps", at_least=1)
    warmup: int = opt(2, "untimed steps first", at_least=1)
    dtype: str = opt("", "compute dtype ('' = bfloat16 on GPUs, float32 on CPUs, which run bf16 "
                         "slowly)", choices=["", "bfloat16", "float32"])
    activation_checkpointing: bool = opt(True, "as train.py")
    cpu_offload: bool = opt(False, "as train.py")
    compile: bool = opt(False, "as train.py")
    peak_tflops: float = opt(0.0, "the GPU's dense bf16 peak in TFLOP/s for MFU (0 = from "
                                  "PEAK_TFLOPS)", at_least=0)
    variant: str = opt("", "run only this variant, in this process", choices=["", *VARIANTS])
    suite: bool = opt(False, "the GPU suite: every configuration the README's GPU table reports")
    generate: bool = opt(False, "instead: greedy tokens/s of evaluate.py's generation loop")
    new_tokens: int = opt(128, "--generate: tokens per reply", at_least=1)
    padding: str = opt("", "instead: the padding share of this sample file's batches, with "
                           "--model's tokenizer")
    bookkeeping: int = opt(0, "instead: rescore.py's bookkeeping for this many samples, fresh and "
                              "half done", at_least=0)
    suite_budget_s: int = opt(480, "--suite: seconds for all its rows; a row that would start "
                                   "with less than 30 s left is skipped", at_least=60)
    e2e: bool = opt(False, "instead: --suite's end-to-end block on this machine's device (a CPU "
                           "too): train.py, kill and --resume, export, evaluate.py, gradients, "
                           "--cpu-offload")
    e2e_rows: list[str] = opt(tuple(gpu_suite.E2E_ROWS), "--e2e: only these rows", nargs="+",
                              choices=list(gpu_suite.E2E_ROWS))
    e2e_dir: str = opt("", "--e2e: keep its files in this folder ('' = a temporary one, deleted)")
    e2e_worker: str = opt("", "internal: the process of one --e2e row",
                          choices=["", "reload", "gradients", "offload"])


def model_config(cfg):
    if cfg.model:
        return from_pretrained(AutoConfig, cfg.model, "--model")
    return LlamaConfig(**ARCHS[cfg.arch])


def matmul_params(config):
    """-> (all parameters, those in matrix multiplies): the input embedding is a lookup, but when
    it is tied to the LM head it is multiplied there. Counted on the meta device: LLaMA-7B costs no
    memory here."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())            # a tied weight once
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return total, total - (0 if tied else embedding.numel())


def flops_per_token(config, seq_len, head_share=1.0):
    """Model FLOPs of one trained token, forward and backward: 6 per matmul parameter, and 12 L d T
    for the attention scores and values (PaLM, appendix B). Activation recomputation is not counted
    (MFU, not HFU). head_share: the share of positions the LM head runs on (CLHA's runs from the
    first response token on)."""
    head = config.vocab_size * config.hidden_size
    return (6 * (matmul_params(config)[1] - head) + 6 * head * head_share
            + 12 * config.num_hidden_layers * config.hidden_size * seq_len)


def peak_flops(device_name, override_tflops=0.0):
    """The device's dense bf16 peak in FLOP/s, or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS if name in device_name), None)


def full_batch(vocab_size, batch_size, K, max_len, seed, share_prompt=False, pack_len=None):
    """B prompts x K candidates of exactly T tokens each: a prompt of random length shared by its
    candidates, then a response to the end. No padding in one row per candidate, so tokens/s counts
    only real tokens and MFU is not diluted."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, vocab_size, (n,), generator=g).tolist()
    groups, samples = [], []
    for _ in range(batch_size):
        prompt = ids(int(torch.randint(max_len // 4, max_len // 2, (), generator=g)))
        cands = [(ids(max_len - len(prompt)), 0) for _ in range(K)]
        groups += [(prompt, cands)] if share_prompt else [(prompt, [c]) for c in cands]
        samples.append({"responses": [""] * K,
                        "rewards": (torch.randn(K, generator=g) * 5).tolist(), "sft_index": 0})
    return data.collate(groups, samples, pad_id=0, share_prompt=share_prompt, pack_len=pack_len)


def step_batches(cfg, config, rank):
    """The batches of every step (warmup included), the same prompts for every variant."""
    share, packed = VARIANTS[cfg.variant]
    pack_len = cfg.pack_len if packed else None
    B = cfg.batch_size[0]
    if not cfg.lengths:
        return [full_batch(config.vocab_size, B, cfg.k, cfg.max_len, rank * 1000 + i, share,
                           pack_len) for i in range(cfg.warmup + cfg.steps)]
    samples = data.read_samples(cfg.lengths)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    samples = [dict(s, rewards=[4.0 * (len(s["responses"]) - k)
                                for k in range(len(s["responses"]))])
               for s in samples]                   # rewards 4 apart, best first: all pairs kept
    draw = random.Random(rank)
    return [data.make_batch(tokenizer, draw.sample(samples, B), cfg.max_len, cfg.max_len * 3 // 4,
                            share, pack_len) for _ in range(cfg.warmup + cfg.steps)]


class PeakRSS:
    """Peak resident memory since start(), sampled every millisecond (CPU runs): ru_maxrss reports
    the loading."""
    def start(self):
        self.peak, self.running = 0, True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.001)

    def stop_gb(self):
        self.running = False
        return self.peak / 2**30


def bare_lm_loss(model, batch, device):
    """Plain next-token cross-entropy over every real token: the baseline a CLHA step is compared
    with."""
    ids, real = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return model(input_ids=ids, attention_mask=real, labels=ids.masked_fill(~real, -100)).loss


def run_variant(cfg):
    """Time optimizer steps of one variant; print one JSON line (rank 0)."""
    rank, world, device = train.init_distributed(cfg.cpu_offload)
    try:
        config = model_config(cfg)
        dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        share, packed = VARIANTS[cfg.variant]
        tcfg = train.Config(model=cfg.model, dtype=dtype,
                            activation_checkpointing=cfg.activation_checkpointing,
                            cpu_offload=cfg.cpu_offload, compile=cfg.compile, share_prompt=share,
                            pack=packed, pack_len=cfg.pack_len)
        # random weights, in the shards
        model = train.build_model(tcfg, config, device, rank, weights=False)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6,
                                      fused=device.type == "cuda" and not cfg.cpu_offload)
        batches, rss = step_batches(cfg, config, rank), PeakRSS()
        for i, batch in enumerate(batches):
            if i == cfg.warmup:                    # the clock starts after the warmup steps
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    rss.start()
                dist.barrier()
                start = time.perf_counter()
            loss = bare_lm_loss(model, batch, device) if cfg.variant == "lm" else train.objective(
                tcfg, model, data.to_device(batch, device))[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        step_s = (time.perf_counter() - start) / cfg.steps
        memory = (logs.peak_memory(device) if device.type == "cuda"
                  else {"peak_mem_gb": rss.stop_gb()})
        peak = torch.tensor(list(memory.values()), device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)               # the rank that needs the most
        result = variant_result(cfg, config, tcfg, batches[cfg.warmup:], step_s, world, device,
                                dict(zip(memory, peak.tolist())))
        if rank == 0:
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def variant_result(cfg, config, tcfg, timed, step_s, world, device, memory):
    """One variant's figures from its timed batches and step time."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tokens = sum(b["tokens"] for b in timed)                # of the B*K sequences, any layout
    tokens_per_s = tokens / len(timed) / step_s                         # per GPU
    padding = 1 - sum(b["computed"] for b in timed) / sum(b["input_ids"].numel() for b in timed)
    # the positions the LM head runs on (data.policy_logps: the columns in `keep`)
    head_share = 1.0 if cfg.variant == "lm" else sum(b["keep"].numel() for b in timed) / tokens
    peak_device = peak_flops(name, cfg.peak_tflops)
    mfu = flops_per_token(config, cfg.max_len, head_share) * tokens_per_s / peak_device \
        if peak_device and not cfg.lengths else None
    return {"variant": cfg.variant, "arch": cfg.model or cfg.arch,
            "params": matmul_params(config)[0], "world": world, "device": name,
            "dtype": tcfg.dtype, "B": cfg.batch_size[0], "K": timed[0]["K"],
            "T": "file" if cfg.lengths else cfg.max_len,
            "activation_checkpointing": cfg.activation_checkpointing,
            "cpu_offload": cfg.cpu_offload, "compile": cfg.compile, "step_s": round(step_s, 4),
            "steps_per_s": round(1 / step_s, 4), "tokens_per_s_per_gpu": round(tokens_per_s, 1),
            "padding": round(padding, 4), "mfu": round(mfu, 4) if mfu else None,
            **{k: round(v, 2) for k, v in memory.items()}}


def run_in_subprocess(argv):
    """One variant in a fresh process (so that neither inherits the other's memory) -> its
    result."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True,
                          text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"benchmark.py {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    print(lines[-1], flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def table(results):
    """Markdown: one row per result, then the ratios of each variant to the others of the same
    setting."""
    lines = ["| arch | variant | setting | steps/s | tokens/s per GPU | padding | step (s) | MFU | "
             "peak memory (GiB) | reserved (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    setting = lambda r: ", ".join(["AC" if r["activation_checkpointing"] else "no AC"]
                                  + ["CPU offload"] * r["cpu_offload"] + ["compile"] * r["compile"]
                                  + [f"B {r['B']} x K {r['K']} x T {r['T']}"])
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        reserved = f"{r['reserved_gb']:.2f}" if "reserved_gb" in r else "n/a"   # a CPU's: its RSS
        lines.append(f"| {r['arch']} | {r['variant']} | {setting(r)} | {r['steps_per_s']:.3f} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {r['padding']:.1%} | "
                     f"{r['step_s']:.3f} | {mfu} | {r['peak_mem_gb']:.2f} | {reserved} |")
    same = lambda a, b: (a["arch"], setting(a)) == (b["arch"], setting(b))
    pairs = [("clha_packed", "clha_prompts"), ("clha_packed", "clha_rows"),
             ("clha_prompts", "clha_rows"), ("clha_packed", "lm"), ("clha_rows", "lm")]
    for a, b in pairs:
        for x in (r for r in results if r["variant"] == a):
            for y in (r for r in results if r["variant"] == b and same(x, r)):
                lines.append(f"| {x['arch']} | {a} / {b} | {setting(x)} | "
                             f"{x['steps_per_s'] / y['steps_per_s']:.2f}x | | | | | "
                             f"{x['peak_mem_gb'] / y['peak_mem_gb']:.2f}x | |")
    return "\n".join(lines)


def environment():
    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}"
            if torch.cuda.is_available() else "no CUDA")
    return f"torch {torch.__version__}, {cuda}, {time.strftime('%Y-%m-%d')}"


def steps(cfg, argv):
    """Every variant at every --batch-size, each in a fresh process; --lengths first settles the
    tokenizer, once for all."""
    with tempfile.TemporaryDirectory() as folder:
        if cfg.lengths and not (cfg.tokenizer or cfg.model):
            from tools import demo          # the demo's way: SentencePiece, trained offline
            samples = data.read_samples(cfg.lengths)
            demo.train_tokenizer([s["prompt"] + " " + r for s in samples for r in s["responses"]],
                                 folder, 8000)
            argv = argv + ["--tokenizer", folder]
        elif cfg.lengths and not cfg.tokenizer:
            argv = argv + ["--tokenizer", cfg.model]
        if cfg.lengths:
            lengths_report(cfg, AutoTokenizer.from_pretrained(argv[argv.index("--tokenizer") + 1]))
        results = [run_in_subprocess(argv + ["--variant", variant, "--batch-size", str(B)])
                   for B in cfg.batch_size for variant in VARIANTS]
    print(environment())
    print(table(results))
    return results


def lengths_report(cfg, tokenizer):
    """The file's own lengths, exactly: what each layout computes per prompt, all of it (the timed
    steps draw some)."""
    samples = data.read_samples(cfg.lengths)
    encoded = [data.encode_sample(tokenizer, s, cfg.max_len, cfg.max_len * 3 // 4) for s in samples]
    rows = sum(len(p) + len(r) for e in encoded for p, r in e) / len(encoded)
    shared = sum(len(p) + sum(len(c) for c, _ in cands)
                 for p, cands in map(data.shared_rows, encoded)) / len(encoded)
    prompt, reply = (sum(len(x[i]) for e in encoded for x in e) / sum(map(len, encoded))
                     for i in (0, 1))
    print(f"{cfg.lengths}: {len(samples)} prompts of {prompt:.0f} tokens on average and replies of "
          f"{reply:.0f}; a step computes {rows:.0f} tokens per prompt in one row per candidate, "
          f"{shared:.0f} in one row per prompt: {rows / shared:.2f}x", flush=True)


@torch.inference_mode()
def generation_speed(cfg):
    """New tokens/s of evaluate.greedy (the KV-cached greedy loop of Table 2's protocol) on random
    prompts of 384 tokens, every row generating --new-tokens tokens: batches of 8 and 32 on a GPU,
    of each --batch-size on a CPU."""
    import evaluate
    from transformers import GenerationConfig
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype).eval()
    model.generation_config = GenerationConfig()           # no EOS: every row runs to the end
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    for batch_size in (8, 32) if device.type == "cuda" else cfg.batch_size:
        ids = torch.randint(4, model.config.vocab_size, (batch_size, 384))
        evaluate.greedy(model, ids[:, :16], torch.ones_like(ids[:, :16]), 4, pad=0)   # warm up
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        new = evaluate.greedy(model, ids, torch.ones_like(ids), cfg.new_tokens, pad=0)
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = time.perf_counter() - start
        print("RESULT " + json.dumps({"generate": cfg.model or cfg.arch, "device": name,
                                      "dtype": str(dtype)[6:], "batch": batch_size, "prompt": 384,
                                      "new_tokens": new.shape[1],
                                      "new_tokens_per_s": round(new.numel() / seconds, 1),
                                      "seconds": round(seconds, 2)}), flush=True)


def bookkeeping(n):
    """rescore.py's own work (reading, resume bookkeeping, writing, merging; the reward model
    replaced by a constant) for n samples of HH-RLHF's size, fresh and resumed after a kill at
    half."""
    import rescore
    with tempfile.TemporaryDirectory() as folder:
        path, out = os.path.join(folder, "train.jsonl"), os.path.join(folder, "train.rm.jsonl")
        turn = "\n\nHuman: " + "How do I make a good cup of tea at home? " * 6 + "\n\nAssistant:"
        write_jsonl(path, [{"id": f"s{i}", "prompt": turn * 2,
                            "responses": ["Boil water. " * 9, "No. " * 25],
                            "rewards": None, "sft_index": 0} for i in range(n)])
        scored, seconds = [], []

        def constant(prompts, responses, stop_at=None):
            scored.append(len(responses))
            if stop_at is not None and sum(scored) >= stop_at:
                raise KeyboardInterrupt                            # a kill, half way through
            return [0.5] * len(responses)
        for kill in (False, True):
            if kill:
                os.remove(out)
                try:
                    rescore.rescore_file("none", path, out,
                                         score_fn=lambda p, r: constant(p, r, stop_at=2 * n))
                except KeyboardInterrupt:
                    pass
            start = time.perf_counter()
            rescore.rescore_file("none", path, out, score_fn=constant)
            seconds.append(time.perf_counter() - start)
    print(f"rescore.py bookkeeping for {n} samples: {seconds[0]:.1f} s fresh, {seconds[1]:.1f} s "
          "resumed from half done")
    return seconds


def padding_share(samples, tokenizer, batch_size, group_by_length, max_len=512, max_prompt_len=384,
                  share_prompt=False, pack_len=None, seed=0):
    """Share of what one epoch of train.py's micro-batches computes that is padding, in a layout."""
    lengths = [data.sample_length(s) for s in samples]                 # what train.py groups by
    padded = real = 0
    for step in data.step_batches(lengths, batch_size, seed, 0, group_by_length):
        batch = data.make_batch(tokenizer, [samples[i] for i in step], max_len, max_prompt_len,
                                share_prompt, pack_len)
        padded, real = padded + batch["input_ids"].numel(), real + batch["computed"]
    return 1 - real / padded


def padding_table(path, tokenizer, cfg):
    """The padding share of each layout at each --batch-size, on a sample file's own lengths."""
    samples = data.read_samples(path)
    print(f"{path}: padding share of one epoch, --max-len {cfg.max_len}, --pack-len {cfg.pack_len}")
    print("| prompts per micro-batch | --group-by-length | one row per candidate | one row per "
          "prompt | packed |\n|---|---|---|---|---|")
    for B in cfg.batch_size:
        for group in (False, True):   # prompts cut to 3/4 of --max-len, as train.py's 384 of 512

            shares = [padding_share(samples, tokenizer, B, group, cfg.max_len, cfg.max_len * 3 // 4,
                                    share, cfg.pack_len if packed else None)
                      for share, packed in ((False, False), (True, False), (True, True))]
            print(f"| {B} | {group} | " + " | ".join(f"{x:.1%}" for x in shares) + " |", flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = flags.parse(Config, argv, __doc__.split("\n\n")[0])

    for flag, path in (("--lengths", cfg.lengths), ("--padding", cfg.padding)):
        if path:
            flags.input_file(path, flag)
    if cfg.padding:
        tokenizer = from_pretrained(AutoTokenizer, cfg.model, "--model")
        models.check_tokenizer(tokenizer, "--model")
        return padding_table(cfg.padding, tokenizer, cfg)
    if cfg.bookkeeping:
        return bookkeeping(cfg.bookkeeping)
    if cfg.generate:
        return generation_speed(cfg)
    if cfg.e2e_worker:
        return gpu_suite.e2e_worker(cfg)
    if cfg.e2e:
        failed = [r["e2e"] for r in gpu_suite.e2e(cfg) if r["status"] == "failed"]
        if failed:
            raise SystemExit(f"--e2e: {len(failed)} rows failed: {', '.join(failed)}")
        return None
    if cfg.suite:
        return gpu_suite.suite(cfg, VARIANTS, table, environment)
    return run_variant(cfg) if cfg.variant else steps(cfg, argv)


if __name__ == "__main__":
    flags.run(main)
