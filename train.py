"""CLHA training (Fang et al. 2024, Sec. 2-3) with FSDP2 under torchrun: one CPU process up to 8 GPUs and beyond.

    python train.py                        # no flags at all: the built-in demo, end to end on a CPU (demo.py)
    torchrun --nproc_per_node 8 train.py --model huggyllama/llama-7b \\
        --train data/hh2/train.rm.jsonl --dev data/hh2/dev.rm.jsonl --out runs/clha2
    python train.py --model ... --cpu-offload    # one GPU of 24-80 GB: parameters, gradients, AdamW on the host

Prints the config, a progress bar, and every --log-every steps a line of metrics (also in OUT/log.jsonl, and
with --tensorboard / --wandb in those; see logs.py). Writes sharded, resumable checkpoints to
OUT/checkpoints/step_N (--resume continues the newest complete one, or starts if there is none) and, at the
end, a consolidated Hugging Face checkpoint to OUT/final (checkpoint.py). SIGTERM or SIGINT (a preemption,
Ctrl-C) finishes the step in flight, saves it and exits with status 128 + the signal's number; give it the time
(torchrun --shutdown-timeout, 30 s by default, before torchrun's SIGKILL; README: "When things go wrong").

Each optimizer step: every prompt with its K candidates (best first, as rescore.py ranked them) goes through the
policy once; Eq. 3 gives each candidate's mean log-prob p_i; Eqs. 4-6 push better candidates above worse ones by
a margin that grows with their rank distance, over the pairs whose rewards differ by more than --reward-gap;
Eq. 7 adds the SFT term on the top candidate where its reward is positive (clha_loss.py).
"""

import contextlib
import dataclasses
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import checkpoint
import outputs
import cli
import data
import logs
from clha_loss import clha_objective, response_logps
from cli import opt
from data import UserError

MIN_RESPONSE_TOKENS = 16     # --max-len - --max-prompt-len: below this, candidates cut to a few tokens look alike


