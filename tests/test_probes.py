"""Probes of rescore.py, evaluate.py, tools/plot.py and the input fingerprints: a reward model that
overflows, an output over its own input, a model that needs its own code, a full disk, part and
settings files of the wrong shape, an output inside a model, where the models load, a torn log, and
what --resume takes for the same model.

    python -m pytest tests/test_probes.py

Each user's mistake must be one line naming the flag, or the file and line; each expected value is
computed another way than the code under test (the previous loading, the previous fingerprint).
"""

import importlib.util
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                          GenerationConfig, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification)

import data
import evaluate
import rescore
import train
from conftest import generate, one_line_error, train_args
from data import UserError
from harness import fingerprints, models
from harness.files import write_jsonl
from tools import demo
from tools import plot
from tools.prepare_hh_rlhf import read_hh_rlhf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant:"
N_NEW = 10                                                          # max_new_tokens here


def sample(id_, responses, **fields):
    return {"id": id_, "subset": "x", "prompt": PROMPT, "responses": list(responses),
            "rewards": None, "sft_index": 0, **fields}


def scorer(table):
    return lambda prompts, responses: [table[r] for r in responses]


def file_size_limit(size):
    """A disk that takes no file larger than `size` bytes, for a child process: writes past it fail
    (EFBIG), as on a full disk (ENOSPC); SIGXFSZ, which would kill the process, is ignored."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


# ---- fixtures: per tokenizer family, test files, a tiny policy and reward model, one run ---------

def llama_config(tokenizer, **extra):
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=0.3, **extra)


def run_eval(env, out, **settings):
    """evaluate.py's protocol in this process."""
    return evaluate.evaluate(evaluate.Config(**{
        "model": env["policy"], "reward_model": env["rm"], "data": env["files"], "out": str(out),
        "batch_size": 3, "max_new_tokens": N_NEW, "max_prompt_len": 48, **settings}))


def eval_argv(env, out, **flags_):
    argv = ["--model", env["policy"], "--reward-model", env["rm"], "--data", *env["files"],
            "--out", str(out), "--batch-size", "3", "--max-new-tokens", str(N_NEW),
            "--max-prompt-len", "48"]
    for flag, value in flags_.items():
        argv += [f"--{flag.replace('_', '-')}", value]
    return argv


def build_env(tokenizer, tmp):
    paths = demo.make_demo_data(str(tmp / "raw"), n_train=10, n_test=12, seed=1)
    samples, _ = read_hh_rlhf(paths["test"], "harmless-base", "test")
    samples[0]["responses"].append("I do not know.")                 # one prompt with K = 3
    files = []
    for subset, part in (("harmless-base", samples[:5]), ("helpful-base", samples[5:])):
        for n, s in enumerate(part):
            s.update(id=f"{subset}/test/{n}", subset=subset)
        files.append(str(tmp / f"{subset}.jsonl"))
        write_jsonl(files[-1], part)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(llama_config(tokenizer)).eval()
    reward_model = LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1)).eval()
    for name, model in (("policy", policy), ("rm", reward_model)):
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
    env = {"tmp": tmp, "files": files, "policy": str(tmp / "policy"), "rm": str(tmp / "rm"),
           "samples": [s for f in files for s in data.read_samples(f)], "run": str(tmp / "run")}
    env["results"] = run_eval(env, env["run"])
    return env


@pytest.fixture(scope="module")
def envs(tokenizers, tmp_path_factory):
    """family -> its evaluation setup, made on first use."""
    made = {}
    def make(family):
        if family not in made:
            made[family] = build_env(tokenizers[family], tmp_path_factory.mktemp(f"eval_{family}"))
        return made[family]
    return make


def copy_run(env, out):
    shutil.copytree(env["run"], out)
    return out


# ---- rescore.py: non-finite rewards, an output over its input -------------------------------------

@pytest.mark.parametrize("dtype, hint", [
    ("float32", r"are its weights broken\?"),
    ("float16", r"an overflow in --dtype float16\? --dtype float32 with a new --out avoids it")])
