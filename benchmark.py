"""Benchmark: a CLHA optimizer step next to a bare causal-LM step, same tokens, same model, train.py's FSDP2 setup.

    python benchmark.py                        # a 20M-parameter LLaMA (32k vocabulary), B = 2 prompts x K = 2, T = 256
    python benchmark.py --model PATH --max-len 512 --steps 10                         # any causal LM checkpoint
    torchrun --nproc_per_node 8 benchmark.py --model huggyllama/llama-7b --variant clha   # one variant, N GPUs
    python benchmark.py --padding data/hh2/train.jsonl --model TOKENIZER --max-len 512   # padding share of batches

Prints, for each variant, tokens/s (real tokens, all ranks), step time, peak memory during the timed steps
(allocated GPU memory; on CPUs the process's resident memory, sampled every millisecond) and the padding share of
the batches, then the ratios CLHA / bare. Without --variant, each variant runs in a fresh process of its own,
so that neither inherits the other's memory. The bare step is what plain SFT costs: next-token cross-entropy
over every token of the same [B*K, T] batch. MFU (6 x parameters x tokens/s over the GPUs' bf16 peak) is shown
on A100/A800/H100/H200.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import data
import train

SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
PEAK_BF16_FLOPS = {"A100": 312e12, "A800": 312e12, "H100": 989e12, "H800": 989e12, "H200": 989e12}


def synthetic_batch(vocab_size, batch_size, K, max_len, seed):
    """B prompts x K candidates of random lengths (a prompt shared by its candidates), right-padded to T."""
    g = torch.Generator().manual_seed(seed)
    N = batch_size * K
    input_ids = torch.randint(4, vocab_size, (N, max_len), generator=g)                  # [B*K, T]
    attention_mask = torch.zeros(N, max_len, dtype=torch.bool)
    response_mask = torch.zeros(N, max_len, dtype=torch.bool)
    for b in range(batch_size):
        prompt = int(torch.randint(max_len // 4, max_len // 2, (), generator=g))
        for k in range(K):
            end = prompt + int(torch.randint(max_len // 8, max_len - prompt + 1, (), generator=g))
            attention_mask[b * K + k, :end] = True
            response_mask[b * K + k, prompt:end] = True
    input_ids[~attention_mask] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "rewards": torch.randn(batch_size, K, generator=g) * 5,
            "sft_index": torch.zeros(batch_size, dtype=torch.long)}


class PeakRSS:
    """Peak resident memory of this process since start(), sampled every millisecond: ru_maxrss cannot be reset,
    and would report the model loading rather than the training steps."""
    def __init__(self):
        self.peak, self.running = 0, False

    def start(self):
        self.peak, self.running = 0, True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        page = os.sysconf("SC_PAGE_SIZE")
        while self.running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
            time.sleep(0.001)

    def stop_gb(self):
        self.running = False
        return self.peak / 2**30


def bare_lm_loss(model, batch, device):
    """Plain next-token cross-entropy over every real token: the baseline a CLHA step is compared with."""
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    return model(input_ids=ids, attention_mask=attention.long(), labels=ids.masked_fill(~attention, -100)).loss


def padding_share(samples, tokenizer, batch_size, group_by_length, max_len=512, max_prompt_len=384, seed=0):
    """Share of the tokens in one epoch of train.py's [B*K, T] batches that are padding."""
    lengths = [data.sample_length(s) for s in samples]                 # what train.py groups by
    padded = real = 0
    for step in data.step_batches(lengths, batch_size, seed, 0, group_by_length):
        chunk = [samples[i] for i in step]
        batch = data.make_batch(tokenizer, chunk, max_len, max_prompt_len)
        padded, real = padded + batch["input_ids"].numel(), real + batch["attention_mask"].sum().item()
    return 1 - real / padded


def run_variant(args):
    """Time optimizer steps of one variant; print one JSON line (rank 0)."""
    rank, world, device = train.init_distributed()
    try:
        cfg = train.Config(model=args.model, dtype=args.dtype, activation_checkpointing=args.activation_checkpointing)
        model = train.build_model(cfg, device, rank)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        vocab, rss = model.config.vocab_size, PeakRSS()
        batches = [synthetic_batch(vocab, args.batch_size, args.k, args.max_len, seed=rank * 1000 + i)
                   for i in range(args.warmup + args.steps)]
        for i, batch in enumerate(batches):
            if i == args.warmup:                                       # the clock starts after the warmup steps
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    rss.start()
                dist.barrier()
                start = time.perf_counter()
            if args.variant == "clha":
                loss, _ = train.objective(cfg, model, batch, args.k, device)
            else:
                loss = bare_lm_loss(model, batch, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        seconds = (time.perf_counter() - start) / args.steps
        tokens = torch.tensor(float(sum(b["attention_mask"].sum() for b in batches[args.warmup:])), device=device)
        peak = torch.tensor(train.peak_memory_gb(device) if device.type == "cuda" else rss.stop_gb(), device=device)
        dist.all_reduce(tokens)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        padding = 1 - sum(b["attention_mask"].float().mean() for b in batches).item() / len(batches)
        params = sum(p.numel() for p in model.parameters())
        result = {"variant": args.variant, "tokens_per_s": tokens.item() / args.steps / seconds,
                  "step_s": seconds, "peak_gb": peak.item(), "padding": padding, "params": params, "world": world,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
        result["mfu"] = 6 * params * result["tokens_per_s"] / (world * peak_flops) if peak_flops else None
        if rank == 0:
            print("RESULT " + json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="causal LM checkpoint ('' = a 20M-parameter LLaMA, random init)")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per device")
    parser.add_argument("--k", type=int, default=2, help="candidates per prompt")
    parser.add_argument("--max-len", type=int, default=256, help="T, tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        help="compute dtype (default: bfloat16 on GPUs; float32 on CPUs, which run bf16 slowly)")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--variant", choices=["clha", "lm"], help="run only this variant, in this process")
    parser.add_argument("--padding", metavar="SAMPLES", help="instead: the padding share of SAMPLES' batches, "
                        "with and without --group-by-length, tokenized by --model's tokenizer")
    args = parser.parse_args()
    if args.padding:
        samples, tokenizer = data.read_samples(args.padding), AutoTokenizer.from_pretrained(args.model)
        for group in (False, True):
            share = padding_share(samples, tokenizer, args.batch_size, group, args.max_len)
            print(f"{args.padding}: B = {args.batch_size}, --group-by-length {group}: {share:.1%} padding")
        return
    if args.variant:
        return run_variant(args)

    with tempfile.TemporaryDirectory() as folder:
        if not args.model:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(folder)
            args.model = folder
        results = {}
        for variant in ("lm", "clha"):
            command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--model", args.model,
                       "--variant", variant]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"the {variant} run failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(lines[-1][len("RESULT "):])
    lm, clha = results["lm"], results["clha"]
    print(f"{lm['params'] / 1e6:.1f}M parameters on {lm['world']} x {lm['device']}, {args.dtype}, "
          f"B = {args.batch_size} prompts x K = {args.k}, T = {args.max_len}, padding {lm['padding']:.1%}, "
          f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}")
    print("| step | tokens/s | step time (s) | peak memory (GB) | MFU |\n|---|---|---|---|---|")
    for name, r in (("bare causal LM", lm), ("CLHA", clha)):
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['peak_gb']:.2f} | {mfu} |")
    print(f"| CLHA / bare | {clha['tokens_per_s'] / lm['tokens_per_s']:.2f}x | | "
          f"{clha['peak_gb'] / lm['peak_gb']:.2f}x | |")


if __name__ == "__main__":
    main()
