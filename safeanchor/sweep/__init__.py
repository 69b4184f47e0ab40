"""Ray Tune sweeps of one method's options over the whole sequential pipeline (workflows/sweep.py).

    objective.py   the safety-aware objective, running per-domain metrics, the Pareto front (pure)
    space.py       search spaces in YAML (workflows/configs/sweeps/<method>.yaml) -> Tune domains
    trainable.py   the Tune function trainable: one trial = the pipeline on every tuning seed
    report.py      trial table (CSV + markdown), Pareto plot, best.yaml
    driver.py      Tuner / Tuner.restore, search algorithm, ASHA, concurrency, the MLflow sweep run
"""
