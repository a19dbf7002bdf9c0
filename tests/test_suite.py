"""The GPU suite's end-to-end block (tools/suite.py, as tools/benchmark.py --e2e runs it), on this
CPU: what a GPU session runs first, with the few minutes it has once.

    python -m pytest tests/test_suite.py         # about 1.5 min on 2 cores

Each row must report its outcome as one RESULT line, the block must go on past a row that fails or
hangs, and its checks must hold where they can be exact: a CPU resumes bit-identically.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tools import benchmark, suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


def e2e(folder, *flags, env=None):
    """benchmark.py --e2e as a GPU session runs it -> (the finished process, {row: its RESULT})."""
    done = subprocess.run([sys.executable, "tools/benchmark.py", "--e2e", "--e2e-dir", str(folder),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, **(env or {})})
    rows = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines()
            if line.startswith("RESULT ")]
    return done, {r["e2e"]: r for r in rows}


def test_the_pipeline_end_to_end_on_a_cpu(tmp_path):
    start = time.monotonic()
    with socket.socket() as held:               # as an earlier test's process group leaves it: the
        held.bind(("127.0.0.1", 0))             # port in MASTER_PORT taken, which no row may reuse
        held.listen()
        port = str(held.getsockname()[1])
        done, rows = e2e(tmp_path, env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                        "RANK": "0", "WORLD_SIZE": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert list(rows) == list(suite.E2E_ROWS), rows                  # a RESULT line per row
    train, resume = rows["train"], rows["resume"]
    assert train["status"] == "ok" and len(train["losses"]) == suite.E2E_STEPS
    assert rows["train_2gpu"]["status"] == "skipped: fewer than 2 GPUs"
    # SIGKILLed (torchrun and its worker) after a checkpoint, resumed: the whole run's very floats
    assert resume["status"] == "ok", resume
    assert 2 <= resume["killed_after_step"] < suite.E2E_STEPS
    assert resume["bit_identical"] and resume["tolerance"] == 0
    assert resume["losses"] == train["losses"] and resume["max_weight_diff"] == 0.0
    assert resume["reload"]["logits_finite"]                       # final/ through from_pretrained
    # evaluate.py on the resumed export wrote its results, every number finite
    evaluate = rows["evaluate"]
    assert evaluate["status"] == "ok" and evaluate["model"] == resume["final"]
    with open(tmp_path / "eval" / "results.json") as f:
        assert json.load(f)["Total"]["n"] == evaluate["total"]["n"] == 8
    # a CLHA step at a row length 64 past a 128-wide tile: finite gradients, the kernel named
    gradients = rows["gradients"]
    assert gradients["status"] == "ok", gradients
    assert gradients["L"] % 128 == 64 and gradients["L"] >= 192
    ours = gradients["as_train_py"]
    assert ours["grads_finite"] and ours["trigger_grad_q_finite"] and ours["grads"] > 0
    assert ours["backends"] and any("scaled_dot_product" in k for k in ours["kernels"])
    assert gradients["cudnn_allowed"] == "skipped: no CUDA"
    offload = rows["offload"]
    assert offload["status"] == "ok" and offload["shards_on_host"] and offload["peak_rss_gb"] > 0
    assert offload["pinned"] == "skipped: no CUDA"
    assert "| resume | ok |" in done.stdout                              # the summary table
    print(f"--e2e took {time.monotonic() - start:.0f} s")


def sleeping():
    """The processes the hang injection starts (torchrun --no-python sleep 577), anywhere."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:2] == [b"sleep", b"577"]:
                    found.append(pid)
        except OSError:
            pass
    return found


def test_a_failing_or_hanging_row_is_reported_and_the_others_go_on(tmp_path):
    done, rows = e2e(tmp_path, "--e2e-rows", "train", "resume", "gradients", "offload",
                     env={suite.FAIL_ENV: "train:hang,gradients"})
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--e2e: 2 rows failed: train, gradients" in done.stderr
    assert rows["train"]["status"] == "failed"
    assert rows["train"]["error"] == "timed out after 5 s (killed, with its workers)"
    assert not sleeping()                                  # torchrun's worker, in its own session
    assert rows["resume"]["status"] == "skipped: needs the train row, which did not pass here"
    assert rows["gradients"]["status"] == "failed"
    assert rows["gradients"]["error"].startswith("exit status 2")
    failed = done.stdout[done.stdout.index("FAILED: e2e row gradients"):]
    assert "unrecognized arguments: --no-such-flag" in failed      # the tail of its stderr
    assert rows["offload"]["status"] == "ok"                       # two failures later, it runs
    assert "| gradients | failed |" in done.stdout and "| offload | ok |" in done.stdout


def test_resume_tolerance():
    """Bit-identical on a CPU; on a GPU within RESUME_RTOL_GPU, which other prompts (a lost data
    order) exceed by far: this model's losses differ by 10-30% from step to step."""
    reference = {1: 11.32, 2: 12.30, 3: 8.59, 4: 9.86}
    assert suite.compare_losses(dict(reference), reference, 0)["bit_identical"]
    with pytest.raises(suite.RowFailed, match="uninterrupted run's by 1.00e-06"):
        suite.compare_losses({**reference, 4: 9.86 * (1 + 1e-6)}, reference, 0)
    noisy = {s: x * (1 + 0.004 * (-1) ** s) for s, x in reference.items()}     # bf16 noise
    found = suite.compare_losses(noisy, reference, suite.RESUME_RTOL_GPU)
    assert not found["bit_identical"] and found["max_rel_diff"] < 0.005
    shifted = {s: reference[s % 4 + 1] for s in reference}               # the next step's prompts
    with pytest.raises(suite.RowFailed, match="tolerance 0.01"):
        suite.compare_losses(shifted, reference, suite.RESUME_RTOL_GPU)


def test_rows_past_the_budget_are_skipped(tmp_path, capsys):
    cfg = benchmark.flags.parse(benchmark.Config, ["--e2e", "--e2e-dir", str(tmp_path)])
    results = suite.e2e(cfg, deadline=time.monotonic())
    spent = "skipped: the suite's time budget is spent"
    assert [r["status"] for r in results] == [spent] * len(suite.E2E_ROWS)
    assert f"| offload | {spent} |" in capsys.readouterr().out
