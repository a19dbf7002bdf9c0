"""Fault injection: a user's mistake is one line on stderr and a non-zero exit, and no run loses or mixes data.

    python -m pytest test_faults.py

Each probe runs an entry script's main() through cli.run, as its command line does, and checks the exit status
(2), that stderr is one line, and that the line names the flag, or the file and line. Two probes run the real
command lines: under torchrun, and alone.
"""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import cli
import data
import evaluate
import rescore
import train
from conftest import train_args

ROOT = os.path.dirname(os.path.abspath(__file__))
PROMPT = "\n\nHuman: How do I bake bread?\n\nAssistant:"


def one_line_error(capsys, main, argv, pattern):
    """main(argv) as its command line runs it: exit status 2 and exactly one line on stderr, matching `pattern`."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(pattern, err), err
    return err


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
    data.write_jsonl(str(tmp_path / "small.jsonl"), small)
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
    with pytest.raises(cli.UserError, match=pattern):
        data.read_samples(path)


def test_bytes_and_compression(tmp_path):
    with open(tmp_path / "x.jsonl", "wb") as f:
        f.write(GOOD.encode() + b"\n" + json.dumps(sample("b")).encode()[:-3] + b"\xff\xfe\"}\n")
    with pytest.raises(cli.UserError, match=r"x.jsonl:2: not UTF-8 text"):
        data.read_samples(str(tmp_path / "x.jsonl"))
    # gzip and plain text are told apart by their bytes, whatever the name says
    plain, zipped = write(tmp_path / "plain.jsonl.gz", [GOOD]), write(tmp_path / "zipped.jsonl", [GOOD], gzip.open)
    assert data.read_samples(plain) == data.read_samples(zipped) == [json.loads(GOOD)]
    with open(zipped, "rb") as f:
        cut = f.read()[:-12]                                   # a partial download
    with open(tmp_path / "cut.jsonl.gz", "wb") as f:
        f.write(cut)
    with pytest.raises(cli.UserError, match=r"cut.jsonl.gz:\d+: broken gzip data"):
        data.read_samples(str(tmp_path / "cut.jsonl.gz"))


def test_data_py_and_empty_files(tmp_path, capsys):
    one_line_error(capsys, data.main, ["--hh-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                   r"--hh-dir .*nope: no such folder")
    (tmp_path / "file").write_text("")
    one_line_error(capsys, data.main, ["--hh-dir", str(tmp_path), "--out", str(tmp_path / "file")],
                   r"--out .*file: cannot create this folder \(File exists\)")
    for subset in data.SUBSETS:                                # 4 x 3 test pairs: not enough for 280 dev samples
        for split in ("train", "test"):
            (tmp_path / "hh" / subset).mkdir(parents=True, exist_ok=True)
            write(tmp_path / "hh" / subset / f"{split}.jsonl.gz", [json.dumps(
                {"chosen": f"\n\nHuman: {subset} {i}?\n\nAssistant: yes", "rejected": f"\n\nHuman: {subset} {i}?"
                 "\n\nAssistant: no"}) for i in range(3)], gzip.open)
    one_line_error(capsys, data.main, ["--hh-dir", str(tmp_path / "hh"), "--out", str(tmp_path / "o")],
                   r"--dev-size 280: there are only 12 test samples")


def test_empty_training_file(tiny, tmp_path, capsys):
    write(tmp_path / "empty.jsonl", ["", "  "])
    one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run", "--train", str(tmp_path / "empty.jsonl")),
                   r"empty.jsonl: no samples, the file is empty")


# ---- rescore.py -------------------------------------------------------------------------------------------------

def scorer(table):
    return lambda prompts, responses: [table[r] for r in responses]


def test_rescore_resume_with_other_settings_is_refused(tmp_path):
    path, out = str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl")
    data.write_jsonl(path, [sample(f"s{n}") for n in range(20)])

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
        with pytest.raises(cli.UserError, match=pattern):
            rescore.rescore_file(settings.pop("reward_model"), path, out, batch_size=1, score_fn=crash, **settings)
    with open(path, "a") as f:                                 # the same file name, other contents
        f.write(json.dumps(sample("s99")) + "\n")
    with pytest.raises(cli.UserError, match=r"--data .*in.jsonl: its contents changed since --out .* was made from it"):
        rescore.rescore_file("rm_a", path, out, batch_size=1, score_fn=crash)
    assert open(out + ".part0").read() == part and not os.path.exists(out)            # nothing mixed or lost


def test_rescore_outputs(tmp_path, capsys):
    path = str(tmp_path / "in.jsonl")
    data.write_jsonl(path, [sample("a"), sample("b", responses=["No.", "Mix flour."])])
    table = scorer({"Mix flour.": 4.0, "No.": -1.0})
    rescore.rescore_file("rm", path, str(tmp_path / "new" / "dir" / "out.jsonl"), score_fn=table)   # made for us
    rescore.rescore_file("rm", path, str(tmp_path / "out.jsonl.gz"), score_fn=table)
    with open(tmp_path / "out.jsonl.gz", "rb") as f:
        assert f.read(2) == b"\x1f\x8b"                        # .gz means gzip
    assert data.read_samples(str(tmp_path / "out.jsonl.gz")) == \
        data.read_samples(str(tmp_path / "new" / "dir" / "out.jsonl"))
    with pytest.raises(cli.UserError, match=r"--out .*new: is a folder"):
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
    settings = {"--model": {"path": "/other/model", "sha256": None}, "--reward-model": checkpoint.fingerprint(str(rm)),
                "--max-new-tokens": 128, "--max-prompt-len": 384, "--dtype": "float32"}
    (out / "settings.json").write_text(json.dumps(settings))
    argv = ["--model", tiny["base"], "--reward-model", str(rm), "--data", tiny["dev"], "--out", str(out)]
    one_line_error(capsys, evaluate.main, argv, r"--out .*eval was made with --model /other/model, not .*base; rerun")
    settings.pop("--dtype")                                    # written by a version before --dtype
    (out / "settings.json").write_text(json.dumps(dict(settings, **{"--model": checkpoint.fingerprint(tiny["base"])})))
    one_line_error(capsys, evaluate.main, argv, r"was made with --dtype None, not float32")
    (out / "settings.json").write_text('{"model": ')               # a kill mid-write, before writes were atomic
    one_line_error(capsys, evaluate.main, argv, r"settings.json: not valid JSON")


# ---- checkpoints ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 6-step run (checkpoints at 3 and 6), one process, and a copy of its exported weights."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32"))
    return out, load_file(str(out / "final" / "model.safetensors"))


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

    # an export killed halfway leaves final.tmp and the earlier final/ as they were
    class Dying:
        def save_pretrained(self, path):
            raise KeyboardInterrupt
    cfg = train.Config(model=tiny["base"], out=str(out), dtype="float32")
    rank, _, device = train.init_distributed()
    try:
        model = train.build_model(cfg, __import__("transformers").AutoConfig.from_pretrained(tiny["base"]), device, 0)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.export_hf(cfg, model, Dying(), rank)
    finally:
        torch.distributed.destroy_process_group()
    assert (out / "final.tmp" / "config.json").exists()
    assert load_file(str(out / "final" / "model.safetensors")).keys() == finished[1].keys()
    # killed between moving final/ aside and putting the new one in place: the next run puts the old one back
    os.replace(out / "final", out / "final.old")
    checkpoint.clean(cfg, None, rank=0)
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
