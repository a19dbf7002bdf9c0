"""Fault injection: a user's mistake is one line on stderr and a non-zero exit, and no run loses or mixes data.

    python -m pytest test_faults.py

Each probe runs an entry script's main() through cli.run, as its command line does, and checks the exit status
(2), that stderr is one line, and that the line names the flag, or the file and line. Two probes run the real
command lines: under torchrun, and alone.
"""

import errno
import gzip
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
from data import UserError
from harness import checkpoints, fingerprints, locks, models
from harness.files import write_jsonl
import evaluate
import rescore
import train
from conftest import one_line_error, torchrun, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant:"


def sample(id_, responses=("Mix flour.", "No."), rewards=None, **fields):
    return {"id": id_, "subset": "x", "prompt": PROMPT, "responses": list(responses), "rewards": rewards,
            "sft_index": 0, **fields}


# ---- flags ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, pattern", [
    (["--max-steps", "-1"], r"--max-steps -1: must be at least 0"),
    (["--global-batch", "-4"], r"--global-batch -4: must be at least 1"),
    (["--global-batch", "0"], r"--global-batch 0: must be at least 1"),
    (["--max-len", "3", "--max-prompt-len", "2"], r"--max-len 3: must be at least 17"),
    (["--max-len", "100", "--max-prompt-len", "90"], r"--max-len 100 with --max-prompt-len 90 leaves 10 tokens"),
    (["--max-len", "1024"], r"--max-len 1024 is longer than the model's 256 positions"),
    (["--max-prompt-len", "1"], r"--max-prompt-len 1 and --max-len 128 leave no room for the prompt after 1 special"),
    (["--dtype", "foo"], r"argument --dtype: invalid choice: 'foo'"),
    (["--lr", "-1"], r"--lr -1.0: must be greater than 0"),
    (["--lr", "nan"], r"--lr nan: must be a finite number"),
    (["--lrr", "1"], r"unrecognized arguments: --lrr 1"),
    (["--epoch", "3"], r"unrecognized arguments: --epoch 3"),            # no abbreviations: a typo is an error
    (["--model", "./nomodel"], r"--model ./nomodel: no such folder"),
    (["--train", "nofile.jsonl"], r"--train nofile.jsonl: no such file"),
])
def test_train_flags(tiny, tmp_path, capsys, flags, pattern):
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run") + flags, pattern)
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")      # nothing written


def test_out_not_writable_and_model_not_a_checkpoint(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "file" / "run"),
                   r"--out .*file/run: cannot create this folder \(Not a directory\)")
    (tmp_path / "empty_model").mkdir()
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run") + ["--model", str(tmp_path / "empty_model")],
                   r"--model .*empty_model: no config.json in this folder, so no checkpoint")
    shutil.copytree(tiny["base"], tmp_path / "partial")                 # a download cut short
    with open(tmp_path / "partial" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run2") + ["--model", str(tmp_path / "partial")],
                   r"--model .*partial: cannot load it: .*(header|metadata)")


def test_reward_gap_in_other_units(tiny, tmp_path, capsys):
    """Rewards of another scale (here all within 1.2): the default gap 3.0 would keep no pair at any step."""
    small = [dict(s, rewards=[r / 10 for r in s["rewards"]]) for s in data.read_samples(tiny["train"])]
    write_jsonl(str(tmp_path / "small.jsonl"), small)
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run", "--train", str(tmp_path / "small.jsonl")),
                   r"--reward-gap 3.0 keeps no pair of .*small.jsonl \(its largest reward gap is 0.8\)")


# ---- data files -----------------------------------------------------------------------------------------------

