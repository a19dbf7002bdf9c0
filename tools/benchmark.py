"""Benchmarks: a CLHA step in either batch layout next to a bare causal-LM step (train.py's FSDP2 setup), and more.

    python tools/benchmark.py                        # CPU smoke test: llama-tiny (19.5M), random weights, no download
    python tools/benchmark.py --lengths SAMPLES --arch smollm2-135m    # the step on a sample file's own lengths
    python tools/benchmark.py --suite                # one GPU, < 8 min: end to end, then timings
    python tools/benchmark.py --e2e                  # the suite's end-to-end block, on any device
    python tools/benchmark.py --arch llama-1b --max-len 512            # one configuration; or --model PATH for a checkpoint
    torchrun --nproc_per_node 8 tools/benchmark.py --arch llama-7b --variant clha   # one variant on 8 GPUs
    python tools/benchmark.py --generate --arch llama-1b               # tokens/s of evaluate.py's greedy loop
    python tools/benchmark.py --padding SAMPLES --model TOKENIZER      # the padding share of train.py's batches
    python tools/benchmark.py --bookkeeping 160800                     # rescore.py's bookkeeping at HH-RLHF's size

A step benchmark runs three variants on the same prompts, each in a fresh process: `clha` (one row per prompt,
train.py's default), `clha_rows` (one row per candidate, --no-share-prompt) and `lm`, what plain SFT costs:
next-token cross-entropy over every token of the one-row-per-candidate batch. It prints one JSON line each
(steps/s, tokens/s per GPU counted as the B*K sequences' tokens whatever the layout, step time, MFU, peak
allocated and reserved memory) and a Markdown table with the ratios. Without --lengths the prompts are random
tokens of T in all (B prompts x K candidates, no padding); with --lengths each step draws B prompts of the file,
tokenized with --tokenizer (default: a SentencePiece tokenizer of 8,000 pieces trained on the file, as the demo
makes its own). MFU = model FLOPs per token (6 N + 12 L d T, PaLM's count, N the matmul parameters, the LM head's
counted only where it runs) x tokens/s over the GPU's dense bf16 peak (PEAK_TFLOPS, or --peak-tflops).
"""

import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository

import data                       # noqa: E402  (after the path above)
import train                      # noqa: E402
from data import UserError        # noqa: E402
from harness import flags, logs   # noqa: E402
from harness.flags import opt     # noqa: E402
from harness.models import from_pretrained   # noqa: E402

ARCHS = {   # random-weight LlamaConfigs, so that nothing needs a download
    "llama-tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,  # SmolLM2
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,   # Llama-3.2
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,  # LLaMA-1
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048,
                     tie_word_embeddings=False),
}
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("H800", 989),   # dense bf16,
               ("A100", 312), ("A800", 312), ("L40S", 362)]                                          # first match
# what each variant computes: (share the prompt, pack the prompts into rows); lm: a bare causal-LM step
VARIANTS = {"lm": (False, False), "clha_rows": (False, False), "clha_prompts": (True, False),
            "clha_packed": (True, True)}
# --e2e's rows, in order, and each one's timeout in seconds (of a GPU's; a CPU takes 5-25 s a row)
E2E_ROWS = {"train": 75, "train_2gpu": 60, "resume": 100, "evaluate": 45, "gradients": 50,
            "offload": 50}


@dataclass
class Config:
    arch: str = opt("llama-tiny", "a random-weight architecture (no download): " + " | ".join(ARCHS),
                    choices=list(ARCHS))
    model: str = opt("", "a causal LM checkpoint instead of --arch (its weights are not loaded)")
    lengths: str = opt("", "time the step on this sample file's prompts (data.py format)")
    tokenizer: str = opt("", "--lengths: the tokenizer ('' = --model's, or one trained on the file)")
    batch_size: list[int] = opt((2,), "prompts per device per micro-batch (several: a run each)",
                                nargs="+")
    pack_len: int = opt(1024, "tokens per packed row (as train.py)", at_least=8)
    k: int = opt(2, "candidates per prompt (random prompts)", at_least=2)
    max_len: int = opt(256, "T, tokens per sequence (with --lengths: at most, as train.py's --max-len)", at_least=8)
    steps: int = opt(5, "timed optimizer steps", at_least=1)
    warmup: int = opt(2, "untimed steps first", at_least=1)
    dtype: str = opt("", "compute dtype ('' = bfloat16 on GPUs, float32 on CPUs, which run bf16 slowly)",
                     choices=["", "bfloat16", "float32"])
    activation_checkpointing: bool = opt(True, "as train.py")
    cpu_offload: bool = opt(False, "as train.py")
    compile: bool = opt(False, "as train.py")
    peak_tflops: float = opt(0.0, "the GPU's dense bf16 peak in TFLOP/s for MFU (0 = from PEAK_TFLOPS)", at_least=0)
    variant: str = opt("", "run only this variant, in this process", choices=["", *VARIANTS])
    suite: bool = opt(False, "the GPU suite: every configuration the README's GPU table reports")
    generate: bool = opt(False, "instead: greedy tokens/s of evaluate.py's generation loop")
    new_tokens: int = opt(128, "--generate: tokens per reply", at_least=1)
    padding: str = opt("", "instead: the padding share of this sample file's batches, with --model's tokenizer")
    bookkeeping: int = opt(0, "instead: rescore.py's bookkeeping for this many samples, fresh and half done",
                           at_least=0)
    suite_budget_s: int = opt(480, "--suite: seconds for all its rows; a row that would start "
                                   "with less than 30 s left is skipped", at_least=60)
    e2e: bool = opt(False, "instead: --suite's end-to-end block on this machine's device (a CPU "
                           "too): train.py, kill and --resume, export, evaluate.py, gradients, "
                           "--cpu-offload")
    e2e_rows: list[str] = opt(tuple(E2E_ROWS), "--e2e: only these rows", nargs="+",
                              choices=list(E2E_ROWS))
    e2e_dir: str = opt("", "--e2e: keep its files in this folder ('' = a temporary one, deleted)")
    e2e_worker: str = opt("", "internal: the process of one --e2e row",
                          choices=["", "reload", "gradients", "offload"])


