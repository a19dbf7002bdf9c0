"""The harness: what keeps a run safe, so that the method files can stay about the method.

    flags.py         every script's flags from its Config dataclass; a mistake: one line, exit 2
    models.py        loading a checkpoint or tokenizer: a bad one is one line, and no code of its
                     own or the hub's runs; what the layouts need of a tokenizer and a config
    openassistant.py the paper's reward models, defined here so that no downloaded code runs
    files.py         files written whole or not at all (samples, JSON); rescore's and evaluate's
                     part files
    locks.py         one run per output (an OS lock); the ranks of rescore.py and evaluate.py,
                     and the share of the work each has left
    fingerprints.py  what an input was (a file's contents, a model folder's, a hub revision)
    preflight.py     train.py's checks before the model loads: flags, data, tokenizer, what Eq. 5
                     and Eq. 7 keep of the data
    stopping.py      the step's vote (preemption signals, non-finite steps), agreed by every rank
    checkpoints.py   train.py's sharded checkpoints, verified before use, resume, and the export
    logs.py          metrics per step, log.jsonl, TensorBoard and Weights & Biases

Nothing here imports train.py, rescore.py or evaluate.py; data.py is the one method file it uses.
"""