def write(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


GOOD = json.dumps(sample("a", rewards=[1.0, -1.0]))


@pytest.mark.parametrize("lines, pattern", [
    ([], r"x.jsonl: no samples, the file is empty"),
    (["  ", "\t"], r"x.jsonl: no samples, the file is empty"),
    ([GOOD, json.dumps(sample("b", rewards=5))], r"x.jsonl:2: 'rewards' must be null or a list of 2 finite numbers"),
    ([GOOD, json.dumps(sample("b", rewards=[True, False]))], r"x.jsonl:2: 'rewards' must be null or a list"),
    ([GOOD, json.dumps(sample("b", rewards=[1.0, float("nan")]))], r"x.jsonl:2: 'rewards' must be"),
    ([json.dumps(sample("b", sft_index=True))], r"x.jsonl:1: field 'sft_index' must be a int, got True"),
    ([json.dumps(sample("b", prompt=""))], r"x.jsonl:1: the prompt is empty"),
    ([json.dumps({"prefix": "<|prompter|>Hi<|assistant|>", "suffix": ["a", "b"], "reward": [1, 0]})],
     r"x.jsonl:1: the authors' format needs 'prefix' as lists of turn strings"),
    ([GOOD, GOOD], r"x.jsonl: 1 ids occur more than once, e.g. 'a'"),
    ([GOOD, "[1, 2]"], r"x.jsonl:2: expected a JSON object, got list"),
])
def test_bad_sample_files(tmp_path, capsys, lines, pattern):
    path = write(tmp_path / "x.jsonl", lines)
    with pytest.raises(UserError, match=pattern):
        data.read_samples(path)


def test_bytes_and_compression(tmp_path):
    with open(tmp_path / "x.jsonl", "wb") as f:
        f.write(GOOD.encode() + b"\n" + json.dumps(sample("b")).encode()[:-3] + b"\xff\xfe\"}\n")
    with pytest.raises(UserError, match=r"x.jsonl:2: not UTF-8 text"):
        data.read_samples(str(tmp_path / "x.jsonl"))
    # gzip and plain text are told apart by their bytes, whatever the name says
    plain, zipped = write(tmp_path / "plain.jsonl.gz", [GOOD]), write(tmp_path / "zipped.jsonl", [GOOD], gzip.open)
    assert data.read_samples(plain) == data.read_samples(zipped) == [json.loads(GOOD)]
    with open(zipped, "rb") as f:
        cut = f.read()[:-12]                                   # a partial download
    with open(tmp_path / "cut.jsonl.gz", "wb") as f:
        f.write(cut)
    with pytest.raises(UserError, match=r"cut.jsonl.gz:\d+: broken gzip data"):
        data.read_samples(str(tmp_path / "cut.jsonl.gz"))


def test_splits_command_mistakes_and_empty_files(tmp_path, capsys):
    from tools.prepare_hh_rlhf import main
    one_line_error(capsys, main, ["--hh-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                   r"--hh-dir .*nope: no such folder")
    (tmp_path / "file").write_text("")
    one_line_error(capsys, main, ["--hh-dir", str(tmp_path), "--out", str(tmp_path / "file")],
                   r"--out .*file: cannot create this folder \(File exists\)")
    for subset in data.SUBSETS:                                # 4 x 3 test pairs: not enough for 280 dev samples
        for split in ("train", "test"):
            (tmp_path / "hh" / subset).mkdir(parents=True, exist_ok=True)
            write(tmp_path / "hh" / subset / f"{split}.jsonl.gz", [json.dumps(
                {"chosen": f"\n\nHuman: {subset} {i}?\n\nAssistant: yes", "rejected": f"\n\nHuman: {subset} {i}?"
                 "\n\nAssistant: no"}) for i in range(3)], gzip.open)
    one_line_error(capsys, main, ["--hh-dir", str(tmp_path / "hh"), "--out", str(tmp_path / "o")],
                   r"--dev-size 280: there are only 12 test samples")


def test_the_splits_command_runs_from_any_folder_and_data_py_points_to_it(tmp_path):
    """The first step of the pipeline as a user types it, from another folder: every split is written
    and read back; `python data.py --hh-dir`, its old name, fails in one line that names the new one."""
    for subset in data.SUBSETS:
        for split in ("train", "test"):
            (tmp_path / "hh" / subset).mkdir(parents=True, exist_ok=True)
            write(tmp_path / "hh" / subset / f"{split}.jsonl.gz", [json.dumps(
                {"chosen": f"\n\nHuman: {subset} {split} {i}?\n\nAssistant: yes",
                 "rejected": f"\n\nHuman: {subset} {split} {i}?\n\nAssistant: no"}) for i in range(3)], gzip.open)
    (tmp_path / "elsewhere").mkdir()
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_hh_rlhf.py"), "--hh-dir", "../hh",
                          "--out", "../out", "--dev-size", "4"], cwd=tmp_path / "elsewhere", capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0 and "wrote ../out: train 12, dev 4, test 8" in run.stdout, run.stderr[-2000:]
    tests = [data.read_samples(str(tmp_path / "out" / "test" / f"{s}.jsonl")) for s in data.SUBSETS]
    assert len(data.read_samples(str(tmp_path / "out" / "train.jsonl"))) == 12 and sum(map(len, tests)) == 8
    assert len(data.read_samples(str(tmp_path / "out" / "dev.jsonl"))) == 4
    old = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--hh-dir", "hh", "--out", "o"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert old.returncode != 0 and len(old.stderr.strip().splitlines()) == 1, old.stderr
    assert old.stderr.startswith("error: ") and "tools/prepare_hh_rlhf.py" in old.stderr and not (tmp_path / "o").exists()


def test_empty_training_file(tiny, tmp_path, capsys):
    write(tmp_path / "empty.jsonl", ["", "  "])
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run", "--train", str(tmp_path / "empty.jsonl")),
                   r"empty.jsonl: no samples, the file is empty")


# ---- rescore.py -------------------------------------------------------------------------------------------------

def scorer(table):
    return lambda prompts, responses: [table[r] for r in responses]


def test_rescore_resume_with_other_settings_is_refused(tmp_path):
    path, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    write_jsonl(path, [sample(f"s{n}") for n in range(20)])

    calls = []

    def crash(prompts, responses):                             # the first chunk is written, then the run dies
        calls.append(responses)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [1.0 if r == "Mix flour." else -1.0 for r in responses]
    with pytest.raises(KeyboardInterrupt):
        rescore.rescore_file("rm_a", path, out, batch_size=1, score_fn=crash)
    part = open(out + ".part0").read()
    assert len(part.splitlines()) == 8                         # one chunk: 16 sequences of 2 responses
    for changed, pattern in ((dict(reward_model="rm_b"), r"\(its part files\) was made with --reward-model rm_a, not rm_b"),
                             (dict(max_length=512), "made with --max-length 1024, not 512"),
                             (dict(dtype="bfloat16"), "made with --dtype float32, not bfloat16")):
        settings = dict(reward_model="rm_a", max_length=1024, dtype="float32") | changed
        with pytest.raises(UserError, match=pattern):
            rescore.rescore_file(settings.pop("reward_model"), path, out, batch_size=1, score_fn=crash, **settings)
    with open(path, "a") as f:                                 # the same file name, other contents
        f.write(json.dumps(sample("s99")) + "\n")
    with pytest.raises(UserError, match=r"--data .*in.jsonl: its contents changed since --out .* was made from it"):
        rescore.rescore_file("rm_a", path, out, batch_size=1, score_fn=crash)
    write_jsonl(path, [sample(f"t{n}") for n in range(20)])    # another data file of that name: other ids; the
    with pytest.raises(UserError, match=r"--data .*in.jsonl: its contents changed since --out .* was made from it"):
        rescore.rescore_file("rm_a", path, out, batch_size=1, score_fn=crash)   # settings say so, not a part file
    assert open(out + ".part0").read() == part and not os.path.exists(out)            # nothing mixed or lost


def test_rescore_outputs(tmp_path, capsys):
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, [sample("a"), sample("b", responses=["No.", "Mix flour."])])
    table = scorer({"Mix flour.": 4.0, "No.": -1.0})
    rescore.rescore_file("rm", path, str(tmp_path / "new" / "dir" / "out.jsonl"), score_fn=table)   # made for us
    rescore.rescore_file("rm", path, str(tmp_path / "out.jsonl.gz"), score_fn=table)
    with open(tmp_path / "out.jsonl.gz", "rb") as f:
        assert f.read(2) == b"\x1f\x8b"                        # .gz means gzip
    assert data.read_samples(str(tmp_path / "out.jsonl.gz")) == \
        data.read_samples(str(tmp_path / "new" / "dir" / "out.jsonl"))
    with pytest.raises(UserError, match=r"--out .*new: is a folder"):
        rescore.rescore_file("rm", path, str(tmp_path / "new"), score_fn=table)
    one_line_error(capsys, rescore.main, ["--reward-model", "./nomodel", "--data", path, "--out",
                                          str(tmp_path / "o.jsonl")], r"--reward-model ./nomodel: no such folder")
    assert not os.path.exists(tmp_path / "o.jsonl.settings.json")