@dataclass
class Config:
    model: str = opt("", "causal LM to fine-tune: HF path or hub id (python train.py with no flags runs the demo)")
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
    share_prompt: bool = opt(True, "one row per prompt, its K candidates after it (the same numbers, fewer FLOPs); "
                                   "--no-share-prompt: one row per candidate")
    epochs: int = opt(2, "passes over the training data", at_least=1)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = all epochs)", at_least=0)
    lr: float = opt(5e-6, "AdamW learning rate, constant after warmup (as the paper)", above=0)
    warmup_steps: int = opt(0, "linear warmup steps (the authors use none)", at_least=0)
    lr_decay: bool = opt(False, "let the learning rate fall linearly to 0 over the epochs (the demo's)")
    weight_decay: float = opt(0.01, "AdamW weight decay (torch's default, as the authors' AdamW(params, lr))",
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
    export_dtype: str = opt("auto", "dtype of OUT/final: auto (the --model checkpoint's own) | float32 | bfloat16 | "
                                    "float16", choices=["auto", "float32", "bfloat16", "float16"])
    seed: int = opt(0, "data order and initialisation", at_least=0)
    log_every: int = opt(10, "optimizer steps between log lines", at_least=1)
    eval_every: int = opt(200, "optimizer steps between validations (and at the end)", at_least=1)
    save_every: int = opt(500, "optimizer steps between checkpoints (and at the end, or on SIGTERM)", at_least=1)
    keep_checkpoints: int = opt(2, "sharded checkpoints kept on disk", at_least=1)
    resume: bool = opt(False, "continue from the newest complete checkpoint in --out (start if there is none)")
    tensorboard: bool = opt(False, "also log to TensorBoard, in OUT/tensorboard (pip install tensorboard)")
    wandb: str = opt("", "also log to this Weights & Biases project (pip install wandb; WANDB_MODE=offline)")


# ---- distributed ----------------------------------------------------------------------------------------------

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


# ---- the model: built without memory, sharded, then filled -----------------------------------------------------

@contextlib.contextmanager
def parameters_on_meta():
    """Build a model whose parameters take no memory (the meta device) while its buffers are computed for real
    by each module's own __init__ (rotary inv_freq and the like). Those buffers are not in any checkpoint, and
    transformers rebuilds them only for the modules its initialiser knows (even in from_pretrained)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:          # a tied weight is already there: keep it the same object
            param = torch.nn.Parameter(param.to("meta"), param.requires_grad)
        register(module, name, param)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_model(cfg, config, device, rank, weights=True):
    """Meta-device parameters -> FSDP2 shards -> weights read once on rank 0 and broadcast into the shards
    (weights=False: random init in the shards, for benchmarks)."""
    config.use_cache = False                                       # no KV cache in training
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if cfg.share_prompt:
        check_shared_layout(model.config, cfg.max_len)
    buffers = dict(model.named_buffers())                          # real values, computed by the modules
    apply_fsdp(model, getattr(torch, cfg.dtype), cfg.activation_checkpointing, cfg.cpu_offload, cfg.compile)
    model.to_empty(device="cpu" if cfg.cpu_offload else device)    # allocate this rank's fp32 shards only
    for name, value in buffers.items():                            # to_empty left the buffers uninitialised
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)   # on the device the forward runs on
    if not weights:
        for module in model.modules():
            model._init_weights(module)
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
    for i, layer in enumerate(layers):
        # A layer's gathered weights are freed after its forward and gathered again in backward: one more
        # all-gather per layer, for memory that does not grow with depth. Not the last layer's: backward
        # starts with it, so freeing it would only gather it again at once (torchtitan keeps it too).
        fully_shard(layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=i < len(layers) - 1)
    # the root stays gathered after forward: backward needs the LM head first
    fully_shard(model, mp_policy=mp, offload_policy=offload)


def check_shared_layout(config, max_len, flag="--model"):
    """The shared-prompt layout hands the attention a [B, 1, L, L] mask of its own: sdpa and eager take it (see
    attention_mask); flash attention would ignore it, and a sliding window shorter than a sequence would not apply."""
    impl, window = config._attn_implementation, getattr(config, "sliding_window", None)
    if impl not in ("sdpa", "eager"):
        raise UserError(f"{flag}: its attention ({impl}) cannot take the shared-prompt mask: pass --no-share-prompt")
    if window and max_len > window:
        raise UserError(f"{flag}: its sliding window ({window}) is shorter than --max-len {max_len}, which the shared-"
                        "prompt mask would not apply: pass --no-share-prompt")


def attention_mask(model, mask):
    """The batch's mask as the model's attention takes it. A [R, 1, L, L] one (the shared layout): sdpa reads True
    as 'may attend'; eager adds the mask to its scores, so it gets 0 and a large negative number (True would add 1)."""
    if mask.dim() == 4 and model.config._attn_implementation == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


# ---- the method ---------------------------------------------------------------------------------------------

def policy_logps(model, batch):
    """Eq. 3 for every candidate of a batch from data.make_batch, in either layout -> mean and summed response
    log-probs [N], N = B * K prompt-major. Under FSDP every forward all-gathers every layer, so all candidates go
    through one forward (one per candidate would cost K times the communication); the LM head runs only from the
    first column whose logit predicts a response token."""
    rows, cols = batch["predict"]                                  # [M] each: where each response token's logit is
    first = int(cols.min())
    logits = model(input_ids=batch["input_ids"], attention_mask=attention_mask(model, batch["attention_mask"]),
                   position_ids=batch["position_ids"], logits_to_keep=batch["input_ids"].shape[1] - first).logits
    return response_logps(logits[rows, cols - first], batch["targets"], batch["lengths"])   # Eq. 3


def objective(cfg, model, batch, device):
    """Eq. 7 (or PRO, or the SFT term alone) on one micro-batch -> (loss, metrics)."""
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    logps, sum_logps = (x.view(-1, batch["K"]) for x in policy_logps(model, batch))   # [B, K] each
    return clha_objective(logps, sum_logps, batch["rewards"], batch["sft_index"], loss=cfg.loss, alpha=cfg.alpha,
                          margin=cfg.margin, reward_gap=cfg.reward_gap if cfg.rescore else None,
                          sft_gate=cfg.rescore, reduction=cfg.reduction)


@torch.no_grad()
def validate(cfg, model, samples, tokenizer, rank, world, device):
    """Teacher-forced loss and pairwise accuracy on the dev samples (no generation under FSDP), a mean over prompts."""
    model.eval()
    meter, shard = logs.Meter(), samples[rank::world]
    # every rank must run the same number of forwards (each one all-gathers): pad with repeats, weight 0
    for b in range(-(-len(samples[::world]) // cfg.batch_size)):
        chunk = shard[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        batch = data.make_batch(tokenizer, chunk or samples[:1], cfg.max_len, cfg.max_prompt_len, cfg.share_prompt)
        meter.add(objective(cfg, model, batch, device)[1], tokens=0, prompts=len(chunk))
    model.train()
    meter.step(device)
    return {k: v for k, v in meter.result().items() if k != "tokens"}


# ---- the run ------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = cli.parse(Config, argv, __doc__.split("\n")[0])
    if not cfg.model:
        raise UserError("--model is required (python train.py with no flags at all runs the demo)")
    rank, world, device = init_distributed(cfg.cpu_offload)
    try:
        cli.output_dir(cfg.out, "--out")
        with outputs.lock(os.path.join(cfg.out, ".lock"), "--out", cfg.out):   # one run per --out
            train(cfg, rank, world, device, log=print if rank == 0 else (lambda *_: None))
    finally:
        dist.destroy_process_group()


def train(cfg, rank, world, device, log):
    # setup: every check that can fail before the model loads, and what a resume continues
    torch.manual_seed(cfg.seed)
    samples, dev, tokenizer, config, inputs = check_setup(cfg, world, log)
    resume_from = checkpoint.find_resumable(cfg, inputs, log) if cfg.resume else None
    dist.barrier()                                    # every rank has read the checkpoints before rank 0 cleans up
    checkpoint.clean(cfg, resume_from, rank)          # leftovers of a kill, and the damaged checkpoints
    dist.barrier()

    # data: samples are tokenized per micro-batch; the order is a function of (seed, epoch) alone
    accumulation = cfg.global_batch // (cfg.batch_size * world)
    lengths, schedule = [data.sample_length(s) for s in samples], len(samples) // cfg.global_batch * cfg.epochs
    total = min(schedule, cfg.max_steps or schedule)
    log(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(f"{len(samples)} prompts x K = {len(samples[0]['responses'])}, {world} processes x {cfg.batch_size} prompts "
        f"x {accumulation} accumulation = {cfg.global_batch} per step; {total} steps; "
        f"{len(samples) % cfg.global_batch} prompts left out of each epoch")

    # model, sharded before any weight exists; the optimizer over the fp32 shards; a resume restores both
    model = build_model(cfg, config, device, rank)
    model.train()
    fused = device.type == "cuda" and not cfg.cpu_offload          # one kernel for all of AdamW's updates
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    start = checkpoint.load(resume_from, model, optimizer, rank) if resume_from else 0

    # training loop: one optimizer step, then the step's one all-reduce (its metrics, and whether any rank was
    # told to stop: then all stop here), then logging, validation and checkpoints as they fall due
    meter = logs.Meter()
    with logs.RunLog(cfg, rank, total, start) as run_log, Preemption() as preemption:
        for step, epoch, indices in data.iterate_steps(lengths, cfg.global_batch, cfg.seed, cfg.epochs, start,
                                                       cfg.group_by_length):
            if step >= total:                                          # --max-steps, or resumed at the end
                break
            clock = time.perf_counter()
            lr = cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1)) * (1 - step / schedule if cfg.lr_decay else 1)
            chunks = [[samples[i] for i in data.micro_batch(indices, cfg.batch_size, world, rank, micro)]
                      for micro in range(accumulation)]
            batches = [data.make_batch(tokenizer, c, cfg.max_len, cfg.max_prompt_len, cfg.share_prompt) for c in chunks]
            grad_norm = optimizer_step(cfg, model, optimizer, batches, lr, meter, device)
            stop, done = meter.step(device, time.perf_counter() - clock, preemption.signal), step + 1
            if done % cfg.log_every == 0 or done == total or stop:
                run_log.write(logs.train_record(done, epoch, meter, lr, grad_norm, device))
            if dev and (done % cfg.eval_every == 0 or done == total) and not stop:   # a stop saves at once
                run_log.write({"step": done, "split": "dev", **validate(cfg, model, dev, tokenizer, rank, world,
                                                                         device)})
            if done % cfg.save_every == 0 or done == total or stop:
                checkpoint.save(cfg, model, optimizer, done, rank, world, inputs)
            run_log.advance()
            if stop:
                print(f"stopped by {signal.Signals(stop).name}: saved step {done}; rerun with --resume",
                      file=sys.stderr, flush=True) if rank == 0 else None
                raise SystemExit(128 + stop)
    if preemption.signal:                 # it came after the last step's vote: that step is saved, not exported
        print(f"stopped by {signal.Signals(preemption.signal).name} after the last step, which is saved; rerun "
              "with --resume to export it", file=sys.stderr, flush=True) if rank == 0 else None
        raise SystemExit(128 + preemption.signal)

    # teardown: one consolidated Hugging Face checkpoint
    checkpoint.export_hf(cfg, model, tokenizer, rank)


def optimizer_step(cfg, model, optimizer, batches, lr, meter, device):
    """This rank's micro-batches of one optimizer step: Eq. 7 on each, gradients accumulated, clipped, AdamW."""
    for batch in batches:
        loss, metrics = objective(cfg, model, batch, device)
        # FSDP2 reduce-scatters (averages over ranks) after every backward, so the sharded fp32 gradients
        # accumulate here. Skipping that sync would keep a whole unsharded gradient on every rank, in
        # reduce_dtype (fp32: 27 GB for LLaMA-7B), to save one reduce-scatter per micro-batch.
        (loss / len(batches)).backward()
        meter.add(metrics, batch["tokens"], len(batch["sft_index"]))
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)     # global, across the shards
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class Preemption:
    """SIGTERM (what Slurm and Kubernetes send before SIGKILL) or SIGINT (Ctrl-C) during the loop: remember it, so
    the loop finishes the step in flight, agrees with the other ranks, saves, and exits with 128 + its number."""

    def __enter__(self):
        self.signal, self.previous = 0, {}
        if threading.current_thread() is threading.main_thread():      # the only thread that may set handlers
            for s in (signal.SIGTERM, signal.SIGINT):
                self.previous[s] = signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal:     # Ctrl-C twice: stop now (SIGTERM may come twice, from
            signal.default_int_handler(signum, frame)   # the scheduler and from torchrun, and must not)
        self.signal = self.signal or signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---- setup checks: every mistake we can see before the model loads ----------------------------------------------

