"""CLHA training (Fang et al. 2024, Sec. 2-3) with FSDP2 under torchrun, from one CPU to many GPUs.

    python train.py                          # no flags at all: the built-in demo (tools/demo.py)
    torchrun --nproc_per_node 8 train.py --model huggyllama/llama-7b \\
        --train data/hh2/train.rm.jsonl --dev data/hh2/dev.rm.jsonl --out runs/clha2

One optimizer step: each prompt goes through the policy once with its K candidates (best first, as
rescore.py ranked them); Eq. 3 gives each candidate's mean log-prob p_i; Eqs. 4-6 push better ones
above worse ones by a margin that grows with their rank distance, over the pairs whose rewards
differ by more than --reward-gap; Eq. 7 adds the SFT term on the top one if its reward is > 0. Read
top to bottom: config, distributed setup, the model (on meta, sharded, filled), one CLHA step, the
loop, the export. It prints the config, a progress bar and every --log-every steps a line of metrics
(also OUT/log.jsonl), and writes OUT/checkpoints/step_N and, at the end, OUT/final. What keeps the
run safe (one-line errors, checks, checkpoints, the stop vote, logs) is in harness/.
"""

import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                    fully_shard)
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

import data
from clha_loss import clha_objective
from data import UserError
from harness import checkpoints, flags, locks, logs, models, preflight, stopping
from harness.flags import opt
from harness.models import from_pretrained, parameters_on_meta


@dataclasses.dataclass
class Config:
    # the model and the data
    model: str = opt("", "causal LM to fine-tune: HF folder or hub id (no flags at all: the demo)")
    tokenizer: str = opt("", "tokenizer folder or hub id ('' = --model)")
    train: str = opt("", "training samples (data.py's format, rescored by rescore.py)")
    dev: str = opt("", "validation samples ('' = no validation)")
    out: str = opt("runs/clha", "output folder: log.jsonl, checkpoints/, final/")
    # the objective (clha_loss.py)
    loss: str = opt("clha", "clha (Eq. 7) | pro (Eq. 2 + SFT) | sft (SFT alone: 'w/o L_clha')",
                    choices=["clha", "pro", "sft"])
    margin: float = opt(3.0, "margin of Eq. 6; 0 is the 'w/o xi_adjust' ablation", at_least=0)
    reward_gap: float = opt(3.0, "Eq. 5 drops pairs with |r_i - r_j| <= this ('none': keeps all)",
                            at_least=0, none=True)
    rescore: bool = opt(True, "rewards mask pairs and gate SFT; --no-rescore: 'w/o Rescore'")
    alpha: float = opt(None, "SFT weight of Eq. 7 (default 0.05 (K - 1)^2)", at_least=0, none=True)
    reduction: str = opt("paper", "paper (Eq. 5 summed per prompt) | official (the authors' code)",
                         choices=["paper", "official"])
    # the batches (data.py)
    max_len: int = opt(512, "tokens per sequence, prompt and response",
                       at_least=preflight.MIN_RESPONSE_TOKENS + 1)
    max_prompt_len: int = opt(384, "prompt tokens kept, cut from the left", at_least=1)
    share_prompt: bool = opt(True, "each prompt once before its K candidates (--no-share-prompt: "
                                   "one row per candidate, unpacked)")
    pack: bool = opt(True, "pack a micro-batch's prompts into rows (--no-pack: one row per prompt)")
    pack_len: int = opt(1024, "tokens per packed row; a longer prompt group gets a row of its own",
                        at_least=8)
    batch_size: int = opt(2, "prompts per GPU per micro-batch, each with K candidates", at_least=1)
    global_batch: int = opt(128, "prompts per step (batch x world x accumulation)", at_least=1)
    group_by_length: bool = opt(False, "micro-batches of prompts of similar length")
    # the optimizer
    epochs: int = opt(2, "passes over the training data", at_least=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = all epochs)", at_least=0)
    lr: float = opt(5e-6, "AdamW learning rate, constant after warmup (as the paper)", above=0)
    warmup_steps: int = opt(0, "linear warmup steps (the authors use none)", at_least=0)
    lr_decay: bool = opt(False, "the learning rate falls linearly to 0 (the demo's)")
    weight_decay: float = opt(0.01, "AdamW weight decay (torch's default, as theirs)", at_least=0)
    clip: float = opt(1.0, "clip the global gradient norm to this", above=0)
    seed: int = opt(0, "data order and initialisation", at_least=0)
    max_skipped: int = opt(3, "stop after this many non-finite steps in a row (skipped)",
                           at_least=1)
    # the machine
    dtype: str = opt("bfloat16", "compute dtype (master weights fp32)",
                     choices=["bfloat16", "float32"])
    activation_checkpointing: bool = opt(True, "recompute each decoder layer in backward")
    cpu_offload: bool = opt(False, "weights, gradients and AdamW in host memory: 7B on one GPU")
    compile: bool = opt(False, "torch.compile each decoder layer")
    export_dtype: str = opt("auto", "OUT/final's dtype (auto: --model's)",
                            choices=["auto", "float32", "bfloat16", "float16"])
    # the run
    log_every: int = opt(10, "optimizer steps between log lines", at_least=1)
    eval_every: int = opt(200, "steps between validations (and at the end)", at_least=1)
    save_every: int = opt(500, "checkpoint every N steps, at the end and on SIGTERM", at_least=1)
    keep_checkpoints: int = opt(2, "sharded checkpoints kept on disk", at_least=1)
    resume: bool = opt(False, "continue from the newest intact checkpoint in --out (or start)")
    tensorboard: bool = opt(False, "also log to TensorBoard, in OUT/tensorboard")
    wandb: str = opt("", "also log to this Weights & Biases project (WANDB_MODE=offline works)")