def test_a_30_mb_line_is_cut_before_it_is_tokenized(tokenizers):
    """What rescore.py and the batches hand the tokenizer is bounded, and gives the same ids as the whole text."""
    tokenizer, long = tokenizers["bpe"], "Mix flour and water, then bake it. " * 900_000     # 31.5 MB
    lengths = []
    real_call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        lengths.extend(len(t) for t in ([text] if isinstance(text, str) else text))
        return real_call(self, text, *args, **kwargs)
    type(tokenizer).__call__ = spy
    try:
        ids = rescore.encode(tokenizer, [PROMPT + " " + long], max_length=64)
        rows = data.encode_sample(tokenizer, sample("a", responses=[long, "No."]), max_len=96, max_prompt_len=32)
    finally:
        type(tokenizer).__call__ = real_call
    assert max(lengths) < 100_000
    assert ids == [tokenizer(long[-35 * 200:])["input_ids"][-64:]]      # its end (whole phrases) is what is scored
    assert rows == data.encode_sample(tokenizer, sample("a", responses=[long[:5000], "No."]), 96, 32)


# ---- evaluate.py --------------------------------------------------------------------------------------------

def test_evaluate_mistakes(tiny, tmp_path, capsys):
    rm = tmp_path / "rm"                                       # a reward model's config: one output
    shutil.copytree(tiny["base"], rm)
    config = json.loads((rm / "config.json").read_text())
    (rm / "config.json").write_text(json.dumps(config | {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}))
    write(tmp_path / "empty.jsonl", [])
    out = tmp_path / "eval"
    one_line_error(capsys, evaluate.main, ["--model", tiny["base"], "--reward-model", str(rm), "--data",
                                           str(tmp_path / "empty.jsonl"), "--out", str(out)], r"empty.jsonl: no samples")
    assert sorted(os.listdir(out)) == ["parts"] and os.listdir(out / "parts") == []    # no empty generations.jsonl
    one_line_error(capsys, evaluate.main, ["--model", tiny["base"], "--reward-model", tiny["base"], "--data",
                                           tiny["dev"], "--out", str(out)], r"--reward-model .*base: the model has 2 "
                                                                            r"outputs \(num_labels\)")
    (tmp_path / "file").write_text("")
    one_line_error(capsys, evaluate.main, ["--model", tiny["base"], "--reward-model", str(rm), "--data",
                                           tiny["dev"], "--out", str(tmp_path / "file" / "x")],
                   r"--out .*file/x: cannot create this folder")
    one_line_error(capsys, evaluate.main, ["--model", "./nomodel", "--reward-model", str(rm), "--data",
                                           tiny["dev"], "--out", str(out)], r"--model ./nomodel: no such folder")
    # records made by another run: its settings must be these
    (out / "parts" / "rank0.jsonl").write_text(json.dumps({"id": "x", "sample_sha256": "0"}) + "\n")
    settings = {"--model": {"path": "/other/model", "sha256": None}, "--reward-model": fingerprints.fingerprint(str(rm)),
                "--max-new-tokens": 128, "--max-prompt-len": 384, "--dtype": "float32"}
    (out / "settings.json").write_text(json.dumps(settings))
    argv = ["--model", tiny["base"], "--reward-model", str(rm), "--data", tiny["dev"], "--out", str(out)]
    one_line_error(capsys, evaluate.main, argv, r"--out .*eval was made with --model /other/model, not .*base; rerun")
    settings.pop("--dtype")                                    # written by a version before --dtype
    (out / "settings.json").write_text(json.dumps(dict(settings, **{"--model": fingerprints.fingerprint(tiny["base"])})))
    one_line_error(capsys, evaluate.main, argv, r"was made with --dtype None, not float32")
    (out / "settings.json").write_text('{"model": ')               # a kill mid-write, before writes were atomic
    one_line_error(capsys, evaluate.main, argv, r"settings.json: not valid JSON")
    (out / "settings.json").unlink()                           # records, and nothing to say what made them
    one_line_error(capsys, evaluate.main, argv, r"--out .*eval: its parts have no settings.json to say what made them")


