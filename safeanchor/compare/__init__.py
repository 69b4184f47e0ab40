"""Compare methods x seeds x domain orders x T on Ray (workflows/compare.py).

    cells.py    arms (a method with its preset, or a named variant), cells, run ids, orders
    driver.py   one Ray task per unfinished cell, sized from the cluster; the MLflow comparison run
    report.py   report.md (Table 1, ablations, orders, trajectories, cells) and the PNG plots
"""
