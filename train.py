"""CLHA training (Fang et al. 2024, Sec. 2-3) with FSDP2 under torchrun: one CPU process up to 8 GPUs and beyond.

    python train.py                        # no --model: the built-in demo, end to end on a CPU (see demo.py)
    torchrun --nproc_per_node 8 train.py --model huggyllama/llama-7b \\
        --train data/hh2/train.rm.jsonl --dev data/hh2/dev.rm.jsonl --out runs/clha2
    python train.py --model ... --cpu-offload    # one GPU of 24-80 GB: parameters, gradients, AdamW on the host

Prints the config, a progress bar, and every --log-every steps a line of metrics (also in OUT/log.jsonl).
Writes sharded, resumable checkpoints to OUT/checkpoints/step_N (--resume continues the newest complete one)
and, at the end, a consolidated Hugging Face checkpoint to OUT/final (see checkpoint.py).
"""

import dataclasses
import json
import os
import resource
import socket
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import checkpoint
import cli
import data
from cli import UserError, opt
from clha_loss import clha_objective, sequence_logps

MIN_RESPONSE_TOKENS = 16     # --max-len - --max-prompt-len: below this, candidates cut to a few tokens look alike


@dataclass
class Config:
    model: str = opt("", "causal LM to fine-tune: HF path or hub id ('' runs the built-in demo)")
    tokenizer: str = opt("", "tokenizer path or hub id ('' = --model)")
    train: str = opt("", "training samples (data.py format, rescored by rescore.py)")
    dev: str = opt("", "validation samples ('' = no validation)")
    out: str = opt("runs/clha", "output folder: log.jsonl, checkpoints/, final/")
    loss: str = opt("clha", "clha (Eq. 7) | pro (Eq. 2 + SFT) | sft (the SFT term alone: 'w/o L_clha')",
                    choices=["clha", "pro", "sft"])
    margin: float = opt(3.0, "margin of Eq. 6; 0 is the 'w/o xi_adjust' ablation", at_least=0)
    reward_gap: float = opt(3.0, "Eq. 5: pairs with |r_i - r_j| <= reward_gap are ignored ('none': keep all)",
                            at_least=0, none=True)
    rescore: bool = opt(True, "rewards mask pairs and gate SFT; the data must be sorted by reward. --no-rescore, "
                              "on data rescored with --keep-human-order, is the 'w/o Rescore' ablation")
    alpha: float = opt(None, "SFT weight of Eq. 7 (default 0.05 (K - 1)^2, Sec. 3.3)", at_least=0, none=True)
    reduction: str = opt("paper", "paper (Eq. 5 summed per prompt) | official (the authors' per-distance mean, "
                                  "which reproduces their numbers)", choices=["paper", "official"])
    max_len: int = opt(512, "tokens per sequence (block size)", at_least=MIN_RESPONSE_TOKENS + 1)
    max_prompt_len: int = opt(384, "prompt tokens kept, cut from the left (special tokens included)", at_least=1)
    epochs: int = opt(2, "passes over the training data", at_least=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = all epochs)", at_least=0)
    lr: float = opt(5e-6, "AdamW learning rate, constant after warmup", above=0)
    warmup_steps: int = opt(0, "linear warmup steps (the authors use none)", at_least=0)
    weight_decay: float = opt(0.01, "AdamW weight decay (torch's default, as in the authors' AdamW(params, lr))",
                              at_least=0)
    clip: float = opt(1.0, "clip the global gradient norm to this", above=0)
    batch_size: int = opt(2, "prompts per device per micro-batch, each with all K candidates", at_least=1)
    global_batch: int = opt(128, "prompts per optimizer step = batch_size x world x accumulation", at_least=1)
    group_by_length: bool = opt(False, "batch prompts of similar length together (less padding)")
    dtype: str = opt("bfloat16", "compute dtype under FSDP mixed precision (master weights stay fp32)",
                     choices=["bfloat16", "float32"])
    activation_checkpointing: bool = opt(True, "recompute each decoder layer in backward to save memory")
    cpu_offload: bool = opt(False, "keep parameters, gradients and AdamW state in host memory (FSDP2 "
                                   "CPUOffloadPolicy): LLaMA-7B on one GPU")
    compile: bool = opt(False, "torch.compile each decoder layer")
    export_dtype: str = opt("auto", "dtype of OUT/final: auto (the --model checkpoint's own) | float32 | "
                                    "bfloat16 | float16", choices=["auto", "float32", "bfloat16", "float16"])
    seed: int = opt(0, "data order and initialisation", at_least=0)
    log_every: int = opt(10, "optimizer steps between log lines", at_least=1)
    eval_every: int = opt(200, "optimizer steps between validations (and at the end)", at_least=1)
    save_every: int = opt(500, "optimizer steps between checkpoints (and at the end)", at_least=1)
    keep_checkpoints: int = opt(2, "sharded checkpoints kept on disk", at_least=1)
    resume: bool = opt(False, "continue from the newest complete checkpoint in --out")


