"""hayai.bench: measuring techniques on the user's model and machine.

- `timing.py`     wall time with warm-up and repeats: median, IQR, MAD (`time_callable`, `Timing`, `Stopwatch`)
- `memory.py`     peak RSS of a function in a fresh process (`run_isolated`), in-process phases (`PeakRSS`),
                  CUDA peaks (`cuda_peak_memory`)
- `flops.py`      forward/backward FLOPs of the native model from its config (`forward_flops`,
                  `training_step_flops`, `generation_flops`), `measure_flops` (PyTorch's counter)
- `bandwidth.py`  the measured read-bandwidth limit and the achieved fraction (`measure_read_bandwidth`)
- `energy.py`     RAPL / nvidia-smi energy, or a clear "unavailable" (`EnergyMeter`)
- `hardware.py`   what machine this is (`describe`, `one_line`, `cache_bytes`)
- `report.py`     results, Pareto fronts, report.md / results.json / PNG plots, rich tables
- `recommend.py`  the per-suite recommendation, derived from the measurements
- `datasets.py`, `generate_suite.py`, `finetune_suite.py`, `suites.py`: `hayai bench` (`run_bench`)

This package imports nothing heavy at import time: a child process that `run_isolated` starts for a
pure-Python function stays small.
"""