# ---- distributed ---------------------------------------------------------------------------------

def init_distributed(cpu_offload=False):
    """torchrun's environment -> (rank, world, device). `python train.py` is a world of one."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(name, value)
    # no torchrun: a world of one, its store on a port the system picks, none in the environment
    alone = {} if "MASTER_PORT" in os.environ else dict(init_method="tcp://127.0.0.1:0", rank=0,
                                                        world_size=1)
    # The other ranks wait in the weight broadcast while rank 0 reads the whole checkpoint (13.5 GB
    # for LLaMA-7B, minutes from a network disk): NCCL's default 10 minutes can run out.
    timeout = timedelta(minutes=60)
    device = locks.local_device()              # cuda:LOCAL_RANK, or one line if there is none
    if device.type == "cuda":
        # Every CLHA batch hands attention an explicit mask, for which torch prefers cuDNN's kernel
        # on H100/H200; it has given NaN query gradients at some lengths (pytorch issue 196678).
        # The memory-efficient and math kernels take the same mask.
        torch.backends.cuda.enable_cudnn_sdp(False)
        if cpu_offload:    # gradients offloaded to the host are clipped with CPU collectives
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, **alone)
        else:
            dist.init_process_group("nccl", device_id=device, timeout=timeout, **alone)
        torch.set_float32_matmul_precision("high")            # TF32 for what runs in fp32
    else:
        dist.init_process_group("gloo", timeout=timeout, **alone)
    return dist.get_rank(), dist.get_world_size(), device


# ---- the model: built without memory, sharded, then filled ---------------------------------------

def build_model(cfg, config, device, rank, weights=True):
    """Meta-device parameters -> FSDP2 shards -> weights read once on rank 0 and broadcast into the
    shards (weights=False: random init in the shards, for benchmarks)."""
    config.use_cache = False                                       # no KV cache in training
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if cfg.share_prompt:
        models.check_layout(model.config, cfg.max_len)
    buffers = dict(model.named_buffers())                          # real values, from the modules
    apply_fsdp(model, getattr(torch, cfg.dtype), cfg.activation_checkpointing, cfg.cpu_offload,
               cfg.compile)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)    # this rank's fp32 shards only
    for name, value in buffers.items():                        # to_empty left them uninitialised
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)   # where the forward runs
    if not weights:
        for module in model.modules():
            model._init_weights(module)
        return model
    # Rank 0 reads the checkpoint in its stored dtype (fp16/bf16 for LLaMA-7B: 13.5 GB of CPU RAM,
    # on one rank only); every rank receives its shards by broadcast and keeps them in fp32.
    full = from_pretrained(AutoModelForCausalLM, cfg.model, "--model", dtype="auto").state_dict() \
        if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=True))
    return model


def apply_fsdp(model, param_dtype, activation_checkpointing, cpu_offload=False, compile=False):
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, LM head)."""
    layers = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if not layers:
        raise UserError(f"--model: {type(model).__name__} declares no decoder layers "
                        "(_no_split_modules) to shard: use a decoder such as LLaMA or Qwen2")
    for layer in layers:
        forward = layer.forward
        if compile:     # the layer's own computation: FSDP's hooks stay outside the graph
            forward = torch.compile(forward)
        if activation_checkpointing:    # keep each layer's input; recompute the rest in backward
            forward = functools.partial(recompute_in_backward, forward)   # compiled or not
        layer.forward = forward
    # Weights are all-gathered in bf16 for compute, gradients reduce-scattered in fp32, and the
    # optimizer updates fp32 shards: at lr 5e-6 a bf16 update would round away (8 bits of mantissa).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # CPU offload: the fp32 shards, their gradients and AdamW's state live in host memory; each
    # layer's weights are copied to the GPU for its forward and backward, and its gradients back.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else \
        OffloadPolicy()
    for i, layer in enumerate(layers):
        # A layer's gathered weights are freed after its forward and gathered again in backward: one
        # more all-gather per layer, for memory that does not grow with depth. Not the last layer's:
        # backward starts with it, so freeing it would only gather it again at once (as torchtitan).
        fully_shard(layer, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp, offload_policy=offload)   # the root: backward needs the head


