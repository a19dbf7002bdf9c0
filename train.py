"""CLHA training (Fang et al. 2024, Sec. 2-3) with FSDP2 under torchrun: one CPU process up to 8 GPUs and beyond.

    python train.py                        # no --model: the built-in demo, end to end on a CPU (see demo.py)
    torchrun --nproc_per_node 8 train.py --model huggyllama/llama-7b \\
        --train data/hh2/train.rm.jsonl --dev data/hh2/dev.rm.jsonl --out runs/clha2

Prints the config, a progress bar, and every --log-every steps a line of metrics (also in OUT/log.jsonl).
Writes sharded, resumable checkpoints to OUT/checkpoints/step_N (--resume continues the newest) and, at the
end, a consolidated Hugging Face checkpoint to OUT/final that AutoModelForCausalLM.from_pretrained loads.
"""

import argparse
import dataclasses
import json
import os
import resource
import shutil
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import data
from clha_loss import clha_objective, sequence_logps


def opt(default, help):   # a Config field with its --help text
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = opt("", "causal LM to fine-tune: HF path or hub id ('' runs the built-in demo)")
    tokenizer: str = opt("", "tokenizer path or hub id ('' = --model)")
    train: str = opt("", "training samples (data.py format, rescored by rescore.py)")
    dev: str = opt("", "validation samples ('' = no validation)")
    out: str = opt("runs/clha", "output folder: log.jsonl, checkpoints/, final/")
    loss: str = opt("clha", "clha (Eq. 7) | pro (Eq. 2 + SFT) | sft (the SFT term alone: 'w/o L_clha')")
    margin: float = opt(3.0, "margin of Eq. 6; 0 is the 'w/o xi_adjust' ablation")
    reward_gap: float = opt(3.0, "Eq. 5: pairs with |r_i - r_j| <= reward_gap are ignored ('none': keep all)")
    rescore: bool = opt(True, "rewards mask pairs and gate SFT; the data must be sorted by reward. --no-rescore, "
                              "on data rescored with --keep-human-order, is the 'w/o Rescore' ablation")
    alpha: float = opt(None, "SFT weight of Eq. 7 (default 0.05 (K - 1)^2, Sec. 3.3)")
    reduction: str = opt("paper", "paper (Eq. 5 summed per prompt) | official (the authors' per-distance mean)")
    max_len: int = opt(512, "tokens per sequence (block size)")
    max_prompt_len: int = opt(384, "prompt tokens kept, cut from the left")
    epochs: int = opt(2, "passes over the training data")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = all epochs)")
    lr: float = opt(5e-6, "AdamW learning rate, constant after warmup")
    warmup_steps: int = opt(0, "linear warmup steps (the authors use none)")
    weight_decay: float = opt(0.01, "AdamW weight decay (torch's default, as in the authors' AdamW(params, lr))")
    clip: float = opt(1.0, "clip the global gradient norm to this")
    batch_size: int = opt(2, "prompts per device per micro-batch, each with all K candidates")
    global_batch: int = opt(128, "prompts per optimizer step = batch_size x world x accumulation")
    group_by_length: bool = opt(False, "batch prompts of similar length together (less padding)")
    dtype: str = opt("bfloat16", "compute dtype under FSDP mixed precision (master weights stay fp32)")
    activation_checkpointing: bool = opt(True, "recompute each decoder layer in backward to save memory")
    seed: int = opt(0, "data order and initialisation")
    log_every: int = opt(10, "optimizer steps between log lines")
    eval_every: int = opt(200, "optimizer steps between validations (and at the end)")
    save_every: int = opt(500, "optimizer steps between checkpoints (and at the end)")
    keep_checkpoints: int = opt(2, "sharded checkpoints kept on disk")
    resume: bool = opt(False, "continue from the newest checkpoint in --out")


