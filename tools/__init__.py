"""Tools built on the method files: the paper's splits of HH-RLHF, the demo, the benchmark, and a
picture of training runs."""