def recompute_in_backward(forward, *args, **kwargs):
    """Activation checkpointing of one layer, inside FSDP's hooks (which must not run twice)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


# ---- the method: one CLHA step -------------------------------------------------------------------

def objective(cfg, model, batch):
    """Eq. 7 (or PRO, or the SFT term alone) on one micro-batch -> (loss, metrics)."""
    logps, sum_logps = (x.view(-1, batch["K"]) for x in data.policy_logps(model, batch))   # Eq. 3
    return clha_objective(logps, sum_logps, batch["rewards"], batch["sft_index"], loss=cfg.loss,
                          alpha=cfg.alpha, margin=cfg.margin, sft_gate=cfg.rescore,
                          reward_gap=cfg.reward_gap if cfg.rescore else None,
                          reduction=cfg.reduction)


def clha_step(cfg, model, optimizer, batches, lr, wants_to_stop, device):
    """One optimizer step on this rank's micro-batches -> (the step's sums over every rank, its
    global gradient norm, whether it was applied, the signal that stops the run or 0)."""
    sums = 0
    for batch in batches:
        batch = data.to_device(batch, device)
        loss, metrics = objective(cfg, model, batch)
        # FSDP2 reduce-scatters (averages over ranks) after every backward, so the sharded fp32
        # gradients accumulate here. Skipping that sync would keep a whole unsharded gradient on
        # every rank, in reduce_dtype (fp32: 27 GB for LLaMA-7B), to save one reduce-scatter.
        (loss / len(batches)).backward()
        sums = sums + logs.metric_row(metrics, len(batch["sft_index"]))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)   # global, sharded
    counts = (sum(b["tokens"] for b in batches), sum(len(b["sft_index"]) for b in batches))
    # the step's one all-reduce and host sync: every rank's metrics, and its wish to stop
    sums, grad_norm, stop = stopping.vote(sums, counts, grad_norm, wants_to_stop)
    applied = math.isfinite(sums[0]) and math.isfinite(grad_norm)
    if applied:                         # a non-finite loss or gradient never reaches the weights
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm, applied, stop


@torch.no_grad()
def validate(cfg, model, samples, tokenizer, rank, world, device):
    """Teacher-forced loss and pairwise accuracy on dev (no generation under FSDP), a mean over
    prompts. Every rank runs as many forwards (each all-gathers): a short one repeats, weight 0."""
    model.eval()
    sums, shard, prompts = 0, samples[rank::world], 0
    for b in range(-(-len(samples[::world]) // cfg.batch_size)):
        chunk = shard[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = data.to_device(batch_of(cfg, tokenizer, chunk or samples[:1]), device)
        sums, prompts = sums + logs.metric_row(objective(cfg, model, batch)[1], len(chunk)), \
            prompts + len(chunk)
    model.train()
    meter = logs.Meter()
    meter.add(stopping.vote(sums, (0, prompts))[0], seconds=0)
    return {k: v for k, v in meter.result().items() if k not in ("tokens", "skipped")}


# ---- the run -------------------------------------------------------------------------------------

def batch_of(cfg, tokenizer, samples):
    batch = data.make_batch(tokenizer, samples, cfg.max_len, cfg.max_prompt_len, cfg.share_prompt,
                            cfg.pack and cfg.pack_len)
    return data.pinned(batch) if torch.cuda.is_available() else batch   # copied without a wait


def steps_of_batches(cfg, samples, tokenizer, start, world, rank):
    """Yield (step, epoch, this rank's micro-batches) from step `start` on, the batches of an
    uninterrupted run, each step's tokenized in a thread while the device works on the one before
    (with a tokenizer of its own: a fast tokenizer must not be used by two threads at once)."""
    tokenizer, micro = copy.deepcopy(tokenizer), range(cfg.global_batch // (cfg.batch_size * world))
    steps = data.iterate_steps([data.sample_length(s) for s in samples], cfg.global_batch, cfg.seed,
                               cfg.epochs, start, cfg.group_by_length)
    items = ((step, epoch, [batch_of(cfg, tokenizer, [samples[i] for i in data.micro_batch(
        indices, cfg.batch_size, world, rank, m)]) for m in micro]) for step, epoch, indices in
        steps)
    with ThreadPoolExecutor(1) as worker:
        ahead = worker.submit(next, items, None)
        while (item := ahead.result()) is not None:
            ahead = worker.submit(next, items, None)
            yield item


def main(argv=None):
    cfg = flags.parse(Config, argv, __doc__.split("\n")[0])
    if not cfg.model:
        raise UserError("--model is required (python train.py with no flags at all runs the demo)")
    rank, world, device = init_distributed(cfg.cpu_offload)
    try:
        flags.output_dir(cfg.out, "--out")
        with locks.lock(os.path.join(cfg.out, ".lock"), "--out", cfg.out):     # one run per --out
            train(cfg, rank, world, device, log=print if rank == 0 else (lambda *_: None))
    finally:
        dist.destroy_process_group()


def train(cfg, rank, world, device, log):
    # setup: every check that can fail before the model loads, and the checkpoints a resume may use
    torch.manual_seed(cfg.seed)
    samples, dev, tokenizer, config, inputs = preflight.check_setup(cfg, world, log)
    resumable = checkpoints.find_resumable(cfg, inputs, rank, world, log) if cfg.resume else []
    run_log = logs.RunLog(cfg, rank, resuming=bool(resumable))   # W&B starts, before the weights

    # data: the order is a function of (seed, epoch) alone; micro-batches are tokenized a step ahead
    accumulation = cfg.global_batch // (cfg.batch_size * world)
    schedule = len(samples) // cfg.global_batch * cfg.epochs
    total = min(schedule, cfg.max_steps or schedule)
    log(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(f"{len(samples)} prompts x K = {len(samples[0]['responses'])}, {world} processes x "
        f"{cfg.batch_size} prompts x {accumulation} accumulation = {cfg.global_batch} per step; "
        f"{total} steps; {len(samples) % cfg.global_batch} prompts left out of each epoch")

    # the model, sharded before any weight exists; AdamW over the fp32 shards; a resume fills both
    model = build_model(cfg, config, device, rank, weights=not resumable)   # a resume reads its own
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda" and not cfg.cpu_offload)  # one kernel
    start = checkpoints.load(resumable, model, optimizer, rank, log)   # the newest intact one, or 0
    checkpoints.clean(cfg, start, rank)                # what a kill left, and what will be redone
    run_log.begin(total, start)

    # the loop: one step, its vote (stop here if any rank was told to), then log, validate, save
    meter, skipped = logs.Meter(), 0
    with run_log, stopping.Preemption() as preemption:
        for step, epoch, batches in steps_of_batches(cfg, samples, tokenizer, start, world, rank):
            if step >= total:                                  # --max-steps, or resumed at the end
                break
            clock, done = time.perf_counter(), step + 1
            lr = cfg.lr * min(1.0, done / (cfg.warmup_steps + 1)) * \
                (1 - step / schedule if cfg.lr_decay else 1)
            sums, grad_norm, applied, stop = clha_step(cfg, model, optimizer, batches, lr,
                                                       preemption.signal, device)
            meter.add(sums, time.perf_counter() - clock, applied)
            skipped = 0 if applied else skipped + 1                # not applied: not finite
            if done % cfg.log_every == 0 or done == total or stop or skipped >= cfg.max_skipped:
                run_log.write(logs.train_record(done, epoch, meter, lr, grad_norm, device))
            if skipped >= cfg.max_skipped:
                raise stopping.diverged(cfg.out, done, skipped)
            if dev and (done % cfg.eval_every == 0 or done == total) and not stop:
                run_log.write({"step": done, "split": "dev",
                               **validate(cfg, model, dev, tokenizer, rank, world, device)})
            if done % cfg.save_every == 0 or done == total or stop:
                checkpoints.save(cfg, model, optimizer, done, rank, world, inputs)
            run_log.advance()
            if stop:
                raise stopping.stopped(rank, stop, f"saved step {done}; rerun with --resume")
    if preemption.signal:            # it came after the last step's vote: that step is saved only
        raise stopping.stopped(rank, preemption.signal, "the last step is saved; rerun with "
                                                        "--resume to export")

    # the end: one consolidated Hugging Face checkpoint
    checkpoints.export_hf(cfg, model, tokenizer, rank)


if __name__ == "__main__":
    if len(sys.argv) == 1:       # `python train.py`, no flags at all: the demo runs in our place
        demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "demo.py")
        os.execv(sys.executable, [sys.executable, demo])
    flags.run(main)
