"""What guards a run at first contact: nothing non-finite reaches the weights or a file, a checkpoint
is verified before it is used and runs no code, and the GPU path's checks that a CPU can exercise.

    python -m pytest tests/test_guards.py

Each test fails on the code before these guards (noted where it is not obvious).
"""

import hashlib
import io
import json
import os
import pickle
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from transformers import AutoConfig

import data
import train
from data import UserError
from harness import checkpoints, flags, stopping
from conftest import master_weights, one_line_error, train_args

STEP6 = os.path.join("checkpoints", "step_0000006")


@pytest.fixture
def one_process():
    yield train.init_distributed()
    torch.distributed.destroy_process_group()


def build(tiny, **flags):
    cfg = train.Config(model=tiny["base"], dtype="float32", **flags)
    rank, _, device = 0, 1, torch.device("cpu")
    model = train.build_model(cfg, AutoConfig.from_pretrained(tiny["base"]), device, rank)
    return cfg, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def unfinished(finished, out):
    """A copy of the finished 6-step run at `out`, without its export, for a resume to step 6."""
    shutil.copytree(finished[0], out)
    shutil.rmtree(out / "final")


def assert_final_is_uninterrupted(out, finished):
    """The resumed run's export is the uninterrupted run's, bit for bit."""
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(resumed[name], finished[1][name]) for name in resumed)


# ---- nothing non-finite reaches the weights --------------------------------------------------------

def test_a_diverging_run_stops_in_one_line_and_saves_nothing_non_finite(tiny, tmp_path, capsys):
    """--lr 1e10: the first update is huge but finite, every loss after it NaN. Before, the run
    logged NaN and exported NaN weights with exit 0; now those steps are skipped and counted, and
    three in a row stop the run, which exports nothing."""
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        flags.run(train.main, train_args(tiny, out, "--lr", "1e10", "--max-steps", "12", "--dtype",
                                         "float32"))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert exit.value.code == 2 and len(errors) == 1, errors              # under the progress bar
    assert re.match(r"error: training diverged: steps 2-4 had a non-finite loss or gradient norm, and "
                    r"none was applied; the checkpoints are kept \(newest: step_0000003\)", errors[0])
    assert not (out / "final").exists()
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["skipped"] for r in records] == [0, 1, 1, 1]
    assert all(torch.isfinite(w).all() for w in master_weights(out, 3).values())


def test_non_finite_state_is_neither_saved_nor_exported(tiny, tmp_path, one_process):
    cfg, model, optimizer = build(tiny, out=str(tmp_path / "run"))
    os.makedirs(cfg.out)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.to_local()[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"the weights or AdamW's state at step 5 are not finite, so "
                                        r"they were not saved"):
        checkpoints.save(cfg, model, optimizer, 5, 0, 1, {})
    with pytest.raises(UserError, match="the final weights are not finite, so OUT/final was not"):
        checkpoints.export_hf(cfg, model, None, 0)
    assert os.listdir(cfg.out) == ["checkpoints"] and not os.listdir(os.path.join(cfg.out, "checkpoints"))


# ---- a damaged checkpoint falls back to the newest intact one ---------------------------------------

