"""Ablation sweeps as data (`sweep`), launchers (`launchers`, `run`) and reports (`compare`)."""
