"""The GPU suite: train.py's own pipeline end to end, then tools/benchmark.py's step timings.

    python tools/benchmark.py --suite                # one GPU, < 8 min (--suite-budget-s 480)
    python tools/benchmark.py --e2e                  # the end-to-end block alone, on any device
    python tools/benchmark.py --e2e --e2e-rows train resume --e2e-dir e2e-files   # some rows, kept

No GPU has run any of this yet: --e2e runs on a CPU in the tests (tests/test_suite.py), --suite
refuses to start without CUDA.

--suite runs every row in a process of its own under a timeout, all within one budget, so that a
cold compile or a hang costs its row, not the GPU session's few minutes. First the end-to-end
block, what has never met a GPU, on a tiny model it saves itself: train.py under torchrun in bf16
(on 1 GPU, and on 2 against the 1-GPU losses), a SIGKILL and --resume (the uninterrupted run's
losses, an export that reloads), evaluate.py on the export, the gradients at a row length that
trips cuDNN's attention (pytorch/pytorch#196678), and --cpu-offload's host memory, each checked.
Then the step benchmarks: llama-1b at the paper's micro-batch in every variant, LLaMA-7B CLHA
(with --cpu-offload where its fp32 state does not fit the GPU), generation, no activation
checkpointing, and --compile last.

It prints a RESULT JSON line per row (FAILED and the tail of its output for a row that fails), then
benchmark.py's step table, the generation speeds and the end-to-end table; --suite exits with an
error if any row failed, --e2e if any of its rows did.

The flags are benchmark.py's (its Config), which imports this module and hands it its step pieces
(VARIANTS, table, environment): this module imports nothing of benchmark.py's. Each row's worker
process runs through benchmark.py too (--e2e-worker).
"""

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import data
import train
from data import UserError
from harness.files import write_jsonl
from tools.prepare_hh_rlhf import read_hh_rlhf

# --e2e's rows, in order, and each one's timeout in seconds (of a GPU's; a CPU takes 5-25 s a row)
E2E_ROWS = {"train": 75, "train_2gpu": 60, "resume": 150, "evaluate": 45, "gradients": 90,
            "offload": 50}

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
# benchmark.py: the flags, a step benchmark's process, and each row's worker (--e2e-worker)
BENCHMARK = [sys.executable, os.path.join(REPO, "tools", "benchmark.py")]
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
    train_samples, test_samples = (ranked(read_hh_rlhf(raw[s])[0]) for s in ("train", "test"))
    names = ("train.jsonl", "dev.jsonl", "test.jsonl", "base", "rm")
    paths = {name: os.path.join(folder, name) for name in names}
    write_jsonl(paths["train.jsonl"], train_samples)
    write_jsonl(paths["dev.jsonl"], test_samples[:8])
    write_jsonl(paths["test.jsonl"], test_samples[8:])
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
    if os.path.exists(os.path.join(out, "final")) or kept[-1] >= E2E_STEPS:
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
    result["reload"] = row.result(BENCHMARK + ["--e2e-worker", "reload", "--model", final])
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
                  "head_dim": dim, "dtype": tcfg.dtype, "as_train_py": attempt(),
                  "cudnn_allowed": "skipped: no CUDA"}
        print("RESULT " + json.dumps(result), flush=True)   # printed now, should what follows fault
        if device.type == "cuda":                  # for information: train.py does not allow it
            result["cudnn_allowed"] = with_cudnn_first(attempt)
            result["cudnn_version"] = torch.backends.cudnn.version()
            print("RESULT " + json.dumps(result), flush=True)
            os._exit(0)           # after a CUDA fault, tearing the process group down can hang
    finally:
        dist.destroy_process_group()


