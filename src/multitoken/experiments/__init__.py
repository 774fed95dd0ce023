"""The paper's small-scale experiments (issue 11): data generators, metrics, and the sweeps of
`multitoken experiment NAME`.

- `multitoken.experiments.induction`: children's stories with random two-token names, and the
  induction metric (paper sec. 4.1).
- `multitoken.experiments.polynomial`: polynomial arithmetic in F7[X]/(X^5), and the exact-match
  metric of greedy answers (paper sec. 4.2).
- `multitoken.experiments.runner`: the `multitoken experiment` command and the registry of
  sweeps; `common`: what the sweeps share (jobs, training through `multitoken.train.train`,
  shared metrics, seed statistics, tables, figures); `exp_induction`, `exp_polynomial`,
  `exp_ntp_vs_mtp`, `exp_byte_heads`: one sweep each.

This package module imports nothing, so `import multitoken.experiments` stays cheap; import the
submodule an experiment needs.
"""
