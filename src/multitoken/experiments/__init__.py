"""Data generators and metrics of the paper's small-scale experiments (issue 11).

- `multitoken.experiments.induction`: children's stories with random two-token names, and the
  induction metric (paper sec. 4.1).
- `multitoken.experiments.polynomial`: polynomial arithmetic in F7[X]/(X^5), and the exact-match
  metric of greedy answers (paper sec. 4.2).

This package module imports nothing, so `import multitoken.experiments` stays cheap; import the
submodule an experiment needs.
"""
