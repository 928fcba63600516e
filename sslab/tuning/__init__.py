"""Hyperparameter sweeps (`sslab tune`): Ray Tune experiments whose trials are Ray Train runs of a recipe,
scored by the kNN monitor's top-1 each epoch.

- spaces.py  named search spaces (temperature, momentum, queue, strength) and the `--space` range syntax, checked
             against the recipe's config dataclass
- runner.py  the Sweep definition, pre-flight checks, the per-trial driver for ASHA/FIFO, the Tuner (new or
             restored)
- pbt.py     Population Based Training in segments that clone checkpoints, recipe state included
- report.py  the table (printed, CSV, Markdown), best preset, PNGs (plots.py) and TensorBoard HParams
- cli.py     the `sslab tune` command

API: `Sweep(recipe, base_overrides, resolve(recipe, parse_space([...]), base), name=, storage=)`,
`run_sweep(sweep) -> ResultGrid`, `write_report(sweep, grid)`.
"""