def with_cudnn_first(attempt):
    """attempt() with cuDNN's attention allowed and tried first, as torch orders it on H100/H200
    only with a recent cuDNN (else it may not run at all) -> its result, or the error it raised."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        with sdpa_kernel(first, set_priority=True):
            return attempt()
    except Exception as e:
        return f"error: {type(e).__name__}: {e}"[:300]
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def e2e_offload(cfg):
    """train.py --cpu-offload for 2 steps in this process, under torchrun: its peak host memory
    (ru_maxrss: this process is the worker), and on CUDA the pinned host allocator's bytes (it
    rounds every block up to a power of two) against the fp32 shards and their gradients, which
    FSDP2 pins."""
    assets, built, build = read_assets(cfg.e2e_dir), [], train.build_model
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # peak so far

    def keep(*args, **kwargs):      # the model train.main builds, to count; CUDA has started
        built.append((rss(), build(*args, **kwargs)))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_host_memory_stats()         # the batches pinned so far too
        return built[-1][1]
    train.build_model = keep
    train.main(e2e_train_args(assets, os.path.join(cfg.e2e_dir, "offload"), "--cpu-offload",
                              "--max-steps", "2"))
    if int(os.environ.get("RANK", "0")):
        return
    before, model = built[0]
    shards = [p.to_local() for p in model.parameters()]
    shard_bytes = sum(s.numel() * s.element_size() for s in shards)
    result = {"steps": 2, "peak_rss_gb": round(rss() / 2**30, 3),
              "rss_before_model_gb": round(before / 2**30, 3),     # the CUDA context, libraries
              "shards_on_host": all(s.device.type == "cpu" for s in shards),
              "shard_mb": round(shard_bytes / 2**20, 3)}
    if torch.cuda.is_available():
        stats = torch.cuda.memory.host_memory_stats()
        mb = lambda key: round(stats[key] / 2**20, 3) if key in stats else f"no {key} here"
        rounded = sum(1 << max(s.untyped_storage().nbytes() - 1, 0).bit_length() for s in shards)
        result["pinned"] = {"shards_pinned": all(s.is_pinned() for s in shards),
                            "allocated_peak_mb": mb("allocated_bytes.peak"),
                            "active_peak_mb": mb("active_bytes.peak"),
                            "shards_rounded_up_mb": round(rounded / 2**20, 3),
                            "allocated_over_shards_and_grads": round(
                                stats["allocated_bytes.peak"] / (2 * shard_bytes), 3)
                            if "allocated_bytes.peak" in stats else None}
    else:
        result["pinned"] = "skipped: no CUDA"
    print("RESULT " + json.dumps(result), flush=True)


def e2e_gradients_row(row, folder):
    """The gradients row: its worker's findings; every gradient finite as train.py sets attention
    up, the model's and the trigger's."""
    found = row.result(BENCHMARK + ["--e2e-dir", folder, "--e2e-worker", "gradients"])
    ours = found["as_train_py"]
    if not (ours["grads_finite"] and ours["trigger_grad_q_finite"]):
        raise RowFailed(f"non-finite gradients at L = {found['L']} as train.py sets attention up "
                        f"({'/'.join(ours['backends'])}): model {ours['grads_finite']}, trigger "
                        f"{ours['trigger_grad_q_finite']}", found=found)
    return found


def e2e_offload_row(row, folder):
    """The offload row: its worker's findings; the shards must be in host memory."""
    found = row.result(TORCHRUN + ["--nproc-per-node=1", *BENCHMARK[1:], "--e2e-dir", folder,
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
        lines = [x for x in step.run(BENCHMARK + argv).splitlines() if x.startswith("RESULT ")]
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


def suite(cfg, variants, step_table, environment):
    """The README's GPU measurements on one GPU, each in a fresh process under a timeout, all
    within --suite-budget-s: first the end-to-end block (train.py's pipeline meeting the GPU), then
    llama-1b at the paper's micro-batch, LLaMA-7B CLHA (with --cpu-offload where 7B's 108 GB of
    fp32 state does not fit), generation, and last what matters least (no activation
    checkpointing; --compile, whose cold start is the slowest). variants, step_table and
    environment: benchmark.py's VARIANTS, table and environment, which it passes in."""
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
    rows = [(paper + ["--variant", v], 120) for v in variants]               # (argv, timeout)
    rows.append((["--generate", "--arch", "llama-1b"], 120))
    seven_b = ["--arch", "llama-7b", "--batch-size", "2", "--k", "2", "--max-len", "512",
               "--steps", "3", "--variant", "clha_packed"]
    if gpu_gb >= 120:
        rows.append((seven_b, 300))
    elif host_gb >= 130:
        rows.append((seven_b + ["--cpu-offload"], 300))
    else:
        print(f"skipping LLaMA-7B: {gpu_gb:.0f} GB of GPU and {host_gb:.0f} GB of host memory "
              "hold less than its 108 GB of fp32 weights, gradients and AdamW state")
    rows += [(paper + ["--variant", v, "--no-activation-checkpointing"], 120) for v in variants]
    rows.append((paper + ["--variant", "clha_packed", "--compile"], 240))
    results, failed = [], sum(r["status"] == "failed" for r in e2e_results)
    peak = [f"--peak-tflops={cfg.peak_tflops}"] if cfg.peak_tflops else []
    for argv, timeout in rows:
        left = deadline - time.monotonic()
        if left < max(30, 0.6 * timeout):     # cut short, a row would only fail: not started
            print(f"skipped ({left:.0f} s of --suite-budget-s {cfg.suite_budget_s} left, the row "
                  f"may take {timeout} s): {' '.join(argv)}", flush=True)
            continue
        try:
            results += run_bounded(argv + peak, int(min(timeout, left)))
        except RuntimeError as e:                          # out of memory, say: report it, go on
            print(f"FAILED: {e}", flush=True)
            failed += 1
    print(step_table([r for r in results if "variant" in r]))
    for r in results:
        if "generate" in r:
            print(f"generation, {r['generate']}, batch {r['batch']}: "
                  f"{r['new_tokens_per_s']:.0f} new tokens/s")
    print(e2e_table(e2e_results))
    if failed:
        raise SystemExit(f"--suite: {failed} rows failed (FAILED above)")