# ---- checkpoints ------------------------------------------------------------------------------------------------

def test_damaged_checkpoint_falls_back_and_nothing_is_lost(tiny, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    os.remove(next(p for p in (out / "checkpoints" / "step_0000006").iterdir() if p.suffix == ".distcp"))
    (out / "checkpoints" / "step_0000009.tmp").mkdir()        # left by a kill mid-save, at another --save-every
    (out / "final.tmp").mkdir()                                # left by a kill mid-export
    shutil.rmtree(out / "final")
    with open(out / "log.jsonl", "a") as f:                    # and a log line the kill cut short
        f.write('{"step": 7, "lo')
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    printed = capsys.readouterr().out
    assert re.search(r"warning: --resume: .*step_0000006 is damaged \(__0_0.distcp is missing\)", printed)
    assert sorted(os.listdir(out)) == ["checkpoints", "final", "log.jsonl"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000003", "step_0000006"]     # rewritten, whole
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(resumed[name], finished[1][name]) for name in resumed)     # bit-identical
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(1, 7))                          # steps 4-6 once, though they ran twice


def test_resume_refuses_other_settings_and_a_broken_export_loses_nothing(tiny, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    one_line_error(capsys, train.main, train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume",
                                                  "--margin", "1"),
                   r"--resume: .*step_0000006 was made with --margin 3.0, not 1.0; rerun with the same settings")
    one_line_error(capsys, train.main, train_args(tiny, out, "--max-steps", "4", "--dtype", "float32", "--resume"),
                   r"--max-steps 4: .*step_0000006 is already past it")
    one_line_error(capsys, train.main, train_args(tiny, out, "--max-steps", "6", "--dtype", "float32"),
                   r"--out .* already holds a run \(checkpoints/ or final/\): pass --resume")
    os.remove(out / "checkpoints" / "step_0000003" / "meta.json")     # no complete checkpoint at all
    os.remove(out / "checkpoints" / "step_0000006" / "rng_rank0.pt")
    one_line_error(capsys, train.main, train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"),
                   r"--resume: no complete checkpoint in .* \(2 damaged\)")

    # an export killed halfway leaves its temporary folder and the earlier final/ as they were
    class Dying:
        def save_pretrained(self, path):
            raise KeyboardInterrupt
    cfg = train.Config(model=tiny["base"], out=str(out), dtype="float32")
    rank, _, device = train.init_distributed()
    try:
        model = train.build_model(cfg, __import__("transformers").AutoConfig.from_pretrained(tiny["base"]), device, 0)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.export_hf(cfg, model, Dying(), rank)
    finally:
        torch.distributed.destroy_process_group()
    assert [p.name for p in out.glob("final.*.tmp/config.json")]       # under a fresh temporary name
    assert load_file(str(out / "final" / "model.safetensors")).keys() == finished[1].keys()
    # killed between moving final/ aside and putting the new one in place: the next run puts the old one back
    os.replace(out / "final", out / "final.old")
    checkpoints.clean(cfg, 6, rank=0)
    assert sorted(os.listdir(out)) == ["checkpoints", "final", "log.jsonl"]
    assert load_file(str(out / "final" / "model.safetensors")).keys() == finished[1].keys()