def parse_config(argv=None):
    """Command-line flags generated from Config, so each default is written once."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            optional = lambda s: None if s.lower() == "none" else float(s)    # --reward-gap none, --alpha none
            kind = optional if f.name in ("reward_gap", "alpha") else {"str": str, "int": int, "float": float}[
                f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return Config(**vars(parser.parse_args(argv)))


def init_distributed():
    """torchrun's environment -> (rank, world, device). A plain `python train.py` is a world of one."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as free:                              # any free port: nobody else joins
            free.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(free.getsockname()[1])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def check_setup(cfg, world):
    """Every mistake we can see before any compute, each with the flag to change. -> (train, dev, accumulation)."""
    for flag, path in (("--train", cfg.train), ("--dev", cfg.dev)):
        if path and not os.path.exists(path):
            raise SystemExit(f"{flag} {path}: no such file")
    if not cfg.train:
        raise SystemExit("--train is required when --model is given (or drop --model to run the demo)")
    if cfg.loss not in ("clha", "pro", "sft") or cfg.reduction not in ("paper", "official"):
        raise SystemExit(f"--loss {cfg.loss} / --reduction {cfg.reduction}: see --help for the choices")
    if not 2 <= cfg.max_prompt_len < cfg.max_len:
        raise SystemExit(f"--max-prompt-len {cfg.max_prompt_len} leaves no room for a response "
                         f"in --max-len {cfg.max_len}")
    small = [f for f in ("batch_size", "log_every", "eval_every", "save_every", "keep_checkpoints", "epochs")
             if getattr(cfg, f) < 1]
    if small:
        raise SystemExit(f"--{small[0].replace('_', '-')} must be at least 1")
    if cfg.global_batch % (cfg.batch_size * world):
        raise SystemExit(f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} "
                         f"x {world} processes: change one of them")
    train, dev = data.read_samples(cfg.train), data.read_samples(cfg.dev) if cfg.dev else []
    K = len(train[0]["responses"])
    for path, samples in ((cfg.train, train), (cfg.dev, dev)):
        for s in samples:
            if len(s["responses"]) != K:
                raise SystemExit(f"{path}: sample {s['id']} has {len(s['responses'])} responses, the first has {K}; "
                                 "every sample needs the same K (see data.add_responses)")
            if cfg.rescore and cfg.loss != "pro" and s["rewards"] is None:
                raise SystemExit(f"{path}: sample {s['id']} has no rewards: run rescore.py on it first, "
                                 "or pass --no-rescore (the 'w/o Rescore' ablation)")
            # Eq. 5's ranks are reward ranks: a file rescored with --keep-human-order would be trained the human way
            if cfg.rescore and cfg.loss == "clha" and any(a < b for a, b in zip(s["rewards"], s["rewards"][1:])):
                raise SystemExit(f"{path}: sample {s['id']} is not sorted by reward, best first: rescore it without "
                                 "--keep-human-order, or pass --no-rescore")
    if len(train) < cfg.global_batch:
        raise SystemExit(f"--global-batch {cfg.global_batch} is larger than the {len(train)} training samples")
    if checkpoint_dirs(cfg.out) and not cfg.resume:
        raise SystemExit(f"--out {cfg.out} already holds checkpoints: pass --resume, or choose another --out")
    if cfg.resume and not checkpoint_dirs(cfg.out):
        raise SystemExit(f"--resume: no checkpoint in {cfg.out}/checkpoints")
    return train, dev, cfg.global_batch // (cfg.batch_size * world)


