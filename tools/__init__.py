"""Tools built on the method files: the demo, the benchmark, and a picture of training runs."""