# ---- the real command lines ------------------------------------------------------------------------------------

def test_under_torchrun_one_rank_prints_the_line(tiny, tmp_path):
    """A data mistake, found after the process group exists: rank 0 says it, both ranks exit with 2."""
    write(tmp_path / "empty.jsonl", [])
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "train.py", *train_args(tiny, tmp_path / "run", "--train", str(tmp_path / "empty.jsonl"))],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    ours = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert run.returncode != 0 and ours == [f"error: {tmp_path / 'empty.jsonl'}: no samples, the file is empty"], \
        run.stderr
    assert 'File "' + os.path.join(ROOT, "train.py") not in run.stderr          # no traceback of ours
    assert run.stderr.count("exitcode  : 2") == 2                                 # both ranks exit with 2


def test_alone_stderr_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "evaluate.py", "--model", "m", "--reward-model", "r", "--data",
                          str(tmp_path / "none.jsonl"), "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == f"error: --data {tmp_path / 'none.jsonl'}: no such file\n"


# ---- shared folders: one run per output -------------------------------------------------------------------------

def test_a_second_run_on_the_same_out_is_refused_and_writes_nothing(tiny, tmp_path, capsys):
    """Another run holds the lock: rescore.py (a real second process), evaluate.py and train.py each refuse in one
    line naming the output, before reading or writing anything."""
    path, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    write_jsonl(path, [sample(f"s{n}") for n in range(5)])
    with locks.lock(out + ".lock", "--out", out):           # the first run, still working
        run = subprocess.run([sys.executable, "rescore.py", "--reward-model", tiny["base"], "--data", path, "--out",
                              out], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr == (f"error: --out {out}: another run is writing it now (it holds "
                                                      f"{out}.lock); wait for it, or choose another --out\n")
        assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl.lock"]          # no parts, no settings
        (tmp_path / "run").mkdir()
        with locks.lock(str(tmp_path / "run" / ".lock"), "--out", str(tmp_path / "run")):
            one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run"), r"--out .*run: another run is "
                                                                                   r"writing it now")
            assert os.listdir(tmp_path / "run") == [".lock"]                       # nothing but the holder's lock
        (tmp_path / "eval").mkdir()
        with locks.lock(str(tmp_path / "eval" / ".lock"), "--out", str(tmp_path / "eval")):
            one_line_error(capsys, evaluate.main, ["--model", tiny["base"], "--reward-model", tiny["base"], "--data",
                                                   tiny["dev"], "--out", str(tmp_path / "eval")],
                           r"--out .*eval: another run is writing it now")
            assert sorted(os.listdir(tmp_path / "eval")) == [".lock", "parts"] and not os.listdir(tmp_path / "eval" / "parts")
    assert sorted(os.listdir(tmp_path)) == ["eval", "in.jsonl", "run"]             # released, and removed


def test_two_rescore_runs_on_one_out_never_mix(tmp_path):
    """Started a moment apart with different reward models: the second is refused; the output is the first's."""
    path, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    write_jsonl(path, [sample(f"s{n}") for n in range(40)])
    second = []

    def first_scorer(prompts, responses):                       # while the first scores, the second one starts
        if not second:
            with pytest.raises(UserError, match="another run is writing it now"):
                rescore.rescore_file("rm_b", path, out, score_fn=scorer({"Mix flour.": -9.0, "No.": 9.0}))
            second.append(True)
        return [1.0 if r == "Mix flour." else -1.0 for r in responses]
    rescore.rescore_file("rm_a", path, out, batch_size=1, score_fn=first_scorer)
    assert second and all(s["rewards"] == [1.0, -1.0] for s in data.read_samples(out))   # every reward is rm_a's


def test_results_are_tied_to_the_contents_of_their_inputs(tiny, tmp_path, capsys):
    """--train changed at the same path since the checkpoint: --resume refuses. --resume with no checkpoint yet
    starts (a requeue loop always passes it). --batch-size may change only where it cannot alter the objective."""
    train_file = tmp_path / "train.jsonl"
    shutil.copy(tiny["train"], train_file)
    args = train_args(tiny, tmp_path / "run", "--train", str(train_file), "--save-every", "2", "--dtype", "float32",
                      "--resume")
    train.main(args + ["--max-steps", "2"])                     # --resume on an empty --out: it trains
    assert "--resume: no checkpoint in" in capsys.readouterr().out and (tmp_path / "run" / "final").exists()
    with open(train_file, "a") as f:                            # the same path, other contents
        f.write(json.dumps(dict(data.read_samples(tiny["train"])[0], id="extra")) + "\n")
    one_line_error(capsys, train.main, args + ["--max-steps", "3"],
                   rf"--train {train_file}: its contents changed since --resume: .*step_0000002 was made from it")
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run", "--train", tiny["train"], "--max-steps", "3",
                                                  "--dtype", "float32", "--resume", "--batch-size", "4",
                                                  "--reduction", "official"),
                   r"made with --batch-size 2, not 4")


