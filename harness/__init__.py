"""The harness: what keeps a run safe, so that the method files can stay about the method.

    flags.py         every script's flags from its Config dataclass; a user's mistake as one line and exit 2
    models.py        loading a checkpoint or tokenizer, with a bad folder or file as one line
    files.py         files written whole or not at all; JSON; the resumable part files of rescore/evaluate
    locks.py         one run per output (an OS lock), and the ranks of rescore.py and evaluate.py
    fingerprints.py  what an input was (the contents of a file, a model folder, a hub revision)
    preflight.py     train.py's checks before the model loads: flags, data, tokenizer, what Eq. 5 and 7 keep
    stopping.py      the step's vote: preemption signals and non-finite steps, agreed by every rank
    checkpoints.py   train.py's sharded checkpoints, verified before use, resume, and the final export
    logs.py          metrics per step, log.jsonl, TensorBoard and Weights & Biases

Nothing here imports train.py, rescore.py or evaluate.py; data.py is the one method file it uses.
"""