def model_config(cfg):
    return from_pretrained(AutoConfig, cfg.model, "--model") if cfg.model else LlamaConfig(**ARCHS[cfg.arch])


def matmul_params(config):
    """-> (all parameters, those in matrix multiplies): the input embedding is a lookup, but when it is tied to
    the LM head it is multiplied there. Counted on the meta device: LLaMA-7B costs no memory here."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())            # a tied weight once
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    return total, total - (0 if tied else embedding.numel())


def flops_per_token(config, seq_len, head_share=1.0):
    """Model FLOPs of one trained token, forward and backward: 6 per matmul parameter, and 12 L d T for the
    attention scores and values (PaLM, appendix B). Activation recomputation is not counted (MFU, not HFU).
    head_share: the share of positions the LM head runs on (CLHA's runs from the first response token on)."""
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
        samples.append({"responses": [""] * K, "rewards": (torch.randn(K, generator=g) * 5).tolist(),
                        "sft_index": 0})
    return data.collate(groups, samples, pad_id=0, share_prompt=share_prompt, pack_len=pack_len)


def step_batches(cfg, config, rank):
    """The batches of every step (warmup included), the same prompts for every variant."""
    share, packed = VARIANTS[cfg.variant]
    pack_len = cfg.pack_len if packed else None
    B = cfg.batch_size[0]
    if not cfg.lengths:
        return [full_batch(config.vocab_size, B, cfg.k, cfg.max_len, rank * 1000 + i, share, pack_len)
                for i in range(cfg.warmup + cfg.steps)]
    samples, tokenizer = data.read_samples(cfg.lengths), AutoTokenizer.from_pretrained(cfg.tokenizer)
    samples = [dict(s, rewards=[4.0 * (len(s["responses"]) - k) for k in range(len(s["responses"]))])
               for s in samples]                           # rewards 4 apart, best first: all pairs kept
    draw = random.Random(rank)
    return [data.make_batch(tokenizer, draw.sample(samples, B), cfg.max_len, cfg.max_len * 3 // 4,
                            share, pack_len) for _ in range(cfg.warmup + cfg.steps)]


class PeakRSS:
    """Peak resident memory since start(), sampled every millisecond (CPU runs): ru_maxrss reports the loading."""
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
    """Plain next-token cross-entropy over every real token: the baseline a CLHA step is compared with."""
    ids, real = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return model(input_ids=ids, attention_mask=real, labels=ids.masked_fill(~real, -100)).loss


def run_variant(cfg):
    """Time optimizer steps of one variant; print one JSON line (rank 0)."""
    rank, world, device = train.init_distributed(cfg.cpu_offload)
    try:
        config = model_config(cfg)
        dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        share, packed = VARIANTS[cfg.variant]
        tcfg = train.Config(model=cfg.model, dtype=dtype, activation_checkpointing=cfg.activation_checkpointing,
                            cpu_offload=cfg.cpu_offload, compile=cfg.compile, share_prompt=share, pack=packed,
                            pack_len=cfg.pack_len)
        model = train.build_model(tcfg, config, device, rank, weights=False)     # random weights, in the shards
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda" and not cfg.cpu_offload)
        batches, rss = step_batches(cfg, config, rank), PeakRSS()
        for i, batch in enumerate(batches):
            if i == cfg.warmup:                                        # the clock starts after the warmup steps
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
        memory = logs.peak_memory(device) if device.type == "cuda" else {"peak_mem_gb": rss.stop_gb()}
        peak = torch.tensor(list(memory.values()), device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        timed = batches[cfg.warmup:]
        tokens = sum(b["tokens"] for b in timed)                        # of the B*K sequences, any layout
        tokens_per_s = tokens / len(timed) / step_s                     # per GPU
        padding = 1 - sum(b["computed"] for b in timed) / sum(b["input_ids"].numel() for b in timed)
        # the positions the LM head runs on (data.policy_logps: the columns in `keep`)
        head_share = 1.0 if cfg.variant == "lm" else sum(b["keep"].numel() for b in timed) / tokens
        peak_device = peak_flops(name, cfg.peak_tflops)
        mfu = flops_per_token(config, cfg.max_len, head_share) * tokens_per_s / peak_device \
            if peak_device and not cfg.lengths else None
        result = {"variant": cfg.variant, "arch": cfg.model or cfg.arch, "params": matmul_params(config)[0],
                  "world": world, "device": name, "dtype": tcfg.dtype, "B": cfg.batch_size[0], "K": timed[0]["K"],
                  "T": "file" if cfg.lengths else cfg.max_len, "activation_checkpointing": cfg.activation_checkpointing,
                  "cpu_offload": cfg.cpu_offload, "compile": cfg.compile, "step_s": round(step_s, 4),
                  "steps_per_s": round(1 / step_s, 4), "tokens_per_s_per_gpu": round(tokens_per_s, 1),
                  "padding": round(padding, 4),
                  "mfu": round(mfu, 4) if mfu else None, **{k: round(v, 2) for k, v in zip(memory, peak.tolist())}}
        if rank == 0:
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def run_in_subprocess(argv):
    """One variant in a fresh process (so that neither inherits the other's memory) -> its result."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"benchmark.py {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    print(lines[-1], flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def table(results):
    """Markdown: one row per result, then the ratios of each variant to the others of the same setting."""
    lines = ["| arch | variant | setting | steps/s | tokens/s per GPU | padding | step (s) | MFU | "
             "peak memory (GB) | reserved (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    setting = lambda r: ", ".join(["AC" if r["activation_checkpointing"] else "no AC"]
                                  + ["CPU offload"] * r["cpu_offload"] + ["compile"] * r["compile"]
                                  + [f"B {r['B']} x K {r['K']} x T {r['T']}"])
    for r in results:
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a"
        reserved = f"{r['reserved_gb']:.2f}" if "reserved_gb" in r else "n/a"      # a CPU's: its RSS
        lines.append(f"| {r['arch']} | {r['variant']} | {setting(r)} | {r['steps_per_s']:.3f} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {r['padding']:.1%} | {r['step_s']:.3f} | {mfu} | "
                     f"{r['peak_mem_gb']:.2f} | {reserved} |")
    same = lambda a, b: (a["arch"], setting(a)) == (b["arch"], setting(b))
    pairs = [("clha_packed", "clha_prompts"), ("clha_packed", "clha_rows"), ("clha_prompts", "clha_rows"),
             ("clha_packed", "lm"), ("clha_rows", "lm")]
    for a, b in pairs:
        for x in (r for r in results if r["variant"] == a):
            for y in (r for r in results if r["variant"] == b and same(x, r)):
                lines.append(f"| {x['arch']} | {a} / {b} | {setting(x)} | "
                             f"{x['steps_per_s'] / y['steps_per_s']:.2f}x | | | | | "
                             f"{x['peak_mem_gb'] / y['peak_mem_gb']:.2f}x | |")
    return "\n".join(lines)


def environment():
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no CUDA"
    return f"torch {torch.__version__}, {cuda}, {time.strftime('%Y-%m-%d')}"


def steps(cfg, argv):
    """Every variant at every --batch-size, each in a fresh process; --lengths first settles the
    tokenizer, once for all."""
    with tempfile.TemporaryDirectory() as folder:
        if cfg.lengths and not (cfg.tokenizer or cfg.model):
            from tools import demo                                 # the demo's way: SentencePiece, trained offline
            samples = data.read_samples(cfg.lengths)
            demo.train_tokenizer([s["prompt"] + " " + r for s in samples for r in s["responses"]], folder, 8000)
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
    """The file's own lengths, exactly: what each layout computes per prompt, all of it (the timed steps draw some)."""
    samples = data.read_samples(cfg.lengths)
    encoded = [data.encode_sample(tokenizer, s, cfg.max_len, cfg.max_len * 3 // 4) for s in samples]
    rows = sum(len(p) + len(r) for e in encoded for p, r in e) / len(encoded)
    shared = sum(len(p) + sum(len(c) for c, _ in cands) for p, cands in map(data.shared_rows, encoded)) / len(encoded)
    prompt, reply = (sum(len(x[i]) for e in encoded for x in e) / sum(map(len, encoded)) for i in (0, 1))
    print(f"{cfg.lengths}: {len(samples)} prompts of {prompt:.0f} tokens on average and replies of {reply:.0f}; a step "
          f"computes {rows:.0f} tokens per prompt in one row per candidate, {shared:.0f} in one row per prompt: "
          f"{rows / shared:.2f}x", flush=True)


@torch.inference_mode()
def generation_speed(cfg):
    """New tokens/s of evaluate.greedy (the KV-cached greedy loop of Table 2's protocol) on random prompts of
    384 tokens, every row generating --new-tokens tokens."""
    import evaluate
    from transformers import GenerationConfig
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(cfg), dtype=dtype).eval()
    model.generation_config = GenerationConfig()                   # no EOS: every row runs to the end
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    for batch_size in (8, 32) if device.type == "cuda" else (cfg.batch_size,):
        ids = torch.randint(4, model.config.vocab_size, (batch_size, 384))
        evaluate.greedy(model, ids[:, :16], torch.ones_like(ids[:, :16]), 4, pad=0)   # warm up
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        new = evaluate.greedy(model, ids, torch.ones_like(ids), cfg.new_tokens, pad=0)
        torch.cuda.synchronize() if device.type == "cuda" else None
        seconds = time.perf_counter() - start
        print("RESULT " + json.dumps({"generate": cfg.model or cfg.arch, "device": name, "dtype": str(dtype)[6:],
                                      "batch": batch_size, "prompt": 384, "new_tokens": new.shape[1],
                                      "new_tokens_per_s": round(new.numel() / seconds, 1),
                                      "seconds": round(seconds, 2)}), flush=True)


def bookkeeping(n):
    """rescore.py's own work (reading, resume bookkeeping, writing, merging; the reward model replaced by a
    constant) for n samples of HH-RLHF's size, fresh and resumed after a kill at half."""
    import rescore
    with tempfile.TemporaryDirectory() as folder:
        path, out = os.path.join(folder, "train.jsonl"), os.path.join(folder, "train.rm.jsonl")
        turn = "\n\nHuman: " + "How do I make a good cup of tea at home? " * 6 + "\n\nAssistant:"
        data.write_jsonl(path, [{"id": f"s{i}", "prompt": turn * 2, "responses": ["Boil water. " * 9, "No. " * 25],
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
                    rescore.rescore_file("none", path, out, score_fn=lambda p, r: constant(p, r, stop_at=2 * n))
                except KeyboardInterrupt:
                    pass
            start = time.perf_counter()
            rescore.rescore_file("none", path, out, score_fn=constant)
            seconds.append(time.perf_counter() - start)
    print(f"rescore.py bookkeeping for {n} samples: {seconds[0]:.1f} s fresh, {seconds[1]:.1f} s resumed from half "
          "done")
    return seconds


# ---- the GPU suite: the measurements above, then train.py's own pipeline end to end ------------
# --suite runs every row in a process of its own under a timeout, all within one budget, so that
# a cold compile or a hang costs its row, not the GPU session's few minutes. Its end-to-end block
# (--e2e, which runs alone on a CPU too, for the tests) is what has never met a GPU: train.py
# under torchrun in bf16, a SIGKILL and --resume, the export reloaded, evaluate.py, the gradients
# at a row length that trips cuDNN's attention (pytorch/pytorch#196678), and --cpu-offload's host
# memory, each checked, on a tiny model the block saves itself.

E2E_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1,        # head_dim 64, as LLaMA's
                 max_position_embeddings=512, tie_word_embeddings=False)
E2E_STEPS, E2E_SAVE_EVERY = 4, 2
# A resumed bf16 GPU run is not bit-identical to the uninterrupted one: atomic adds in attention's
# backward (and in the logits gather's) sum in another order, so a gradient element moves by a few
# bf16 roundings (8 significant bits: 2^-8 = 0.4% apart). Adam divides each element by its own
# scale, so the update moves by about as much, relatively, and each later loss (a mean over ~1,000
# tokens, which averages such noise down) by a fraction of that: 1% leaves several roundings of
# headroom. A resume that fed other prompts moves it by far more: this model's loss differs by
# 10-30% from one step's prompts to the next's. The row prints the difference it saw.
# On a CPU, float32 kernels sum in a fixed order: the resumed losses must be the same floats.
RESUME_RTOL_GPU = 1e-2
FAIL_ENV = "BENCHMARK_E2E_FAIL"   # tests: "row" breaks its first command, "row:hang" makes it hang
SDPA_OPS = (("cudnn", "cudnn"), ("flash_attention_for_cpu", "flash (CPU)"), ("flash", "flash"),
            ("efficient", "efficient"), ("attention_math", "math"))
KERNEL_WORDS = ("scaled_dot_product", "attention", "cudnn", "flash", "fmha", "sdpa")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
SELF = [sys.executable, os.path.abspath(__file__)]
# torch.distributed's variables are not passed on: a row is a world of its own, and a MASTER_PORT
# left by our caller (a test that set one up in its process) may still be held there
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")


class RowFailed(Exception):
    """A row's check failed, or its command did: the message, the tail of what it wrote, and what
    the row found (for its RESULT line)."""

    def __init__(self, message, tail="", found=None):
        super().__init__(message)
        self.tail, self.found = tail, found or {}


class Skipped(Exception):
    """A row that does not apply here (no CUDA, one GPU), or whose input no row made."""


def descendants(pid):
    """Every process below pid, through /proc: torchrun's workers lead sessions of their own."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found, todo = found + kids, todo + kids
    return found


def kill_tree(pid):
    """SIGKILL a command started in a session of its own and every process below it, group by
    group, as a node failure would; never our own group."""
    ours = os.getpgid(0)
    for victim in [pid] + descendants(pid):
        try:
            group = os.getpgid(victim)
            if group != ours:
                os.killpg(group, signal.SIGKILL)
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Row:
    """One row's commands: each in a session of its own (and a world of its own: DIST_ENV), all
    under one deadline, their output in files (a full pipe would stall a worker). The first
    command of a row named in FAIL_ENV is broken on purpose, for the tests: a bogus flag, or with
    ":hang" a torchrun that sleeps, and 5 s to live."""

    def __init__(self, name, timeout, folder):
        self.name, self.timeout, self.folder, self.count = name, timeout, folder, 0
        self.deadline = time.monotonic() + timeout
        wanted = dict(x.partition(":")[::2] for x in os.environ.get(FAIL_ENV, "").split(",") if x)
        self.sabotage = wanted.get(name)
        os.makedirs(os.path.join(folder, "logs"), exist_ok=True)

    def start(self, command):
        if self.count == 0 and self.sabotage == "hang":
            command = TORCHRUN + ["--nproc-per-node=1", "--no-python", "sleep", "577"]
            self.deadline, self.timeout = time.monotonic() + 5, 5
        elif self.count == 0 and self.sabotage is not None:
            command = command + ["--no-such-flag"]
        self.count += 1
        log = os.path.join(self.folder, "logs", f"{self.name}.{self.count}")
        self.out, self.err = log + ".out", log + ".err"
        env = {k: v for k, v in os.environ.items()
               if k not in DIST_ENV and not k.startswith("TORCHELASTIC_")}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err,
                                    start_new_session=True)

    def wait(self, proc):
        """-> the command's stdout; RowFailed if it ran past the row's deadline (then it is killed,
        with its workers) or exited with an error."""
        try:
            proc.wait(timeout=max(self.deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            raise RowFailed(f"timed out after {self.timeout} s (killed, with its workers)",
                            self.tail()) from None
        if proc.returncode:
            raise RowFailed(f"exit status {proc.returncode}: {' '.join(proc.args[-12:])}",
                            self.tail())
        with open(self.out) as f:
            return f.read()

    def run(self, command):
        return self.wait(self.start(command))

    def result(self, command):
        """Run a command that prints a RESULT line -> that line's JSON."""
        lines = [x for x in self.run(command).splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise RowFailed("no RESULT line", self.tail())
        return json.loads(lines[-1][len("RESULT "):])

    def tail(self, chars=2000):
        text = ""
        for path in (self.out, self.err):
            with open(path, errors="replace") as f:
                text += f.read()[-chars:]
        return text[-chars:]


def e2e_dtype():
    return "bfloat16" if torch.cuda.is_available() else "float32"


def ranked(samples):
    """The demo's known quality as rewards (-3, 1, 5: pairs 4 apart), best first, as rescore.py
    would write them."""
    from tools import demo
    out = []
    for s in samples:
        rewards = [4.0 * demo.demo_quality(s["prompt"], r) - 3.0 for r in s["responses"]]
        order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
        out.append(dict(s, responses=[s["responses"][i] for i in order],
                        rewards=[rewards[i] for i in order]))
    return out


def e2e_assets(folder):
    """Everything the block needs, offline, in a few seconds: rescored-looking demo train and dev
    files, test prompts, a SentencePiece tokenizer, a tiny LLaMA and a tiny reward model."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    from tools import demo
    raw = demo.make_demo_data(os.path.join(folder, "raw"), n_train=64, n_test=16, tie=0.0,
                              flip=0.0, seed=1)
    train_samples, test_samples = (ranked(data.read_hh_rlhf(raw[s])[0]) for s in ("train", "test"))
    names = ("train.jsonl", "dev.jsonl", "test.jsonl", "base", "rm")
    paths = {name: os.path.join(folder, name) for name in names}
    data.write_jsonl(paths["train.jsonl"], train_samples)
    data.write_jsonl(paths["dev.jsonl"], test_samples[:8])
    data.write_jsonl(paths["test.jsonl"], test_samples[8:])
    texts = [s["prompt"] + " " + r for s in train_samples + test_samples for r in s["responses"]]
    tokenizer = demo.train_tokenizer(texts, paths["base"], vocab_size=600)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         **E2E_MODEL)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(paths["base"])
    plain = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    LlamaForSequenceClassification(LlamaConfig(**plain, num_labels=1)).save_pretrained(paths["rm"])
    tokenizer.save_pretrained(paths["rm"])
    with open(os.path.join(folder, "assets.json"), "w") as f:
        json.dump(paths, f)
    return paths


def read_assets(folder):
    with open(os.path.join(folder, "assets.json")) as f:
        return json.load(f)


def e2e_train_args(assets, out, *extra):
    """train.py for E2E_STEPS steps of 8 prompts, a checkpoint every E2E_SAVE_EVERY, validation at
    the end."""
    return ["--model", assets["base"], "--train", assets["train.jsonl"], "--dev",
            assets["dev.jsonl"], "--out", out, "--global-batch", "8", "--batch-size", "4",
            "--epochs", "1", "--lr", "2e-3", "--max-steps", str(E2E_STEPS), "--save-every",
            str(E2E_SAVE_EVERY), "--log-every", "1", "--max-len", "128", "--max-prompt-len", "64",
            "--dtype", e2e_dtype(), *extra]


def logged_losses(out):
    """step -> loss of OUT/log.jsonl; a step logged twice, skipped or not finite fails."""
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "split" not in r]
    steps = [r["step"] for r in records]
    if len(set(steps)) != len(steps):
        raise RowFailed(f"log.jsonl logs a step twice: {steps}")
    bad = [r["step"] for r in records if r.get("skipped") or not math.isfinite(r["loss"])]
    if bad:
        raise RowFailed(f"non-finite loss or gradient (step not applied) at steps {bad}")
    return {r["step"]: r["loss"] for r in records}


def compare_losses(got, reference, rtol):
    """Per step: the same floats (rtol 0), or within rtol of the reference, relatively."""
    if sorted(got) != sorted(reference):
        raise RowFailed(f"steps {sorted(got)} logged, the reference logged {sorted(reference)}")
    worst = max(abs(got[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in reference)
    same = all(got[s] == reference[s] for s in reference)
    if not (same if rtol == 0 else worst <= rtol):
        raise RowFailed(f"losses differ from the uninterrupted run's by {worst:.2e} (relative; "
                        f"tolerance {rtol:g}): {[got[s] for s in sorted(got)]} against "
                        f"{[reference[s] for s in sorted(reference)]}")
    return {"max_rel_diff": worst, "tolerance": rtol, "bit_identical": same}


def e2e_train(row, assets, nproc, reference=None):
    """train.py under torchrun on nproc processes; given the 1-process run's losses, within
    RESUME_RTOL_GPU of them: the same global batch, split and summed in another order."""
    out = os.path.join(row.folder, f"train_{nproc}")
    row.run(TORCHRUN + [f"--nproc-per-node={nproc}", "train.py", *e2e_train_args(assets, out)])
    losses, final = logged_losses(out), os.path.join(out, "final")
    if sorted(losses) != list(range(1, E2E_STEPS + 1)) or not os.path.isdir(final):
        raise RowFailed(f"steps {sorted(losses)} logged; final/ written: {os.path.isdir(final)}")
    result = {"world": nproc, "dtype": e2e_dtype(), "losses": [losses[s] for s in sorted(losses)],
              "final": final}
    return result | (compare_losses(losses, reference, RESUME_RTOL_GPU) if reference else {})


def saved_steps(out):
    """The steps of OUT's complete checkpoints (train.py renames step_N.tmp once it is whole)."""
    folder = os.path.join(out, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())


def e2e_resume(row, assets, reference):
    """The uninterrupted run again, SIGKILLed (torchrun and its workers) once its first checkpoint
    is complete, then --resume to the end: the uninterrupted run's losses, and an export that
    reloads."""
    from safetensors.torch import load_file
    out = os.path.join(row.folder, "killed")
    args = TORCHRUN + ["--nproc-per-node=1", "train.py", *e2e_train_args(assets, out)]
    proc = row.start(args)
    while not saved_steps(out) and proc.poll() is None and time.monotonic() < row.deadline:
        time.sleep(0.01)
    kept, ended = saved_steps(out), proc.poll()
    if ended is None:
        kill_tree(proc.pid)
        proc.wait()
    if not kept:
        why = f"the run ended (exit status {ended})" if ended is not None else "the time ran out"
        raise RowFailed(f"no checkpoint appeared: {why}", row.tail())
    if os.path.exists(os.path.join(out, "final")):
        raise RowFailed("the run finished before the kill: nothing was resumed")
    row.run(args + ["--resume"])
    losses, final = logged_losses(out), os.path.join(out, "final")
    rtol = RESUME_RTOL_GPU if torch.cuda.is_available() else 0
    result = {"killed_after_step": kept[-1], "losses": [losses[s] for s in sorted(losses)],
              **compare_losses(losses, logged_losses(os.path.dirname(reference["final"])), rtol)}
    resumed, whole = (load_file(os.path.join(p, "model.safetensors"))
                      for p in (final, reference["final"]))
    result["max_weight_diff"] = max((resumed[k].float() - whole[k].float()).abs().max().item()
                                    for k in whole)
    result["reload"] = row.result(SELF + ["--e2e-worker", "reload", "--model", final])
    if not result["reload"]["logits_finite"]:
        raise RowFailed(f"{final} reloads with non-finite logits")
    return result | {"final": final}


@torch.inference_mode()
def e2e_reload(cfg):
    """OUT/final as a user loads it: from_pretrained, on the GPU if there is one; finite logits?"""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    ids = tokenizer("\n\nHuman: How do I make tea?" + data.ASSISTANT, return_tensors="pt")
    ids = ids["input_ids"]
    logits = model(input_ids=ids.to(device)).logits
    print("RESULT " + json.dumps({"logits_finite": bool(torch.isfinite(logits).all()),
                                  "shape": list(logits.shape), "dtype": str(model.dtype)[6:]}))


def e2e_evaluate(row, assets, final):
    """evaluate.py on the exported policy with the tiny reward model: results.json, all finite."""
    out = os.path.join(row.folder, "eval")
    row.run([sys.executable, "evaluate.py", "--model", final, "--reward-model", assets["rm"],
             "--data", assets["test.jsonl"], "--out", out, "--batch-size", "4", "--max-new-tokens",
             "16", "--max-prompt-len", "64", "--dtype", e2e_dtype()])
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        raise RowFailed(f"{path} was not written", row.tail())
    with open(path) as f:
        results = json.load(f)
    bad = [f"{s}.{k}" for s, v in results.items() for k, x in v.items() if not math.isfinite(x)]
    if bad or "Total" not in results:
        raise RowFailed(f"results.json: not finite: {bad}" if bad else "results.json: no Total")
    return {"model": final, "total": {k: round(v, 3) for k, v in results["Total"].items()}}


def sdp_backends():
    """The SDPA backends torch may pick on CUDA, as the setup before left them."""
    b = torch.backends.cuda
    return {"cudnn": b.cudnn_sdp_enabled(), "flash": b.flash_sdp_enabled(),
            "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled()}


def profiled(fn):
    """fn() under torch.profiler (CPU ops; CUDA kernels too on a GPU) -> (its value, the SDPA
    backends that ran, named by their aten ops, and the attention ops and kernels by name)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * torch.cuda.is_available()
    with profile(activities=activities) as prof:
        value = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events()
                    if any(w in e.name.lower() for w in KERNEL_WORDS)})
    ran = {next((label for key, label in SDPA_OPS if key in n), "other") for n in names
           if n.startswith("aten::_scaled_dot_product")}
    return value, sorted(ran), [n[:100] for n in names][:12]


def batch_at_tile_edge(tokenizer, tcfg):
    """A real batch of train.py's layout (data.make_batch: shared prompts packed in one row) whose
    row length L has L % 128 == 64 and L >= 192: half a 128-wide key tile past the last full one,
    where cuDNN's backward scored the padded half 0 instead of -inf (pytorch/pytorch#196678)."""
    from tools import demo
    for words in range(200):                                       # longer prompts until it is
        samples = []
        for b, (task, first, then) in enumerate(demo.DEMO_TASKS[:2]):
            replies = demo.demo_replies(task, first, then, False)
            samples.append({"id": f"g{b}", "prompt": "\n\nHuman: " + "please " * words
                            + f"how do I {task}?" + data.ASSISTANT, "responses": [replies[2][0],
                            replies[0][0]], "rewards": [5.0, -3.0], "sft_index": 0})
        batch = data.make_batch(tokenizer, samples, tcfg.max_len, tcfg.max_prompt_len,
                                tcfg.share_prompt, tcfg.pack and tcfg.pack_len)
        if batch["input_ids"].shape[1] % 128 == 64 and batch["input_ids"].shape[1] >= 192:
            return batch
    raise RowFailed("no prompt length gives a row of L % 128 == 64 tokens")


def e2e_gradients(cfg):
    """One CLHA forward and backward (data.make_batch, train.objective) through train.py's FSDP2
    model on a batch of L % 128 == 64: which attention kernel ran, and whether every gradient is
    finite; then the issue's own trigger (every logit ~ -120, so logsumexp < ln(FLT_MAX)), where
    random weights never go, through SDPA with that batch's mask. As train.py sets the backends up,
    and, on CUDA, with cuDNN allowed."""
    assets = read_assets(cfg.e2e_dir)
    rank, _, device = train.init_distributed()
    try:
        tokenizer = AutoTokenizer.from_pretrained(assets["base"])
        config = AutoConfig.from_pretrained(assets["base"])
        tcfg = train.Config(model=assets["base"], dtype=e2e_dtype(), max_len=256,
                            max_prompt_len=192)
        batch = data.to_device(batch_at_tile_edge(tokenizer, tcfg), device)
        torch.manual_seed(0)
        model = train.build_model(tcfg, config, device, rank, weights=False)
        model.train()
        dtype, heads, dim = getattr(torch, tcfg.dtype), config.num_attention_heads, config.head_dim
        mask = batch["attention_mask"]                                     # [R, 1, L, L]

        def step():
            model.zero_grad(set_to_none=True)
            loss = train.objective(tcfg, model, batch)[0]
            loss.backward()
            return loss.item()

        def trigger():
            q, k, v = (torch.randn(mask.shape[0], heads, mask.shape[-1], dim, device=device) * 0.1
                       for _ in range(3))
            q[..., 0], k[..., 0] = 1.0, -120 * math.sqrt(dim)             # every logit ~ -120
            q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out.backward(torch.randn_like(out))
            return bool(torch.isfinite(q.grad).all())

        def attempt():
            loss, ran, kernels = profiled(step)
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                     for p in model.parameters() if p.grad is not None]
            finite = math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
            trigger_finite, trigger_ran, _ = profiled(trigger)
            return {"sdp_enabled": sdp_backends(), "backends": ran, "kernels": kernels,
                    "loss": loss, "grads": len(grads), "grads_finite": finite,
                    "trigger_grad_q_finite": trigger_finite, "trigger_backends": trigger_ran}
        result = {"L": batch["input_ids"].shape[1], "rows": batch["input_ids"].shape[0],
                  "head_dim": dim, "dtype": tcfg.dtype, "as_train_py": attempt()}
        if device.type == "cuda":                  # for information: train.py does not allow it
            was = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(True)
            try:
                result["cudnn_allowed"] = attempt()
            except Exception as e:
                result["cudnn_allowed"] = f"error: {type(e).__name__}: {e}"[:300]
            finally:
                torch.backends.cuda.enable_cudnn_sdp(was)
        else:
            result["cudnn_allowed"] = "skipped: no CUDA"
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def e2e_offload(cfg):
    """train.py --cpu-offload for 2 steps in this process, under torchrun: its peak host memory
    (ru_maxrss: this process is the worker), and on CUDA the pinned host allocator's bytes (it
    rounds every block up to a power of two) against the fp32 shards and their gradients, which
    FSDP2 pins."""
    assets, built, build = read_assets(cfg.e2e_dir), [], train.build_model

    def keep(*args, **kwargs):                             # the model train.main builds, to count
        built.append(build(*args, **kwargs))
        return built[-1]
    train.build_model = keep
    train.main(e2e_train_args(assets, os.path.join(cfg.e2e_dir, "offload"), "--cpu-offload",
                              "--max-steps", "2"))
    if int(os.environ.get("RANK", "0")):
        return
    shards = [p.to_local() for p in built[0].parameters()]
    shard_bytes = sum(s.numel() * s.element_size() for s in shards)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"steps": 2, "peak_rss_gb": round(peak_rss / 2**30, 3),
              "shards_on_host": all(s.device.type == "cpu" for s in shards),
              "shard_mb": round(shard_bytes / 2**20, 3)}
    if torch.cuda.is_available():
        stats, mb = torch.cuda.memory.host_memory_stats(), lambda n: round(n / 2**20, 3)
        rounded = sum(1 << max(s.untyped_storage().nbytes() - 1, 0).bit_length() for s in shards)
        result["pinned"] = {"shards_pinned": all(s.is_pinned() for s in shards),
                            "allocated_peak_mb": mb(stats.get("allocated_bytes.peak", 0)),
                            "active_peak_mb": mb(stats.get("active_bytes.peak", 0)),
                            "shards_rounded_up_mb": mb(rounded),
                            "allocated_over_shards_and_grads": round(
                                stats.get("allocated_bytes.peak", 0) / (2 * shard_bytes), 3)}
    else:
        result["pinned"] = "skipped: no CUDA"
    print("RESULT " + json.dumps(result), flush=True)


def e2e_gradients_row(row, folder):
    """The gradients row: its worker's findings; every gradient finite as train.py sets attention
    up, the model's and the trigger's."""
    found = row.result(SELF + ["--e2e-dir", folder, "--e2e-worker", "gradients"])
    ours = found["as_train_py"]
    if not (ours["grads_finite"] and ours["trigger_grad_q_finite"]):
        raise RowFailed(f"non-finite gradients at L = {found['L']} as train.py sets attention up "
                        f"({'/'.join(ours['backends'])}): model {ours['grads_finite']}, trigger "
                        f"{ours['trigger_grad_q_finite']}", found=found)
    return found


def e2e_offload_row(row, folder):
    """The offload row: its worker's findings; the shards must be in host memory."""
    found = row.result(TORCHRUN + ["--nproc-per-node=1", *SELF[1:], "--e2e-dir", folder,
                                   "--e2e-worker", "offload"])
    if not found["shards_on_host"]:
        raise RowFailed("--cpu-offload left parameter shards on the GPU", found=found)
    return found


def e2e_worker(cfg):
    workers = {"reload": e2e_reload, "gradients": e2e_gradients, "offload": e2e_offload}
    return workers[cfg.e2e_worker](cfg)


def e2e(cfg, deadline=None, table=True):
    """The end-to-end block on this machine's device (gloo and float32 on a CPU): a RESULT line per
    row, FAILED and the tail of its output for a row that fails, then a table -> the rows' results.
    deadline (time.monotonic()): rows are cut to it, and skipped when less than 10 s is left."""
    folder = os.path.abspath(cfg.e2e_dir) if cfg.e2e_dir else tempfile.mkdtemp(prefix="clha-e2e-")
    os.makedirs(folder, exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"end-to-end block: {gpus} GPUs, {e2e_dtype()}, in {folder}", flush=True)
    results, made = [], {}

    def row(name, work):
        start = time.monotonic()
        timeout = E2E_ROWS[name] if deadline is None else min(E2E_ROWS[name], deadline - start)
        result = {"e2e": name}
        try:
            if timeout < 10:
                raise Skipped("the suite's time budget is spent")
            made[name] = work(Row(name, int(timeout), folder))
            result |= {"status": "ok", **made[name]}
        except Skipped as e:
            result |= {"status": f"skipped: {e}"}
        except Exception as e:                                 # any failure: report it, go on
            tail = e.tail if isinstance(e, RowFailed) else traceback.format_exc()[-2000:]
            result |= {"status": "failed", "error": str(e), **getattr(e, "found", {})}
            print(f"FAILED: e2e row {name}: {e}\n{tail.rstrip()}", flush=True)
        result["seconds"] = round(time.monotonic() - start, 1)
        print("RESULT " + json.dumps(result), flush=True)
        results.append(result)

    def needs(*wanted):
        """The result of the first of these rows that passed, or Skipped."""
        found = [made[w] for w in wanted if w in made]
        if not found:
            raise Skipped(f"needs the {' or '.join(wanted)} row, which did not pass here")
        return found[0]

    def two_gpus(r):
        if gpus < 2:
            raise Skipped("fewer than 2 GPUs")
        return e2e_train(r, assets, 2, logged_losses(os.path.dirname(needs("train")["final"])))

    try:
        assets = e2e_assets(folder)
    except Exception as e:
        print(f"FAILED: e2e setup: {e}\n{traceback.format_exc()[-2000:]}", flush=True)
        return [{"e2e": "setup", "status": "failed", "error": str(e)}]
    plan = {"train": lambda r: e2e_train(r, assets, 1),
            "train_2gpu": two_gpus,
            "resume": lambda r: e2e_resume(r, assets, needs("train")),
            "evaluate": lambda r: e2e_evaluate(r, assets, needs("resume", "train")["final"]),
            "gradients": lambda r: e2e_gradients_row(r, folder),
            "offload": lambda r: e2e_offload_row(r, folder)}
    for name in E2E_ROWS:
        if name in cfg.e2e_rows:
            row(name, plan[name])
    if table:
        print(e2e_table(results))
    if not cfg.e2e_dir:
        shutil.rmtree(folder, ignore_errors=True)
    return results


def e2e_summary(r):
    """A row's findings, in one cell."""
    if r["status"] != "ok":
        return r.get("error", "")[:150]
    if r["e2e"] in ("train", "train_2gpu"):
        diff = f", {r['max_rel_diff']:.1e} from 1 process" if "max_rel_diff" in r else ""
        losses = r["losses"]
        return f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}{diff}; final/"
    if r["e2e"] == "resume":
        same = "bit-identical" if r["bit_identical"] else f"within {r['max_rel_diff']:.1e}"
        return (f"killed after step {r['killed_after_step']}, resumed: losses {same} (tolerance "
                f"{r['tolerance']:g}), weights {r['max_weight_diff']:.1e} apart; final/ reloads, "
                "logits finite")
    if r["e2e"] == "evaluate":
        return "results.json finite: " + ", ".join(f"{k} {v}" for k, v in r["total"].items())
    if r["e2e"] == "gradients":
        finite = lambda ok: "finite" if ok else "NOT FINITE"
        cells = [f"{name}: {a}" if isinstance(a, str) else
                 f"{name}: {'/'.join(a['backends']) or '?'}, grads {finite(a['grads_finite'])}, "
                 f"trigger grad_q {finite(a['trigger_grad_q_finite'])}"
                 for name, a in ((n, r[n]) for n in ("as_train_py", "cudnn_allowed"))]
        return f"L = {r['L']}: " + "; ".join(cells)
    if r["e2e"] == "offload":
        p = r["pinned"]
        pinned = p if isinstance(p, str) else (f"pinned peak {p['allocated_peak_mb']} MB for "
                                                f"{2 * r['shard_mb']:.2f} MB of shards and grads")
        return f"peak RSS {r['peak_rss_gb']} GB, shards on host: {r['shards_on_host']}; {pinned}"
    return ""


def e2e_table(results):
    lines = ["| e2e row | status | seconds | result |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['e2e']} | {r['status']} | {r.get('seconds', '')} | "
                              f"{e2e_summary(r)} |" for r in results])


def run_bounded(argv, timeout):
    """run_in_subprocess under a timeout: the row is killed, with any workers, past it."""
    step = Row("suite", timeout, tempfile.mkdtemp(prefix="clha-suite-"))
    try:
        lines = [x for x in step.run(SELF + argv).splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise RowFailed("no RESULT line", step.tail())
    except RowFailed as e:
        raise RuntimeError(f"benchmark.py {' '.join(argv)} failed: {e}\n{e.tail[-3000:]}") \
            from None
    finally:
        shutil.rmtree(step.folder, ignore_errors=True)
    for line in lines:
        print(line, flush=True)
    return [json.loads(x[len("RESULT "):]) for x in lines]


def suite(cfg):
    """The README's GPU measurements on one GPU, each in a fresh process under a timeout, all
    within --suite-budget-s: first the end-to-end block (train.py's pipeline meeting the GPU), then
    llama-1b at the paper's micro-batch, LLaMA-7B CLHA (with --cpu-offload where 7B's 108 GB of
    fp32 state does not fit), generation, and last what matters least (no activation
    checkpointing; --compile, whose cold start is the slowest)."""
    if not torch.cuda.is_available():
        raise UserError("--suite needs a CUDA GPU (torch.cuda.is_available() is False); for a CPU "
                        "smoke test run: python tools/benchmark.py --arch llama-tiny")
    deadline = time.monotonic() + cfg.suite_budget_s
    print(environment(), flush=True)
    e2e_results = e2e(cfg, deadline, table=False)
    paper = ["--arch", "llama-1b", "--batch-size", "2", "--k", "2", "--max-len", "512", "--steps",
             "10"]
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    host_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows = [(paper + ["--variant", v], 120) for v in VARIANTS]               # (argv, timeout)
    seven_b = ["--arch", "llama-7b", "--batch-size", "2", "--k", "2", "--max-len", "512",
               "--steps", "3", "--variant", "clha_packed"]
    if gpu_gb >= 120:
        rows.append((seven_b, 300))
    elif host_gb >= 130:
        rows.append((seven_b + ["--cpu-offload"], 300))
    else:
        print(f"skipping LLaMA-7B: {gpu_gb:.0f} GB of GPU and {host_gb:.0f} GB of host memory "
              "hold less than its 108 GB of fp32 weights, gradients and AdamW state")
    rows.append((["--generate", "--arch", "llama-1b"], 120))
    rows += [(paper + ["--variant", v, "--no-activation-checkpointing"], 120) for v in VARIANTS]
    rows.append((paper + ["--variant", "clha_packed", "--compile"], 240))
    results, failed = [], sum(r["status"] == "failed" for r in e2e_results)
    peak = [f"--peak-tflops={cfg.peak_tflops}"] if cfg.peak_tflops else []
    for argv, timeout in rows:
        left = deadline - time.monotonic()
        if left < 30:
            print(f"skipped (--suite-budget-s {cfg.suite_budget_s} is spent): {' '.join(argv)}",
                  flush=True)
            continue
        try:
            results += run_bounded(argv + peak, int(min(timeout, left)))
        except RuntimeError as e:                          # out of memory, say: report it, go on
            print(f"FAILED: {e}", flush=True)
            failed += 1
    print(table([r for r in results if "variant" in r]))
    for r in results:
        if "generate" in r:
            print(f"generation, {r['generate']}, batch {r['batch']}: "
                  f"{r['new_tokens_per_s']:.0f} new tokens/s")
    print(e2e_table(e2e_results))
    if failed:
        raise SystemExit(f"--suite: {failed} rows failed (FAILED above)")


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
    print("| prompts per micro-batch | --group-by-length | one row per candidate | one row per prompt "
          "| packed |\n|---|---|---|---|---|")
    for B in cfg.batch_size:
        for group in (False, True):        # prompts cut to 3/4 of --max-len, as train.py's 384 of 512
            shares = [padding_share(samples, tokenizer, B, group, cfg.max_len, cfg.max_len * 3 // 4,
                                    share, cfg.pack_len if packed else None)
                      for share, packed in ((False, False), (True, False), (True, True))]
            print(f"| {B} | {group} | " + " | ".join(f"{x:.1%}" for x in shares) + " |", flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = flags.parse(Config, argv, __doc__.split("\n")[0])
    for flag, path in (("--lengths", cfg.lengths), ("--padding", cfg.padding)):
        if path:
            flags.input_file(path, flag)
    if cfg.padding:
        tokenizer = from_pretrained(AutoTokenizer, cfg.model, "--model")
        data.check_tokenizer(tokenizer, "--model")
        return padding_table(cfg.padding, tokenizer, cfg)
    if cfg.bookkeeping:
        return bookkeeping(cfg.bookkeeping)
    if cfg.generate:
        return generation_speed(cfg)
    if cfg.e2e_worker:
        return e2e_worker(cfg)
    if cfg.e2e:
        failed = [r["e2e"] for r in e2e(cfg) if r["status"] == "failed"]
        if failed:
            raise SystemExit(f"--e2e: {len(failed)} rows failed: {', '.join(failed)}")
        return None
    if cfg.suite:
        return suite(cfg)
    return run_variant(cfg) if cfg.variant else steps(cfg, argv)


if __name__ == "__main__":
    flags.run(main)