def test_batch_size_does_not_change_the_paper_reduction_but_changes_the_official_one(tiny, tokenizer):
    """The gradient of one optimizer step of 8 prompts, as micro-batches of 2 or of 4 (train.py's accumulation):
    the same under --reduction paper (a mean over prompts), not under official (a mean per micro-batch)."""
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    samples = data.read_samples(tiny["train"])[:8]
    gap = [4, 4, 1, 1] * 2                                      # kept, kept, dropped, dropped at reward_gap 3
    samples = [dict(s, rewards=[s["rewards"][0], s["rewards"][0] - gap[n]]) for n, s in enumerate(samples)]
    grads = {}
    for reduction in ("paper", "official"):
        cfg = train.Config(model=tiny["base"], max_len=128, max_prompt_len=64, reduction=reduction)
        for batch_size in (2, 4):
            model.zero_grad()
            for micro in range(0, 8, batch_size):
                batch = data.make_batch(tokenizer, samples[micro:micro + batch_size], 128, 64, share_prompt=True)
                (train.objective(cfg, model, batch)[0] * batch_size / 8).backward()
            grads[reduction, batch_size] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(grads["paper", 2], grads["paper", 4], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(grads["official", 2], grads["official", 4], atol=1e-4, rtol=1e-3)
    assert "batch_size" not in checkpoints.FREE_ON_RESUME      # free only under paper (find_resumable)


def test_evaluate_redoes_what_changed_in_its_inputs(tiny, tmp_path):
    """A rerun on a finished --out after the references changed (same ids and prompts), and after a sample gained
    a response (--extra): the results are a fresh --out's, and only the changed samples are generated again."""
    from transformers import LlamaConfig, LlamaForSequenceClassification, AutoTokenizer
    rm = tmp_path / "rm"
    config = LlamaConfig.from_pretrained(tiny["base"], num_labels=1)
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny["base"]).save_pretrained(rm)
    samples = data.read_samples(tiny["dev"])[:6]
    test = str(tmp_path / "test.jsonl")
    run = lambda out: evaluate.evaluate(evaluate.Config(model=tiny["base"], reward_model=str(rm), data=[test], out=str(
        out), batch_size=3, max_new_tokens=6, max_prompt_len=48))
    write_jsonl(test, samples)
    run(tmp_path / "eval")
    changed = [dict(s, responses=["Boil water first." if n == 0 else s["responses"][0], *s["responses"][1:]]
                    + (["Maybe."] if n == 1 else []), rewards=None) for n, s in enumerate(samples)]
    write_jsonl(test, changed)
    again, fresh = run(tmp_path / "eval"), run(tmp_path / "fresh")
    assert again == fresh and again["Total"]["n"] == 6
    lines = (tmp_path / "eval" / "parts" / "rank0.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 2                                  # the two changed samples, once more
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert records[0]["reference"] == "Boil water first." and records[1]["pairs"] == 3


# ---- the input checks -------------------------------------------------------------------------------------------

def test_an_output_that_is_a_symlink_is_written_through(tmp_path):
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, [sample("a")])
    (tmp_path / "target.jsonl").write_text("old\n")
    os.symlink(tmp_path / "target.jsonl", tmp_path / "out.jsonl")
    rescore.rescore_file("rm", path, str(tmp_path / "out.jsonl"), score_fn=scorer({"Mix flour.": 2.0, "No.": -1.0}))
    assert os.path.islink(tmp_path / "out.jsonl")                # the link stays, its target has the output
    assert data.read_samples(str(tmp_path / "target.jsonl"))[0]["rewards"] == [2.0, -1.0]


@pytest.mark.parametrize("reply", ["\u200b", "\x07\x07", " \u200b\u2060\n"])
def test_invisible_responses_are_refused_at_file_and_line(tmp_path, reply):
    path = write(tmp_path / "x.jsonl", [GOOD, json.dumps(sample("b", responses=["Fine.", reply]))])
    with pytest.raises(UserError, match=r"x.jsonl:2: 'responses' must hold at least 2 strings with visible text"):
        data.read_samples(path)