def init_distributed(cpu_offload=False):
    """torchrun's environment -> (rank, world, device). A plain `python train.py` is a world of one."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as free:                              # any free port: nobody else joins
            free.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(free.getsockname()[1])
    # The other ranks wait in the weight broadcast while rank 0 reads the whole checkpoint (13.5 GB for
    # LLaMA-7B, minutes from a network disk): NCCL's default 10 minutes can run out.
    timeout = timedelta(minutes=60)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        if cpu_offload:    # gradients offloaded to the host are clipped with CPU collectives: gloo serves those
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout)
        else:
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        torch.set_float32_matmul_precision("high")                # TF32 for what runs in fp32 (--dtype float32)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def check_setup(cfg, world, log):
    """Every mistake we can see before the model loads, each with the flag to change.
    -> (train, dev, accumulation, tokenizer, model config, checkpoint to resume from or None)."""
    if not cfg.train:
        raise UserError("--train is required when --model is given (or drop every flag to run the demo)")
    for flag, path in (("--train", cfg.train), ("--dev", cfg.dev)):
        if path:
            cli.input_file(path, flag)
    if cfg.max_len - cfg.max_prompt_len < MIN_RESPONSE_TOKENS:
        raise UserError(f"--max-len {cfg.max_len} with --max-prompt-len {cfg.max_prompt_len} leaves "
                        f"{cfg.max_len - cfg.max_prompt_len} tokens for a response: give it {MIN_RESPONSE_TOKENS}")
    if cfg.global_batch % (cfg.batch_size * world):
        raise UserError(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} "
                        f"x {world} processes: change one of them")
    config = cli.from_pretrained(AutoConfig, cfg.model, "--model")
    if cfg.max_len > getattr(config, "max_position_embeddings", cfg.max_len):
        raise UserError(f"--max-len {cfg.max_len} is longer than the model's {config.max_position_embeddings} "
                        "positions (max_position_embeddings)")
    tokenizer = cli.from_pretrained(AutoTokenizer, cfg.tokenizer or cfg.model, "--tokenizer" if cfg.tokenizer
                                    else "--model")
    data.check_tokenizer(tokenizer, "--tokenizer" if cfg.tokenizer else "--model")

    train, dev = data.read_samples(cfg.train), data.read_samples(cfg.dev) if cfg.dev else []
    K, needs_rewards = len(train[0]["responses"]), cfg.rescore and cfg.loss != "pro"
    for path, samples in ((cfg.train, train), (cfg.dev, dev)):
        for s in samples:
            if len(s["responses"]) != K:
                raise UserError(f"{path}: sample {s['id']} has {len(s['responses'])} responses, the first has {K}; "
                                "every sample needs the same K (see data.add_responses)")
            if needs_rewards and s["rewards"] is None:
                raise UserError(f"{path}: sample {s['id']} has no rewards: run rescore.py on it first, "
                                "or pass --no-rescore (the 'w/o Rescore' ablation)")
            # Eq. 5's ranks are reward ranks: a file rescored with --keep-human-order would be trained the human way
            if needs_rewards and cfg.loss == "clha" and any(a < b for a, b in zip(s["rewards"], s["rewards"][1:])):
                raise UserError(f"{path}: sample {s['id']} is not sorted by reward, best first: rescore it without "
                                "--keep-human-order, or pass --no-rescore")
    if len(train) < cfg.global_batch:
        raise UserError(f"--global-batch {cfg.global_batch} is larger than the {len(train)} training samples")
    if needs_rewards:
        check_rewards(cfg, train, log)
    data.make_batch(tokenizer, train[:1], cfg.max_len, cfg.max_prompt_len)   # tokenizer and lengths work together

    cli.output_dir(cfg.out, "--out")
    if (checkpoint.step_dirs(cfg.out) or os.path.exists(os.path.join(cfg.out, "final"))) and not cfg.resume:
        raise UserError(f"--out {cfg.out} already holds a run (checkpoints/ or final/): pass --resume, or choose "
                        "another --out")
    resume_from = checkpoint.find_resumable(cfg, log) if cfg.resume else None
    if resume_from and 0 < cfg.max_steps < checkpoint.read_step(resume_from):
        raise UserError(f"--max-steps {cfg.max_steps}: {resume_from} is already past it; resume with a larger one")
    return train, dev, cfg.global_batch // (cfg.batch_size * world), tokenizer, config, resume_from


def check_rewards(cfg, train, log):
    """Eq. 5's threshold and Eq. 7's gate are in the reward model's units: say what they keep, refuse if nothing."""
    if cfg.loss == "clha" and cfg.reward_gap is not None:
        gaps = [abs(s["rewards"][i] - s["rewards"][j]) for s in train
                for i in range(len(s["rewards"])) for j in range(i + 1, len(s["rewards"]))]
        kept = sum(g > cfg.reward_gap for g in gaps) / len(gaps)
        if kept == 0:
            raise UserError(f"--reward-gap {cfg.reward_gap} keeps no pair of {cfg.train} (its largest reward gap is "
                            f"{max(gaps):.3g}): the gap is in the reward model's units, 3.0 suits OpenAssistant's; "
                            f"choose one below the median gap {statistics.median(gaps):.3g}")
        log(f"Eq. 5 keeps {kept:.1%} of the training pairs (|r_i - r_j| > {cfg.reward_gap})"
            + (": warning, very few; is --reward-gap in this reward model's units?" if kept < 0.05 else ""))
    sft_on = sum(s["rewards"][s["sft_index"]] > 0 for s in train) / len(train)
    log(f"Eq. 7's SFT term is on for {sft_on:.1%} of the prompts (SFT target reward > 0)"
        + (": warning, this reward model's zero may not mean 'good'" if sft_on < 0.05 else ""))