def build_model(cfg, device, rank):
    """Meta-device model -> FSDP2 shards -> weights read once on rank 0 and broadcast into the shards."""
    config = AutoConfig.from_pretrained(cfg.model)
    config.use_cache = False                                       # no KV cache in training
    with torch.device("meta"):                                     # no memory yet, on any rank
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_fsdp(model, getattr(torch, cfg.dtype), cfg.activation_checkpointing)
    model.to_empty(device=device)                                  # allocate this rank's fp32 shards only
    # Non-persistent buffers (LLaMA's rotary inv_freq) are not in the checkpoint and hold garbage after
    # to_empty: recompute them with the model's own initialiser.
    for module in model.modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)
    # Rank 0 reads the checkpoint in its stored dtype (fp16/bf16 for LLaMA-7B: 13.5 GB of CPU RAM, on one
    # rank only); every rank receives its shards by broadcast and keeps them in fp32.
    full = AutoModelForCausalLM.from_pretrained(cfg.model, dtype="auto").state_dict() if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def apply_fsdp(model, param_dtype, activation_checkpointing):
    """FSDP2: shard every decoder layer, then the root (embeddings, final norm, LM head)."""
    layers = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    if not layers:
        raise SystemExit(f"{type(model).__name__} declares no decoder layers (_no_split_modules) to shard: "
                         "use a transformers decoder model such as LLaMA, Mistral, Qwen2 or GPT-NeoX")
    if activation_checkpointing:   # keep only each layer's input; recompute the rest in backward
        model.activation_checkpointing_enable({"use_reentrant": False})
    # Weights are all-gathered in bf16 for compute, gradients reduce-scattered in fp32, and the optimizer
    # updates fp32 shards: at lr 5e-6 a bf16 update would round away (bf16 has 8 bits of mantissa).
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        # reshard_after_forward=True frees each layer's gathered weights after its forward and gathers them
        # again in backward: one more all-gather per layer, for memory that no longer grows with depth.
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp)   # the root stays gathered after forward: backward needs the LM head first


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
    """Sums metrics over micro-batches; `result` all-reduces the sums (one collective for every rank) and divides.
    acc_kept is a mean over kept pairs, so it is summed weighted by the kept share to average it exactly."""
    names = ("loss", "loss_rank", "loss_sft", "pairs_kept", "sft_on", "acc", "acc_kept")

    def __init__(self):
        self.sums = 0

    def add(self, m, tokens, weight=1.0):
        values = [m[k] * m["pairs_kept"] if k == "acc_kept" else m[k] for k in self.names]
        row = torch.cat([torch.stack(values).cpu(), m["logp_rank"].cpu()]).float() * weight
        self.sums = self.sums + torch.cat([row, torch.tensor([float(tokens), weight])])

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
    """Teacher-forced loss and pairwise accuracy on the dev samples (no generation under FSDP)."""
    model.eval()
    meter = Meter()
    shard = samples[rank::world]
    # every rank must run the same number of forwards (each one all-gathers): pad with repeats, weight 0
    n_batches = -(-len(samples[::world]) // cfg.batch_size)
    for b in range(n_batches):
        chunk = shard[b * cfg.batch_size:(b + 1) * cfg.batch_size] or samples[:1]
        batch = data.make_batch(tokenizer, chunk, cfg.max_len, cfg.max_prompt_len)
        _, metrics = objective(cfg, model, batch, K, device)
        meter.add(metrics, 0, weight=float(b * cfg.batch_size < len(shard)))
    model.train()
    return meter.result(device)


def checkpoint_dirs(out):
    folder = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("step_") and not n.endswith(".tmp")) \
        if os.path.isdir(folder) else []
    return [os.path.join(folder, n) for n in names]


def save_checkpoint(cfg, model, optimizer, step, rank):
    """Sharded (each rank writes its own shards with DCP) into step_N.tmp, renamed once complete: a crash
    mid-save leaves the previous checkpoint intact. The folder must be shared by all nodes."""
    path = os.path.join(cfg.out, "checkpoints", f"step_{step:07d}")
    if rank == 0:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=path + ".tmp")
    torch.save(torch.get_rng_state(), os.path.join(path + ".tmp", f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(path + ".tmp", "meta.json"), "w") as f:
            json.dump({"step": step, "config": dataclasses.asdict(cfg)}, f, indent=1)
    dist.barrier()
    if rank == 0:
        os.replace(path + ".tmp", path)
        for old in checkpoint_dirs(cfg.out)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(cfg, model, optimizer, rank):
    """-> the step to continue from, after loading model, optimizer and RNG state of the newest checkpoint."""
    path = checkpoint_dirs(cfg.out)[-1]
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    free = {"resume", "out", "max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints",
            "batch_size", "dev", "activation_checkpointing"}   # the rest fixes the data order or the objective
    for key in sorted(set(meta["config"]) - free):
        if meta["config"][key] != getattr(cfg, key):
            raise SystemExit(f"--resume: {path} was trained with --{key.replace('_', '-')} {meta['config'][key]}, "
                             f"not {getattr(cfg, key)}")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)                            # in place, into this rank's shards
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng):
        torch.set_rng_state(torch.load(rng))
    return meta["step"]