def oa_config_only(folder, tokenizer, **tokenizer_changes):
    """An OpenAssistant-format reward model folder with a config and a tokenizer but no weights: whatever is
    reported here is reported before any weight loads."""
    os.makedirs(folder)
    config = {"model_type": "gpt_neox_reward_model", "architectures": ["GPTNeoXRewardModel"], "pooling": "last",
              "vocab_size": len(tokenizer), "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    (folder / "config.json").write_text(json.dumps(config))
    for name, value in tokenizer_changes.items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_reward_model_as_the_policy_is_one_line(tiny, tokenizers, tmp_path, capsys):
    """OpenAssistant's reward model type is registered wherever rescore.py is imported (evaluate.py too): as
    --model it loaded a config that AutoModelForCausalLM cannot build, and a traceback came after."""
    rm = oa_config_only(tmp_path / "oa", tokenizers["bpe"])
    pattern = r"--model .*oa: a gpt_neox_reward_model model, which AutoModelForCausalLM cannot build"
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run")[2:] + ["--model", rm], pattern)
    one_line_error(capsys, evaluate.main, ["--model", rm, "--reward-model", rm, "--data", tiny["dev"], "--out",
                                           str(tmp_path / "eval")], pattern)


def test_reward_model_mistakes_are_found_before_its_weights_load(tokenizers, tmp_path, capsys):
    bad = write(tmp_path / "in.jsonl", [GOOD, json.dumps(sample("b", prompt="Tell me a joke.\n\nAssistant:"))])
    rm = oa_config_only(tmp_path / "oa", tokenizers["bpe"])
    one_line_error(capsys, rescore.main, ["--reward-model", rm, "--data", bad, "--out", str(tmp_path / "o.jsonl")],
                   r"in.jsonl:2: not an HH-RLHF prompt \('\\n\\nHuman: ... \\n\\nAssistant:'\): 'Tell me a joke")
    from transformers import PreTrainedTokenizerFast
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizers["bpe"].backend_tokenizer)     # no pad, no EOS
    rm = oa_config_only(tmp_path / "bare", bare)
    good = write(tmp_path / "good.jsonl", [GOOD])
    one_line_error(capsys, rescore.main, ["--reward-model", rm, "--data", good, "--out", str(tmp_path / "o.jsonl")],
                   r"--reward-model .*bare: its tokenizer has neither a pad nor an EOS token to pad a batch with")
    (tmp_path / "no_tokenizer").mkdir()
    shutil.copy(tmp_path / "oa" / "config.json", tmp_path / "no_tokenizer")
    one_line_error(capsys, rescore.main, ["--reward-model", str(tmp_path / "no_tokenizer"), "--data", good, "--out",
                                          str(tmp_path / "o.jsonl")],
                   r"--reward-model .*no_tokenizer: no tokenizer in this folder \(none of tokenizer.json, "
                   r"tokenizer.model, vocab.json, vocab.txt, spiece.model\)$")


# ---- preemption and a full disk: what is kept, and one line -----------------------------------------------------