def check_setup(cfg, world, log):
    """-> (train samples, dev samples, tokenizer, model config, fingerprints of --train and --dev)."""
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
    flag = "--tokenizer" if cfg.tokenizer else "--model"
    tokenizer = cli.from_pretrained(AutoTokenizer, cfg.tokenizer or cfg.model, flag)
    data.check_tokenizer(tokenizer, flag)
    logs.check_loggers(cfg)                               # the optional libraries, before a long load
    samples, dev = data.read_samples(cfg.train), data.read_samples(cfg.dev) if cfg.dev else []
    check_samples(cfg, samples, dev, log)
    data.make_batch(tokenizer, samples[:1], cfg.max_len, cfg.max_prompt_len)   # tokenizer and lengths work together
    inputs = {"--train": outputs.fingerprint(cfg.train), "--dev": outputs.fingerprint(cfg.dev) if cfg.dev
              else None}
    if (checkpoint.step_dirs(cfg.out) or os.path.exists(os.path.join(cfg.out, "final"))) and not cfg.resume:
        raise UserError(f"--out {cfg.out} already holds a run (checkpoints/ or final/): pass --resume, or choose "
                        "another --out")
    return samples, dev, tokenizer, config, inputs


def check_samples(cfg, samples, dev, log):
    """One K for every sample; rewards where the objective needs them, sorted best first (Eq. 5's ranks are reward
    ranks); and Eq. 5's threshold and Eq. 7's gate, which are in the reward model's units: say what they keep."""
    K, needs_rewards = len(samples[0]["responses"]), cfg.rescore and cfg.loss != "pro"
    for path, part in ((cfg.train, samples), (cfg.dev, dev)):
        for s in part:
            if len(s["responses"]) != K:
                raise UserError(f"{path}: sample {s['id']} has {len(s['responses'])} responses, the first has {K}; "
                                "every sample needs the same K (see data.add_responses)")
            if needs_rewards and s["rewards"] is None:
                raise UserError(f"{path}: sample {s['id']} has no rewards: run rescore.py on it first, "
                                "or pass --no-rescore (the 'w/o Rescore' ablation)")
            if needs_rewards and cfg.loss == "clha" and any(a < b for a, b in zip(s["rewards"], s["rewards"][1:])):
                raise UserError(f"{path}: sample {s['id']} is not sorted by reward, best first: rescore it without "
                                "--keep-human-order, or pass --no-rescore")
    if len(samples) < cfg.global_batch:
        raise UserError(f"--global-batch {cfg.global_batch} is larger than the {len(samples)} training samples")
    if not needs_rewards:
        return
    if cfg.loss == "clha" and cfg.reward_gap is not None:
        gaps = [abs(r[i] - r[j]) for r in (s["rewards"] for s in samples) for i in range(K) for j in range(i + 1, K)]
        kept = sum(g > cfg.reward_gap for g in gaps) / len(gaps)
        if kept == 0:
            raise UserError(f"--reward-gap {cfg.reward_gap} keeps no pair of {cfg.train} (its largest reward gap is "
                            f"{max(gaps):.3g}): the gap is in the reward model's units, 3.0 suits OpenAssistant's; "
                            f"choose one below the median gap {statistics.median(gaps):.3g}")
        log(f"Eq. 5 keeps {kept:.1%} of the training pairs (|r_i - r_j| > {cfg.reward_gap})"
            + (": warning, very few; is --reward-gap in this reward model's units?" if kept < 0.05 else ""))
    sft_on = sum(s["rewards"][s["sft_index"]] > 0 for s in samples) / len(samples)
    log(f"Eq. 7's SFT term is on for {sft_on:.1%} of the prompts (SFT target reward > 0)"
        + (": warning, this reward model's zero may not mean 'good'" if sft_on < 0.05 else ""))


if __name__ == "__main__":
    if len(sys.argv) == 1:       # `python train.py`, no flags at all: the built-in demo is demo.py, run in our place
        demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
        os.execv(sys.executable, [sys.executable, demo])
    cli.run(main)