def flip_bytes(path):
    shard = next(p for p in sorted(os.listdir(path)) if p.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        word = f.read(4)
        f.seek(-4, 1)
        f.write(bytes(b ^ 0xFF for b in word))              # four bytes flipped, the size unchanged


def cut_rng(path):
    with open(os.path.join(path, "rng_rank0.pt"), "r+b") as f:
        f.truncate(20)


def zero_shard(path):
    shard = next(p for p in sorted(os.listdir(path)) if p.endswith(".distcp"))
    size = os.path.getsize(os.path.join(path, shard))
    with open(os.path.join(path, shard), "wb") as f:
        f.write(bytes(size))


@pytest.mark.parametrize("damage, reason", [
    (flip_bytes, r"__0_0.distcp is not what was written \(its SHA-256 differs\)"),
    (cut_rng, r"rng_rank0.pt is not what was written \(its SHA-256 differs\)"),
    (zero_shard, r"__0_0.distcp is not what was written \(its SHA-256 differs\)"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_it_used(tiny, finished, tmp_path,
                                                                        capsys, damage, reason):
    """Before, only sizes were checked: flipped bytes resumed into NaN (AdamW's second moment went
    negative), and a cut RNG file or a zeroed shard was a traceback."""
    out = tmp_path / "run"
    unfinished(finished, out)
    damage(str(out / STEP6))
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    printed = capsys.readouterr().out
    assert re.search(rf"warning: --resume: .*step_0000006 is damaged \({reason}\)", printed), printed
    assert_final_is_uninterrupted(out, finished)   # from step 3, exactly


def rewrite(path, model_state, optimizer_state, files=True):
    """Write a checkpoint folder's shards again from these states, with or without the hashes."""
    for name in os.listdir(path):
        if name.endswith(".distcp") or name == ".metadata":
            os.remove(os.path.join(path, name))
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=path)
    meta = json.loads(open(os.path.join(path, "meta.json")).read())
    meta.pop("files")
    if files:
        meta["files"] = {n: checkpoints.sha256(os.path.join(path, n)) for n in os.listdir(path)
                         if n != "meta.json"}
    open(os.path.join(path, "meta.json"), "w").write(json.dumps(meta))


def test_a_resume_hashes_only_the_checkpoint_it_uses(tiny, finished, tmp_path, monkeypatch):
    """Before, every kept checkpoint was hashed before the newest was used (2 x 84 GB at 7B)."""
    out, hashed = tmp_path / "run", []
    unfinished(finished, out)
    sha256 = checkpoints.sha256
    monkeypatch.setattr(checkpoints, "sha256", lambda path: hashed.append(path) or sha256(path))
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert hashed and {os.path.dirname(path) for path in hashed} == {str(out / STEP6)}


def test_a_checkpoint_whose_state_is_not_finite_is_skipped(tiny, finished, tmp_path, capsys):
    """Shards with a NaN in AdamW's state, hashed as written (a state saved by a version without the
    finiteness check, or a kernel's NaN): the loaded state is checked, and the one before it used."""
    out = tmp_path / "run"
    unfinished(finished, out)
    train.init_distributed()
    try:
        cfg, model, optimizer = build(tiny)
        checkpoints.load([str(out / STEP6)], model, optimizer, 0)
        state = get_optimizer_state_dict(model, optimizer)["state"]
        next(iter(state.values()))["exp_avg_sq"].to_local()[0] = float("nan")
        rewrite(str(out / STEP6), get_model_state_dict(model), {"state": state})
    finally:
        torch.distributed.destroy_process_group()
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert re.search(r"step_0000006 is damaged \(not finite\); the one before it is tried",
                     capsys.readouterr().out)
    assert_final_is_uninterrupted(out, finished)


def test_a_checkpoint_written_by_the_previous_version_resumes(tiny, finished, tmp_path, capsys):
    """The previous version stored the whole optimizer state dict (its hyperparameters pickled into the
    shards) and no hashes. It resumes; its pickled parts are never read."""
    out = tmp_path / "run"
    unfinished(finished, out)
    train.init_distributed()
    try:
        cfg, model, optimizer = build(tiny)
        checkpoints.load([str(out / STEP6)], model, optimizer, 0)
        rewrite(str(out / STEP6), get_model_state_dict(model),
                get_optimizer_state_dict(model, optimizer), files=False)
    finally:
        torch.distributed.destroy_process_group()
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert "damaged" not in capsys.readouterr().out                # step 6 itself was loaded
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(1, 7))                              # resumed at 6: nothing redone
    assert_final_is_uninterrupted(out, finished)


# ---- nothing untrusted runs -------------------------------------------------------------------------

class Planted:
    """A pickle that runs a command when it is loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("hashes", ["kept", "rewritten", "none"])
def test_a_pickle_planted_in_a_checkpoint_runs_nothing(tiny, finished, tmp_path, capsys, hashes):
    """The newest checkpoint's index replaced by a pickle that runs a command: before, --resume ran it
    (and then trained and exported, exit 0). kept: its hash no longer matches; rewritten: whoever
    planted it also rewrote meta.json; none: a checkpoint of the previous version, without hashes."""
    out, marker = tmp_path / "run", tmp_path / "ran"
    unfinished(finished, out)
    index = out / STEP6 / ".metadata"
    index.write_bytes(pickle.dumps(Planted(marker)))
    meta = json.loads((out / STEP6 / "meta.json").read_text())
    if hashes == "rewritten":
        meta["files"][".metadata"] = hashlib.sha256(index.read_bytes()).hexdigest()
    if hashes == "none":
        meta.pop("files")
    (out / STEP6 / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert not marker.exists()
    assert re.search(r"step_0000006 is damaged \(", capsys.readouterr().out)
    assert load_file(str(out / "final" / "model.safetensors")).keys() == finished[1].keys()


def test_a_non_tensor_entry_planted_in_a_checkpoint_runs_nothing(tiny, finished, tmp_path, capsys):
    """A valid DCP index whose first model entry says "bytes", pointing at a pickle that runs a
    command, with meta.json's hashes rewritten to match: DCP reads such an entry with torch.load's
    full unpickler, so before, the index's own check let it through and --resume ran the command."""
    out, marker = tmp_path / "run", tmp_path / "ran"
    unfinished(finished, out)
    folder = out / STEP6
    with open(folder / ".metadata", "rb") as f:
        index = pickle.load(f)
    key = next(k for k in index.state_dict_metadata if k.startswith("model."))
    payload = io.BytesIO()
    torch.save(Planted(marker), payload)
    (folder / "__0_9.distcp").write_bytes(payload.getvalue())
    index.state_dict_metadata[key] = BytesStorageMetadata()
    index.storage_data[MetadataIndex(key)] = _StorageInfo("__0_9.distcp", 0,
                                                          len(payload.getvalue()))
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(index, f)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"] = {n: checkpoints.sha256(str(folder / n)) for n in os.listdir(folder)
                     if n != "meta.json"}
    (folder / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert not marker.exists()
    assert re.search(rf"step_0000006 is damaged \(unreadable: .*{re.escape(key)}.* refused",
                     capsys.readouterr().out)
    assert_final_is_uninterrupted(out, finished)


def test_a_file_the_hashes_do_not_list_is_damage(tiny, finished, tmp_path, capsys):
    """meta.json's list of hashes emptied: before, nothing was checked and the index was read."""
    out = tmp_path / "run"
    unfinished(finished, out)
    meta = json.loads((out / STEP6 / "meta.json").read_text())
    meta["files"] = {}
    (out / STEP6 / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert re.search(r"step_0000006 is damaged \(.metadata is not among the files it recorded\)",
                     capsys.readouterr().out)
    assert_final_is_uninterrupted(out, finished)


def test_planted_temporary_files_and_links_are_not_written_through(tiny, finished, tmp_path):
    """Names a run writes under for a moment, planted beforehand as links to a victim: the old code
    wrote log.jsonl.tmp and step_N.tmp/final.tmp through them; now each temporary name is made afresh."""
    out, victim = tmp_path / "run", tmp_path / "victim"
    unfinished(finished, out)
    shutil.rmtree(out / STEP6)                                   # the resumed run saves step 6 again
    victim.mkdir()
    (victim / "file").write_text("precious")
    for name in ("log.jsonl.tmp", "checkpoints/step_0000006.tmp", "final.tmp"):
        os.symlink(victim / "file" if name.endswith("jsonl.tmp") else victim, out / name)
    train.main(train_args(tiny, out, "--max-steps", "6", "--dtype", "float32", "--resume"))
    assert sorted(os.listdir(victim)) == ["file"] and (victim / "file").read_text() == "precious"
    assert_final_is_uninterrupted(out, finished)


# ---- the GPU path, as far as a CPU can show it -------------------------------------------------------

def test_more_processes_than_gpus_is_one_line(monkeypatch):
    """torchrun --nproc_per_node 2 on a node that shows one GPU: before, "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match=r"--nproc_per_node 2: this node shows 1 GPUs"):
        train.init_distributed()


@pytest.mark.parametrize("script", ["train", "rescore", "evaluate"])
def test_a_local_rank_beyond_the_gpus_is_one_line(script, monkeypatch, capsys, tmp_path):
    """srun, mpirun or a hand-set environment: LOCAL_RANK 3 on a node that shows 2 GPUs. Before,
    "invalid device ordinal" in train.py (which checked LOCAL_WORLD_SIZE only), in rescore.py when
    its weights were placed, and a KeyError in evaluate.py when RANK was set without LOCAL_RANK."""
    import evaluate
    import rescore
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device ran"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    if script == "train":
        with pytest.raises(UserError, match=r"^LOCAL_RANK 3: this node shows 2 GPUs"):
            train.init_distributed()
        return
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text("")
    argv = ["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "out"),
            "--reward-model", str(folder)] + (["--model", str(folder)] if script == "evaluate"
                                              else [])
    main = rescore.main if script == "rescore" else evaluate.main
    one_line_error(capsys, main, argv, r"LOCAL_RANK 3: this node shows 2 GPUs")


def test_wandb_that_cannot_start_is_one_line_before_the_weights_load(tiny, tmp_path, monkeypatch,
                                                                     capsys):
    """No API key: before, a traceback once the weights had loaded (minutes for LLaMA-7B)."""
    wandb = pytest.importorskip("wandb", reason="pip install wandb to test --wandb (.ci/run does)")
    wandb.teardown()                     # an earlier test's offline run leaves settings in this process
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                      # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the weights loaded"))
    try:
        one_line_error(capsys, train.main, train_args(tiny, tmp_path / "run", "--wandb", "clha"),
                       r"--wandb clha: cannot start a run \(.*\): run `wandb login`, or set "
                       r"WANDB_MODE=offline")
    finally:
        wandb.teardown()                 # and this test's failed start leaves none for the next


def test_compile_keeps_activation_checkpointing(tiny, tokenizer, one_process, monkeypatch):
    """transformers checkpoints a layer only while type(layer).forward is its wrapper; the old code
    put the compiled forward on the instance, so --compile silently checkpointed nothing (0 regions
    per forward instead of one per layer)."""
    regions = []
    generator = torch.utils.checkpoint._checkpoint_without_reentrant_generator

    def counted(*args, **kwargs):
        regions.append(1)
        yield from generator(*args, **kwargs)
    monkeypatch.setattr(torch.utils.checkpoint, "_checkpoint_without_reentrant_generator", counted)
    monkeypatch.setattr(torch._dynamo.config, "debug_backend_override", ">=0:aot_eager")   # no C++ build
    batch = data.make_batch(tokenizer, tiny["dev_samples"][:2], 128, 64, True, 1024)
    counts = {}
    for compile in (False, True):
        cfg, model, _ = build(tiny, compile=compile)
        regions.clear()
        train.objective(cfg, model, batch)[0].backward()
        counts[compile] = len(regions)
    torch._dynamo.reset()
    layers = AutoConfig.from_pretrained(tiny["base"]).num_hidden_layers
    assert counts == {False: layers, True: layers}


def test_batches_for_a_gpu_are_pinned_where_they_are_made(tiny, tokenizer, monkeypatch):
    """A non-blocking copy from pageable memory first waits for the GPU's queue: before, every
    micro-batch's copy did. Each tensor is pinned in the thread that tokenizes a step ahead."""
    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    cfg = train.Config(model=tiny["base"], batch_size=2, global_batch=2)
    steps = train.steps_of_batches(cfg, tiny["dev_samples"][:4], tokenizer, 0, 1, 0)
    _, _, [batch] = next(steps)
    steps.close()
    leaves = [v for value in batch.values()
              for v in (value if isinstance(value, tuple) else (value,)) if torch.is_tensor(v)]
    assert len(leaves) >= 10 and all(any(v is p for p in pinned) for v in leaves)


@pytest.mark.parametrize("share_prompt, pack_len", [(True, 1024), (True, None), (False, None)],
                         ids=["packed", "no-pack", "no-share-prompt"])
def test_a_micro_batch_never_waits_for_the_device(tiny, tokenizer, one_process, monkeypatch,
                                                  share_prompt, pack_len):
    """Forward and backward of a micro-batch convert no tensor to a Python value (on a GPU each would
    wait for it: int(cols.min()), int(lengths.max()) and nonzero().tolist() did, and transformers'
    padding_mask.all() on --no-share-prompt's [R, L] mask did); the step's one wait is its vote."""
    cfg, model, _ = build(tiny, share_prompt=share_prompt)
    batch = data.to_device(data.make_batch(tokenizer, tiny["dev_samples"][:4], 128, 64, share_prompt,
                                           pack_len), torch.device("cpu"))
    waits = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k:
                            waits.append(_n) or _o(self, *a, **k))
    loss, _ = train.objective(cfg, model, batch)
    loss.backward()
    assert waits == []
    sums = torch.zeros(3)
    stopping.vote(sums, (1, 2))
    assert waits == ["tolist"]


def test_no_model_loads_with_hub_kernels(tiny, tmp_path, monkeypatch):
    """transformers (5.25) swaps layers for kernels downloaded from the hub whenever `kernels` is installed,
    unless told not to: offline on a GPU evaluate.py died of it ('kernels-community/rotary could not verify
    publisher trust status'), and online it would run code from the hub. Every model we load says no; a config
    or tokenizer is not given the flag (a config would keep it as an attribute)."""
    import importlib.util
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    import rescore
    from harness import models
    if importlib.util.find_spec("kernels"):                   # the default this guards against, where it applies
        assert AutoModelForCausalLM.from_pretrained(tiny["base"]).use_kernels
    assert not models.from_pretrained(AutoModelForCausalLM, tiny["base"], "--model").use_kernels
    assert not models.load_model(AutoModelForCausalLM, tiny["base"], "--model", "cpu", "float32").use_kernels
    config = AutoConfig.from_pretrained(tiny["base"])
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny["base"]).save_pretrained(tmp_path / "rm")
    assert not rescore.load_reward_model(str(tmp_path / "rm"))[0].use_kernels
    seen = []
    for loader in (AutoConfig, AutoTokenizer):
        monkeypatch.setattr(loader, "from_pretrained", lambda path, **kw: seen.append(kw))
        models.from_pretrained(loader, tiny["base"], "--model")
    assert seen == [{"trust_remote_code": False}] * 2
