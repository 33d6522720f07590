"""The parts of the GPU check (benchmarks/gpu_check.py), one module each, and
what they share (run.py: settings, Outcome, Deadline, scopes; summary.py: the
markdown tables)."""