def test_a_non_finite_reward_is_refused_at_its_sample(tmp_path, dtype, hint):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(str(path), [sample("a", ["good", "bad"]), sample("b", ["fine", "broken", "meh"])])
    table = {"good": 1.0, "bad": -1.0, "fine": 0.5, "broken": math.nan, "meh": 0.0}
    with pytest.raises(UserError) as raised:
        rescore.rescore_file("fake", str(path), str(out), dtype=dtype, score_fn=scorer(table))
    assert re.fullmatch(rf"--data {path}: sample 'b', response 1 \('broken'\): --reward-model fake "
                        rf"gave it a reward of nan; {hint}", str(raised.value))
    assert not out.exists()
    assert "NaN" not in (tmp_path / "out.jsonl.part0").read_text()       # nothing non-finite kept


@pytest.mark.parametrize("family", ["sp", "bpe"])
def test_a_reward_model_that_overflows_in_float16_is_refused(envs, tokenizers, tmp_path, family):
    """A real model: its head's weights fit float16, its rewards do not (float16's largest number
    is 65504), so in float16 some come out infinite."""
    env = envs(family)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(llama_config(tokenizers[family], num_labels=1)).eval()
    with torch.no_grad():
        model.score.weight.copy_(6e4 * torch.randn_like(model.score.weight).sign())
    model.save_pretrained(tmp_path / "rm")
    tokenizers[family].save_pretrained(tmp_path / "rm")
    rm, path = str(tmp_path / "rm"), env["files"][1]
    with pytest.raises(UserError, match=rf"--data {path}: sample '.*', response \d \(.*\): "
                                        rf"--reward-model {rm} gave it a reward of -?(inf|nan); an "
                                        r"overflow in --dtype float16\?"):
        rescore.rescore_file(rm, path, str(tmp_path / "half.jsonl"), dtype="float16", batch_size=4)
    for part in tmp_path.glob("half.jsonl.part*"):
        assert "Infinity" not in part.read_text() and "NaN" not in part.read_text()
    assert not (tmp_path / "half.jsonl").exists()
    rescore.rescore_file(rm, path, str(tmp_path / "full.jsonl"), batch_size=4)   # float32: finite
    rewards = [r for s in data.read_samples(str(tmp_path / "full.jsonl")) for r in s["rewards"]]
    assert all(map(math.isfinite, rewards)) and max(map(abs, rewards)) > 65504


def test_part_files_holding_non_finite_rewards_are_one_line_naming_file_and_line(tmp_path):
    _part_file_probe(tmp_path, "[NaN, 0.0]", r"sample 'x' has a reward of nan, not a finite number")
    _part_file_probe(tmp_path, "[1.0, -Infinity]", r"sample 'x' has a reward of -inf")


@pytest.mark.parametrize("rewards, pattern", [
    ('"ab"', r"sample 'x': 'rewards' is not a list of numbers"),
    ("5", r"sample 'x': 'rewards' is not a list of numbers"),
    ("[true, 1.0]", r"sample 'x': 'rewards' is not a list of numbers"),
    ("[1.0]", r"sample 'x' has 1 rewards for its 2 responses in --data"),
])
def test_part_records_of_the_wrong_shape_are_one_line(tmp_path, rewards, pattern):
    _part_file_probe(tmp_path, rewards, pattern)


def _part_file_probe(tmp_path, rewards, pattern):
    """A part file left by an earlier run with the same settings, its second record `rewards`."""
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(str(path), [sample("y", ["a", "b"]), sample("x", ["a", "b"])])
    settings = {"--reward-model": fingerprints.fingerprint("fake"),
                "--data": fingerprints.fingerprint(str(path)), "--max-length": 1024,
                "--dtype": "float32"}
    (tmp_path / "out.jsonl.settings.json").write_text(json.dumps(settings))
    (tmp_path / "out.jsonl.part0").write_text('{"id": "y", "rewards": [1.0, 0.0]}\n'
                                              '{"id": "x", "rewards": ' + rewards + '}\n')
    with pytest.raises(UserError) as raised:
        rescore.rescore_file("fake", str(path), str(out), score_fn=scorer({"a": 1.0, "b": 0.0}))
    assert re.fullmatch(rf"{out}.part0:2: {pattern}.*; delete the file to redo its records",
                        str(raised.value)), str(raised.value)
    assert not out.exists()


