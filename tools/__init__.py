"""Tools built on the method files: HH-RLHF's parsing and the paper's splits (the pipeline's first
step), the demo, the benchmark, and a picture of training runs."""