def export_hf(cfg, model, tokenizer, rank):
    """One consolidated bf16 safetensors checkpoint with the tokenizer, gathered one tensor at a time."""
    full = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor   # all ranks take part
        if rank == 0:
            full[name] = tensor.to("cpu", torch.bfloat16)
    if rank == 0:
        config = AutoConfig.from_pretrained(cfg.model)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(full, assign=True)
        plain.save_pretrained(os.path.join(cfg.out, "final"))
        tokenizer.save_pretrained(os.path.join(cfg.out, "final"))
        print(f"saved {os.path.join(cfg.out, 'final')}")
    dist.barrier()


def write_log(record, bar, log):
    """Rank 0: a line under the progress bar and a JSON line in OUT/log.jsonl."""
    bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    log.write(json.dumps(record) + "\n")
    log.flush()


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # peak RSS of this process


def main(argv=None):
    cfg = parse_config(argv)
    if not cfg.model:                      # `python train.py`, no flags: the built-in demo (demo.py)
        if cfg != Config():
            raise SystemExit("--model is required (python train.py with no flags at all runs the demo)")
        import demo
        return demo.main()

    # setup: distributed, and every check that needs no model
    rank, world, device = init_distributed()
    try:
        torch.manual_seed(cfg.seed)
        train, dev, accumulation = check_setup(cfg, world)

        # data: samples are tokenized per micro-batch; the order is a function of (seed, epoch) alone
        K = len(train[0]["responses"])
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        lengths = [data.sample_length(s) for s in train]
        steps_per_epoch = len(train) // cfg.global_batch
        total_steps = min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs)
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            print(json.dumps(dataclasses.asdict(cfg), indent=1))
            print(f"{len(train)} prompts x K = {K}, {world} processes x {cfg.batch_size} prompts x {accumulation} "
                  f"accumulation = {cfg.global_batch} per step; {total_steps} steps; "
                  f"{len(train) % cfg.global_batch} prompts left out of each epoch")

        # model, sharded before any weight exists (build_model -> apply_fsdp)
        model = build_model(cfg, device, rank)
        model.train()

        # optimizer over the fp32 shards; --resume restores model, optimizer, RNG and the data position
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        start = load_checkpoint(cfg, model, optimizer, rank) if cfg.resume else 0

        # training loop
        meter, log = Meter(), open(os.path.join(cfg.out, "log.jsonl"), "a") if rank == 0 else None
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
                meter.add(metrics, batch["attention_mask"].sum())
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
                peak = torch.tensor(peak_memory_gb(device), device=device)
                dist.all_reduce(peak, op=dist.ReduceOp.MAX)
                elapsed, clock = time.perf_counter() - clock, time.perf_counter()
                record.update(tokens_per_s=round(record["tokens"] / elapsed), peak_mem_gb=round(peak.item(), 2))
                if rank == 0:
                    write_log(record, bar, log)
            if dev and (done % cfg.eval_every == 0 or done == total_steps):
                record = {"step": done, "split": "dev", **validate(cfg, model, dev, tokenizer, K, rank, world, device)}
                if rank == 0:
                    write_log(record, bar, log)
                clock = time.perf_counter()
            if done % cfg.save_every == 0 or done == total_steps:
                save_checkpoint(cfg, model, optimizer, done, rank)
                clock = time.perf_counter()
        bar.close()

        # teardown: one consolidated Hugging Face checkpoint
        export_hf(cfg, model, tokenizer, rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
