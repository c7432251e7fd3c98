"""Tools around training: rank analysis, compression, the memory planner, sweeps and benchmarks.
Import every floor below them; nothing below imports them."""