def build_model(cfg, config, device, rank, weights=True):
    """Meta-device model -> FSDP2 shards -> weights read once on rank 0 and broadcast into the shards
    (weights=False: random init in the shards, for benchmarks)."""
    config.use_cache = False                                       # no KV cache in training
    with torch.device("meta"):                                     # no memory yet, on any rank
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_fsdp(model, getattr(torch, cfg.dtype), cfg.activation_checkpointing, cfg.cpu_offload, cfg.compile)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)    # allocate this rank's fp32 shards only
    # Non-persistent buffers (LLaMA's rotary inv_freq) are not in the checkpoint and hold garbage after
    # to_empty: recompute them with the model's own initialiser, on the device the forward runs on.
    for module in model.modules():
        if module._non_persistent_buffers_set or not weights:
            model._init_weights(module)
        module._buffers.update({k: module._buffers[k].to(device) for k in module._non_persistent_buffers_set})
    if not weights:
        return model
    # Rank 0 reads the checkpoint in its stored dtype (fp16/bf16 for LLaMA-7B: 13.5 GB of CPU RAM, on one
    # rank only); every rank receives its shards by broadcast and keeps them in fp32.
    full = cli.from_pretrained(AutoModelForCausalLM, cfg.model, "--model", dtype="auto").state_dict() \
        if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def apply_fsdp(model, param_dtype, activation_checkpointing, cpu_offload=False, compile=False):
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, LM head)."""
    layers = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if not layers:
        raise UserError(f"--model: {type(model).__name__} declares no decoder layers (_no_split_modules) to shard: "
                        "use a transformers decoder model such as LLaMA, Mistral, Qwen2 or GPT-NeoX")
    if activation_checkpointing:   # keep only each layer's input; recompute the rest in backward
        model.activation_checkpointing_enable({"use_reentrant": False})
    for layer in layers if compile else []:
        # The layer's forward only: FSDP's all-gather hooks stay outside the graph, and identical layers share it.
        layer.forward = torch.compile(layer.forward)
    # Weights are all-gathered in bf16 for compute, gradients reduce-scattered in fp32, and the optimizer
    # updates fp32 shards: at lr 5e-6 a bf16 update would round away (bf16 has 8 bits of mantissa).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # CPU offload: the fp32 shards, their gradients and AdamW's state live in host memory; each layer's
    # weights are copied to the GPU for its forward and backward, and its gradients back.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for layer in layers:
        # reshard_after_forward=True frees each layer's gathered weights after its forward and gathers them
        # again in backward: one more all-gather per layer, for memory that no longer grows with depth.
        fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=True)
    # the root stays gathered after forward: backward needs the LM head first
    fully_shard(model, mp_policy=mp, offload_policy=offload)


def policy_logps(model, batch, K):
    """One forward over all B*K sequences (under FSDP every forward all-gathers every layer, so one pass per
    candidate would cost K times the communication) -> mean and summed response log-probs [B, K] (Eq. 3)."""
    ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    # The LM head only runs from the position that predicts the batch's earliest response token on.
    start = int(response.float().argmax(dim=1).min()) - 1
    logits = model(input_ids=ids, attention_mask=attention.long(), logits_to_keep=ids.shape[1] - start).logits
    mean, total = sequence_logps(logits, ids[:, start:], response[:, start:])   # [B*K] each
    return mean.view(-1, K), total.view(-1, K)


def objective(cfg, model, batch, K, device):
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    logps, sum_logps = policy_logps(model, batch, K)
    return clha_objective(logps, sum_logps, batch["rewards"], batch["sft_index"], loss=cfg.loss, alpha=cfg.alpha,
                          margin=cfg.margin, reward_gap=cfg.reward_gap if cfg.rescore else None,
                          sft_gate=cfg.rescore, reduction=cfg.reduction)


class Meter:
    """Sums metrics over micro-batches, each weighted by its prompts; `result` all-reduces the sums (one collective
    for every rank) and divides. acc_kept is a mean over kept pairs, so it is weighted by the kept share too."""
    names = ("loss", "loss_rank", "loss_sft", "pairs_kept", "sft_on", "acc", "acc_kept")

    def __init__(self):
        self.sums = 0

    def add(self, m, tokens, prompts):
        values = [m[k] * m["pairs_kept"] if k == "acc_kept" else m[k] for k in self.names]
        row = torch.cat([torch.stack(values).cpu(), m["logp_rank"].cpu()]).float() * prompts
        self.sums = self.sums + torch.cat([row, torch.tensor([float(tokens), prompts])])

    def result(self, device):
        sums, self.sums = self.sums.to(device), 0
        dist.all_reduce(sums)                                      # summed across ranks, not gathered as lists
        out = {k: (sums[i] / sums[-1]).item() for i, k in enumerate(self.names)}
        out["acc_kept"] = (sums[6] / sums[3].clamp(min=1e-12)).item()
        out["logp_rank"] = [round(v, 4) for v in (sums[7:-2] / sums[-1]).tolist()]
        out["tokens"] = int(sums[-2])
        return out


@torch.no_grad()
def validate(cfg, model, samples, tokenizer, K, rank, world, device):
    """Teacher-forced loss and pairwise accuracy on the dev samples (no generation under FSDP), a mean over prompts."""
    model.eval()
    meter = Meter()
    shard = samples[rank::world]
    # every rank must run the same number of forwards (each one all-gathers): pad with repeats, weight 0
    for b in range(-(-len(samples[::world]) // cfg.batch_size)):
        chunk = shard[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = data.make_batch(tokenizer, chunk or samples[:1], cfg.max_len, cfg.max_prompt_len)
        _, metrics = objective(cfg, model, batch, K, device)
        meter.add(metrics, 0, prompts=float(len(chunk)))
    model.train()
    return meter.result(device)


def memory_gb(device):
    """Peak memory so far: allocated and reserved by the caching allocator on a GPU, the process's RSS on a CPU."""
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv=None):
    cfg = cli.parse(Config, argv, __doc__.split("\n")[0])
    if not cfg.model:                      # `python train.py`, no flags: the built-in demo (demo.py)
        if cfg != Config():
            raise UserError("--model is required (python train.py with no flags at all runs the demo)")
        import demo
        return demo.main([])

    # setup: distributed, and every check that can fail before the model loads
    rank, world, device = init_distributed(cfg.cpu_offload)
    log = print if rank == 0 else (lambda *_: None)
    try:
        torch.manual_seed(cfg.seed)
        train, dev, accumulation, tokenizer, config, resume_from = check_setup(cfg, world, log)
        dist.barrier()                                    # every rank has read the checkpoints before rank 0
        checkpoint.clean(cfg, resume_from, rank)          # deletes leftovers, and the damaged ones
        dist.barrier()

        # data: samples are tokenized per micro-batch; the order is a function of (seed, epoch) alone
        K = len(train[0]["responses"])
        lengths = [data.sample_length(s) for s in train]
        steps_per_epoch = len(train) // cfg.global_batch
        total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs)
        log(json.dumps(dataclasses.asdict(cfg), indent=1))
        log(f"{len(train)} prompts x K = {K}, {world} processes x {cfg.batch_size} prompts x {accumulation} "
            f"accumulation = {cfg.global_batch} per step; {total_steps} steps; "
            f"{len(train) % cfg.global_batch} prompts left out of each epoch")

        # model, sharded before any weight exists (build_model -> apply_fsdp)
        model = build_model(cfg, config, device, rank)
        model.train()

        # optimizer over the fp32 shards; --resume restores model, optimizer, RNG and the data position
        fused = device.type == "cuda" and not cfg.cpu_offload         # one kernel for all of AdamW's updates
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        start = checkpoint.load(resume_from, model, optimizer, rank) if resume_from else 0

        # training loop
        meter, log_file = Meter(), open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
        bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="train")
        clock = time.perf_counter()
        for step, epoch, indices in data.iterate_steps(lengths, cfg.global_batch, cfg.seed, cfg.epochs, start,
                                                       cfg.group_by_length):
            if step >= total_steps:                                    # --max-steps, or resumed at the end
                break
            for micro in range(accumulation):
                chunk = [train[i] for i in data.micro_batch(indices, cfg.batch_size, world, rank, micro)]
                batch = data.make_batch(tokenizer, chunk, cfg.max_len, cfg.max_prompt_len)
                loss, metrics = objective(cfg, model, batch, K, device)
                # FSDP2 reduce-scatters (averages over ranks) after every backward, so the sharded fp32
                # gradients accumulate here. Skipping that sync would keep a full unsharded gradient on
                # every rank (13.5 GB in bf16 for 7B) to save one reduce-scatter per micro-batch.
                (loss / accumulation).backward()
                meter.add(metrics, batch["attention_mask"].sum(), prompts=float(len(chunk)))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)   # global, across shards
            lr = cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1))
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            done = step + 1

            # logging, validation, checkpoints
            if done % cfg.log_every == 0 or done == total_steps:
                record = {"step": done, "epoch": epoch, **meter.result(device), "lr": lr,
                          "grad_norm": grad_norm.full_tensor().item()}             # a DTensor under FSDP2
                memory = torch.tensor(list(memory_gb(device).values()), device=device)
                dist.all_reduce(memory, op=dist.ReduceOp.MAX)
                elapsed, clock = time.perf_counter() - clock, time.perf_counter()
                record["tokens_per_s"] = round(record["tokens"] / elapsed)
                record.update({k: round(v, 2) for k, v in zip(memory_gb(device), memory.tolist())})
                write_log(record, bar, log_file)
            if dev and (done % cfg.eval_every == 0 or done == total_steps):
                result = validate(cfg, model, dev, tokenizer, K, rank, world, device)
                write_log({"step": done, "split": "dev", **result}, bar, log_file)
                clock = time.perf_counter()
            if done % cfg.save_every == 0 or done == total_steps:
                checkpoint.save(cfg, model, optimizer, done, rank, world)
                clock = time.perf_counter()
        bar.close()

        # teardown: one consolidated Hugging Face checkpoint
        checkpoint.export_hf(cfg, model, tokenizer, rank)
    finally:
        dist.destroy_process_group()


def write_log(record, bar, log_file):
    """Rank 0 (the one with a file): a line under the progress bar and a JSON line in OUT/log.jsonl."""
    if log_file is not None:
        bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()


if __name__ == "__main__":
    cli.run(main)