def test_settings_files_of_the_wrong_shape_are_one_line(envs, tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(str(path), [sample("x", ["a", "b"])])
    (tmp_path / "out.jsonl.settings.json").write_text("[]")
    (tmp_path / "out.jsonl.part0").write_text('{"id": "x", "rewards": [1.0, 0.0]}\n')
    with pytest.raises(UserError, match=r"out.jsonl.settings.json: not what this file holds"):
        rescore.rescore_file("fake", str(path), str(tmp_path / "out.jsonl"),
                             score_fn=scorer({"a": 1.0, "b": 0.0}))
    env = envs("sp")
    out = copy_run(env, tmp_path / "run")
    (out / "settings.json").write_text('["--model"]')
    one_line_error(capsys, evaluate.main, eval_argv(env, out), r"settings.json: not what this file")
    # --compare: a results.json of the wrong shape
    for results in ('{"Total": 5}', '{"Total": {"n": 1, "bleu": 0.0}}'):
        (out / "results.json").write_text(results)
        one_line_error(capsys, evaluate.main, ["--compare", env["run"], str(out)],
                       rf"--compare {out}/results.json: subset 'Total' lacks one of n, bleu, "
                       "reward, pair_acc, empty")


def test_out_equal_to_data_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    path = tmp_path / "in.jsonl"
    write_jsonl(str(path), [sample("a", ["good", "bad"])])
    before = path.read_bytes()
    (tmp_path / "link.jsonl").symlink_to("in.jsonl")
    os.link(path, tmp_path / "hard.jsonl")
    (tmp_path / "sub").mkdir()
    listing = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    for out in (str(path), str(tmp_path / "link.jsonl"), "in.jsonl", "sub/../in.jsonl",
                str(tmp_path / "hard.jsonl")):
        with pytest.raises(UserError, match=rf"^--out {re.escape(out)} is the --data file {path}: "
                                            "the output would replace the input; give --out"):
            rescore.rescore_file("fake", str(path), out, score_fn=scorer({"good": 1.0, "bad": 0.0}))
        assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing
    one_line_error(capsys, rescore.main, ["--reward-model", "owner/rm", "--data", "in.jsonl",
                                          "--out", "link.jsonl"], r"--out link.jsonl is the --data")
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == listing


# ---- evaluate.py ---------------------------------------------------------------------------------

def test_a_model_that_needs_its_own_code_is_one_line_and_runs_none(envs, tmp_path, capsys):
    env = envs("sp")
    marker = tmp_path / "the folder's code ran"
    for name, flag in (("policy", "--model"), ("rm", "--reward-model")):
        custom = tmp_path / f"custom_{name}"
        shutil.copytree(env[name], custom)
        config = json.loads((custom / "config.json").read_text())
        config.update(model_type="clha_probe_custom", auto_map={
            "AutoConfig": "configuration_probe.ProbeConfig",
            "AutoModelForCausalLM": "modeling_probe.ProbeModel",
            "AutoModelForSequenceClassification": "modeling_probe.ProbeModel"})
        (custom / "config.json").write_text(json.dumps(config))
        for module in ("configuration_probe.py", "modeling_probe.py"):
            (custom / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
        argv = eval_argv(env, tmp_path / f"out_{name}")
        argv[argv.index(flag) + 1] = str(custom)
        one_line_error(capsys, evaluate.main, argv,
                       rf"{flag} {custom}: cannot load it: .*trust_remote_code")
        assert not marker.exists()


def test_a_full_disk_at_table_md_is_one_line_and_keeps_the_table(envs, tmp_path):
    """The whole run is done (its parts are there): only the merge is left, and the table it writes
    is made larger than the disk takes."""
    env = envs("sp")
    out = copy_run(env, tmp_path / "run")
    table = (out / "table.md").read_bytes()
    script = textwrap.dedent("""
        import sys
        import evaluate
        from harness import flags
        evaluate.format_table = lambda runs: "| a wide table |\\n" * 200_000       # 3.4 MB
        flags.run(evaluate.main, sys.argv[1:])
        """)
    run = subprocess.run([sys.executable, "-c", script, *eval_argv(env, out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         preexec_fn=file_size_limit(1 << 20))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines() == [
        f"error: {out}/table.md: cannot write it (File too large); rerun once there is room"]
    assert (out / "table.md").read_bytes() == table                 # the old table, whole
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.parametrize("change, pattern", [
    (lambda r: r.pop("reward"), r"'reward' is missing or not a finite number"),
    (lambda r: r.update(reward=math.nan), r"'reward' is missing or not a finite number"),
    (lambda r: r.update(bleu="0.5"), r"'bleu' is missing or not a finite number"),
    (lambda r: r.update(pairs="1"), r"'pairs' is missing or not a whole number"),
    (lambda r: r.update(generation=None), r"'generation' is missing or not a string"),
    (lambda r: r.update(pairs_correct=5), r"5 of 1 pairs correct"),
])
def test_evaluate_part_records_of_the_wrong_shape_are_one_line(envs, tmp_path, capsys, change,
                                                               pattern):
    env = envs("sp")
    out = copy_run(env, tmp_path / "run")
    part = out / "parts" / "rank0.jsonl"
    records = [json.loads(line) for line in part.read_text().splitlines()]
    line = next(n for n, r in enumerate(records) if r["pairs"] == 1)     # a sample with K = 2
    change(records[line])
    part.write_text("".join(json.dumps(r) + "\n" for r in records))
    one_line_error(capsys, evaluate.main, eval_argv(env, out),
                   rf"{part}:{line + 1}: sample '.*': {pattern}; delete the file to redo")


def test_evaluate_resumes_with_out_inside_a_model(envs, tmp_path):
    """runs/x/final/eval: what the run writes there is no part of the model it evaluates."""
    env = envs("sp")
    policy, rm = tmp_path / "final", tmp_path / "rm"
    shutil.copytree(env["policy"], policy)
    shutil.copytree(env["rm"], rm)
    for out in (policy / "eval", rm / "eval", policy):              # --out == --model too
        first = run_eval(env, out, model=str(policy), reward_model=str(rm))
        part = out / "parts" / "rank0.jsonl"
        lines = part.read_text().splitlines(keepends=True)
        part.write_text("".join(lines[:4]) + lines[4][:20])         # a kill after 4 records
        resumed = run_eval(env, out, model=str(policy), reward_model=str(rm))
        for results in (first, resumed):
            assert results.keys() == env["results"].keys()
            assert all(results[k] == pytest.approx(env["results"][k], abs=1e-4) for k in results)
        assert len(part.read_text().splitlines()) == len(env["samples"])   # 8 redone, not 12


@pytest.mark.parametrize("family", ["sp", "bpe"])
def test_models_load_on_their_device_in_their_dtype_and_score_as_before(envs, family):
    """On the CPU the loading is what it was: from_pretrained on the host, then .to(device)."""
    env = envs(family)
    for dtype in ("bfloat16", "float32"):
        model = rescore.load_reward_model(env["rm"], "cpu", dtype)[0]
        assert {(p.device.type, p.dtype) for p in model.parameters()} == {
            ("cpu", getattr(torch, dtype))} and not model.training
    model, tokenizer, format_fn = rescore.load_reward_model(env["rm"], "cpu", "float32")
    config = rescore.reward_format(env["rm"])[0]
    before = AutoModelForSequenceClassification.from_pretrained(
        env["rm"], config=config, dtype=torch.float32).to("cpu").eval()
    prompts = [s["prompt"] for s in env["samples"] for _ in s["responses"]]
    responses = [r for s in env["samples"] for r in s["responses"]]
    assert rescore.score(model, tokenizer, format_fn, prompts, responses, 4) == rescore.score(
        before, tokenizer, format_fn, prompts, responses, 4)
    # the policy: evaluate.py's generations are those of the model loaded as before
    policy = AutoModelForCausalLM.from_pretrained(env["policy"], dtype=torch.float32).eval()
    policy.generation_config = GenerationConfig()
    from transformers import AutoTokenizer
    texts = generate(policy, AutoTokenizer.from_pretrained(env["policy"]),
                     [s["prompt"] for s in env["samples"]], max_new_tokens=N_NEW,
                     max_prompt_len=48, batch_size=3)
    with open(os.path.join(env["run"], "generations.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["generation"] for line in f] == texts
    loaded = models.load_model(AutoModelForCausalLM, env["policy"], "--model", "cpu", "bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_on_a_gpu_the_weights_go_straight_to_it_where_accelerate_is_installed(monkeypatch):
    """What cannot run here: the arguments from_pretrained gets for a GPU, with and without
    accelerate (transformers places weights only through device_map, which needs it)."""
    calls = []

    class Loaded:
        def to(self, device):
            calls.append(("to", device))
            return self

        def eval(self):
            return self
    monkeypatch.setattr(models, "from_pretrained",
                        lambda loader, path, flag, **kwargs: calls.append(kwargs) or Loaded())
    find_spec = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
            installed if name == "accelerate" else find_spec(name, *args)) or None)
        calls.clear()
        models.load_model(AutoModelForCausalLM, "x", "--model", "cuda:1", "bfloat16")
        gpu = torch.device("cuda:1")
        placed = {"device_map": {"": gpu}} if installed else {}
        assert calls == [{"dtype": torch.bfloat16, **placed},      # (harness.models adds
                                                                   # trust_remote_code=False)
                         ("to", gpu)]


# ---- tools/plot.py -------------------------------------------------------------------------------

def log_record(step, **extra):
    return {"step": step, "loss_rank": 1.0 / step, "loss_sft": 0.5, "pairs_kept": 0.9,
            "sft_on": 0.8, "acc": 0.5 + step / 100, "acc_kept": 0.6, "logp_rank": [-1.0, -2.0],
            **extra}


def test_plot_skips_a_torn_last_line_and_names_a_broken_one(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="pip install matplotlib to test the plot")
    run, png = tmp_path / "run", tmp_path / "curves.png"
    run.mkdir()
    lines = [json.dumps(log_record(1)), json.dumps(log_record(2)),
             json.dumps({"step": 2, "split": "dev", "acc": 0.7}), json.dumps(log_record(3))]
    (run / "log.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 4, "loss_ra')   # a kill
    assert [r["step"] for r in plot.read_log(str(run))] == [1, 2, 3]
    plot.main(["--plot", str(run), "--out", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for broken in ('{"step": 2, "lo', "[1, 2]", '{"loss_rank": 1}'):
        (run / "log.jsonl").write_text("\n".join([lines[0], broken] + lines[2:]) + "\n")
        one_line_error(capsys, plot.main, ["--plot", str(run), "--out", str(png)],
                       rf"--plot {run}/log.jsonl:2: not a record of train.py")


# ---- fingerprints: a model by its contents, a hub id by its revision -----------------------------

def previous_fingerprint(path):
    """harness/fingerprints.fingerprint as every earlier version wrote it: large files by size and
    modification time."""
    import glob
    import hashlib
    if not os.path.exists(path):
        return {"path": path, "sha256": None}
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        glob.glob(os.path.join(glob.escape(path), "**"), recursive=True))
    for name in filter(os.path.isfile, files):
        stat = os.stat(name)
        digest.update(os.path.relpath(name, path).encode())
        if stat.st_size > 64 << 20 and name != path:
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
            continue
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return {"path": os.path.abspath(path), "sha256": digest.hexdigest()}


def add_large_file(folder, size=(64 << 20) + (1 << 20)):
    """A file over 64 MiB, as a Trainer checkpoint's optimizer.pt is: sparse, random at its start."""
    with open(folder / "optimizer.pt", "wb") as f:
        f.truncate(size)
        f.write(os.urandom(1 << 16))


def copy_with_new_times(src, dst):
    shutil.copytree(src, dst, copy_function=shutil.copy)
    for name in dst.rglob("*"):
        os.utime(name, ns=(1_000_000_000, 1_000_000_000))


def test_a_copied_model_folder_is_the_same_input_and_a_changed_one_is_not(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    add_large_file(model)
    first = fingerprints.fingerprint(str(model))
    copy_with_new_times(model, tmp_path / "copy")
    assert fingerprints.fingerprint(str(tmp_path / "copy"))["sha256"] == first["sha256"]
    with open(tmp_path / "copy" / "optimizer.pt", "r+b") as f:        # within the first block
        f.seek(1000)
        f.write(b"changed")
    assert fingerprints.fingerprint(str(tmp_path / "copy"))["sha256"] != first["sha256"]
    shutil.rmtree(tmp_path / "copy")
    copy_with_new_times(model, tmp_path / "copy")
    (tmp_path / "copy" / "config.json").write_text('{"model_type": "llama2"}')
    assert fingerprints.fingerprint(str(tmp_path / "copy"))["sha256"] != first["sha256"]
    # a plain file (--train), large or not, is read whole, as before: old checkpoints still match
    plain = model / "optimizer.pt"
    assert fingerprints.fingerprint(str(plain)) == previous_fingerprint(str(plain))
    with open(plain, "r+b") as f:
        f.seek(40 << 20)                                            # between two sampled blocks
        f.write(b"x")
    assert fingerprints.fingerprint(str(plain)) == previous_fingerprint(str(plain))
    # a folder of small files only: as before
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text("{}")
    assert fingerprints.fingerprint(str(tmp_path / "small")) == previous_fingerprint(
        str(tmp_path / "small"))


def test_a_fingerprint_recorded_by_the_previous_version_still_matches(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    add_large_file(model)
    recorded = {"--model": previous_fingerprint(str(model))}
    assert recorded["--model"] != fingerprints.fingerprint(str(model))
    fingerprints.check_settings(recorded, {"--model": fingerprints.fingerprint(str(model))}, "run")
    (model / "config.json").write_text('{"model_type": "llama2"}')
    with pytest.raises(UserError, match=rf"--model {model}: its contents changed since run"):
        fingerprints.check_settings(recorded, {"--model": fingerprints.fingerprint(str(model))},
                                    "run")


def test_exclude_leaves_an_output_inside_the_folder_out(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = fingerprints.fingerprint(str(model))
    (model / "eval" / "parts").mkdir(parents=True)
    (model / "eval" / "parts" / "rank0.jsonl").write_text("{}\n")
    (model / "evaluation.txt").write_text("not ours")
    assert fingerprints.fingerprint(str(model), exclude=[str(model / "eval")]) != first
    (model / "evaluation.txt").unlink()
    assert fingerprints.fingerprint(str(model), exclude=[str(model / "eval")]) == first
    assert fingerprints.fingerprint(str(model)) != first
    os.symlink(model, tmp_path / "link")                            # the same folder by another name
    assert fingerprints.fingerprint(str(model), exclude=[str(tmp_path / "link" / "eval")]) == first
    assert fingerprints.fingerprint(str(model), exclude=[str(model)]) != first   # not everything


def test_a_hub_id_is_its_cached_revision(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fingerprints.fingerprint("owner/name") == {"path": "owner/name", "sha256": None}
    repo = cache / "models--owner--name"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    recorded = {"--model": fingerprints.fingerprint("owner/name")}
    assert recorded["--model"]["revision"] == "a" * 40 and recorded["--model"]["sha256"]
    fingerprints.check_settings(recorded, {"--model": fingerprints.fingerprint("owner/name")}, "x")
    legacy = {"--model": {"path": "owner/name", "sha256": None}}     # recorded by name only
    fingerprints.check_settings(legacy, {"--model": fingerprints.fingerprint("owner/name")}, "x")
    (repo / "refs" / "main").write_text("b" * 40)                   # the hub's main moved
    with pytest.raises(UserError, match=rf"--model owner/name: the hub revision is {'b' * 40}, "
                                        rf"not {'a' * 40} as when x was made from it"):
        fingerprints.check_settings(recorded, {"--model": fingerprints.fingerprint("owner/name")},
                                    "x")


def test_resume_takes_a_copied_model_and_refuses_a_changed_tokenizer(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny["base"], model)
    add_large_file(model)                    # a Trainer checkpoint's optimizer state, say
    run = tmp_path / "run"
    args = lambda folder, steps: train_args(tiny, run, "--model", str(folder), "--save-every", "2",
                                            "--dtype", "float32", "--max-steps", steps, "--resume")
    train.main(args(model, "2"))
    original = (model / "tokenizer.json").read_bytes()
    tokenizer = json.loads(original)
    vocab = tokenizer["model"]["vocab"]
    a, b = (token for token, id_ in vocab.items() if id_ in (400, 401))
    vocab[a], vocab[b] = vocab[b], vocab[a]                         # two ids swapped
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    one_line_error(capsys, train.main, args(model, "3"),
                   rf"--model {model}: its contents changed since --resume: .*step_0000002 was "
                   "made from it")
    (model / "tokenizer.json").write_bytes(original)
    copy_with_new_times(model, tmp_path / "copy")                   # moved, copied: the same model
    train.main(args(tmp_path / "copy", "3"))
    with open(run / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f if '"split"' not in line] == [1, 2, 3]
