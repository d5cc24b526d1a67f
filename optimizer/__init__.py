"""optimizer.json and the optimizers it describes: config.py (strict loading), schedules.py (LR formulas),
freezing.py (text-encoder freezing), build.py (optimizers + schedulers per part). See doc/OPTIMIZER.md."""