def children(pid):
    found = []
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{child}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(child))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def test_sigterm_to_torchrun_saves_the_step_reached_and_resume_is_bit_identical(tiny, two_rank_run, tmp_path):
    """As Slurm or Kubernetes preempt a job: SIGTERM to torchrun, which passes it to the workers. They finish the
    step in flight, agree on it, save it on every rank, and exit; --resume then gives the uninterrupted weights.
    The workers are paused around the signal, so the step it lands in does not depend on the machine's speed."""
    out = tmp_path / "run"
    args = train_args(tiny, out, "--max-steps", "9", "--dtype", "float32")          # as two_rank_run
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 2:
        assert run.poll() is None and time.time() < deadline, "the run ended before its second step"
        time.sleep(0.01)
    workers = children(run.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    run.send_signal(signal.SIGTERM)
    time.sleep(2)                                              # torchrun passes SIGTERM on to the paused workers
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    _, err = run.communicate(timeout=240)
    said = re.findall(r"stopped by SIGTERM: saved step (\d+); rerun with --resume", err)
    assert len(said) == 1 and run.returncode != 0, err[-2000:]
    step = int(said[0])
    assert 2 <= step < 9 and not (out / "final").exists()
    assert checkpoints.step_dirs(str(out))[-1].endswith(f"step_{step:07d}")
    assert checkpoints.damage(checkpoints.step_dirs(str(out))[-1]) is None           # complete, on every rank
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == list(range(1, step + 1))
    torchrun(2, args + ["--resume"])
    w1, w2 = load_file(str(out / "final" / "model.safetensors")), load_file(str(two_rank_run / "final" / "model.safetensors"))
    assert all(torch.equal(w1[name], w2[name]) for name in w1)


def file_size_limit(size):
    """A disk that takes no file larger than `size` bytes, for a child process: writes past it fail with EFBIG,
    as they would with ENOSPC on a full disk or EDQUOT over a quota (SIGXFSZ, which would kill it, is ignored)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


def test_a_full_disk_is_one_line_and_a_rerun_with_room_finishes(tiny, two_rank_run, tmp_path):
    # train.py under torchrun: the first checkpoint cannot be written on either rank
    out = tmp_path / "run"
    args = train_args(tiny, out, "--max-steps", "9", "--dtype", "float32")          # as two_rank_run
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         preexec_fn=file_size_limit(400_000))
    ours = [line for line in run.stderr.splitlines() if line.startswith("error")]
    assert run.returncode != 0 and ours == [f"error: cannot write {out}/checkpoints/step_0000003 (the file could not "
                                            "be written in full): the checkpoints before it are kept; rerun with "
                                            "--resume once there is room"], run.stderr[-3000:]
    assert 'File "' + os.path.join(ROOT, "train.py") not in run.stderr and run.stderr.count("exitcode  : 2") == 2
    torchrun(2, args + ["--resume"])                           # no checkpoint was kept: it starts over, and finishes
    w1, w2 = load_file(str(out / "final" / "model.safetensors")), load_file(str(two_rank_run / "final" / "model.safetensors"))
    assert all(torch.equal(w1[name], w2[name]) for name in w1)

    # rescore.py: a part file that cannot grow, then an output that cannot be written; the reruns finish
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    rm = tmp_path / "rm"
    LlamaForSequenceClassification(LlamaConfig.from_pretrained(tiny["base"], num_labels=1)).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny["base"]).save_pretrained(rm)
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, [dict(s, rewards=None) for s in data.read_samples(tiny["train"])[:256]])
    command = [sys.executable, "rescore.py", "--reward-model", str(rm), "--data", path, "--batch-size", "8"]
    whole = subprocess.run(command + ["--out", str(tmp_path / "whole.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]
    for size, said in ((6_000, f"error: {tmp_path}/out.jsonl.part0: cannot write it (File too large); the samples "
                               "scored so far are kept, rerun the same command once there is room"),
                       (30_000, f"error: {tmp_path}/out.jsonl: cannot write it (File too large); nothing was "
                                "replaced, rerun once there is room")):
        run = subprocess.run(command + ["--out", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True,
                             text=True, preexec_fn=file_size_limit(size))
        assert run.returncode == 2 and run.stderr.splitlines()[-1] == said, run.stderr[-2000:]
        assert not (tmp_path / "out.jsonl").exists() and (tmp_path / "out.jsonl.part0").exists()
    run = subprocess.run(command + ["--out", str(tmp_path / "out.jsonl")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    for a, b in zip(data.read_samples(str(tmp_path / "out.jsonl")), data.read_samples(str(tmp_path / "whole.jsonl"))):
        assert a["id"] == b["id"] and a["rewards"] == pytest.approx(b["rewards"], abs=1e-5)


def test_a_full_disk_at_the_export_keeps_the_checkpoints(tiny, finished, tmp_path, capsys):
    class Full:
        def save_pretrained(self, path):
            raise OSError(errno.ENOSPC, "No space left on device")
    cfg = train.Config(model=tiny["base"], out=str(tmp_path), dtype="float32")
    rank, _, device = train.init_distributed()
    try:
        model = train.build_model(cfg, __import__("transformers").AutoConfig.from_pretrained(tiny["base"]), device, 0)
        with pytest.raises(UserError, match=rf"cannot write {tmp_path}/final \(No space left on device\): the "
                                                r"checkpoints are kept; rerun with --resume once there is room"):
            checkpoints.export_hf(cfg, model, Full(), rank)
    finally:
        torch.distributed.destroy_process_group()


def test_a_checkpoint_of_the_previous_version_resumes(tiny, finished, tmp_path):
    """meta.json written before --lr-decay and the input fingerprints existed: the flag it lacks had its default,
    and its --train is compared by path."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "final")
    meta_path = out / "checkpoints" / "step_0000006" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"].pop("lr_decay")
    meta.pop("inputs")
    meta_path.write_text(json.dumps(meta))
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(resumed[name], finished[1][name]) for name in resumed)


def test_rewards_of_mixed_k_are_left_out_of_a_batch(tokenizer):
    """evaluate.py mixes test files; a batch may hold K = 2 and K = 3 prompts, whose rewards make no tensor."""
    a, b = sample("a", rewards=[1.0, 0.0]), sample("b", responses=("Mix.", "No.", "Why?"), rewards=[1.0, 0.0, -1.0])
    batch = data.make_batch(tokenizer, [a, b], 64, 32, share_prompt=True)
    assert batch["rewards"] is None and batch["lengths"].shape == (5,)


def test_a_tokenizer_folder_needs_no_config(tokenizer, tmp_path, capsys):
    """--tokenizer (train.py) and --padding's --model (benchmark.py) may name a folder that holds only a tokenizer;
    a model folder needs its config.json."""
    from transformers import AutoConfig, AutoTokenizer
    tokenizer.save_pretrained(tmp_path / "tok")
    assert not (tmp_path / "tok" / "config.json").exists()
    loaded = models.from_pretrained(AutoTokenizer, str(tmp_path / "tok"), "--tokenizer")
    assert loaded("Hello")["input_ids"] == tokenizer("Hello")["input_ids"]
    with pytest.raises(UserError, match=r"--model .*tok: no config.json in this folder, so no checkpoint"):
        models.from_pretrained(AutoConfig, str(tmp_path / "tok"), "--model")
