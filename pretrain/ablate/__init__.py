"""``python -m pretrain.ablate``: recipe variants over seeds, evaluated, tabulated with significance tests.

Modules: :mod:`~pretrain.ablate.__main__` (the command), :mod:`~pretrain.ablate.runs` (training,
the base row, the evaluation cache with per-protein outcomes), :mod:`~pretrain.ablate.outcomes`
(the table's metrics, from a result and from per-protein outcomes), :mod:`~pretrain.ablate.stats`
(the seed x protein paired test, the paired t-test) and :mod:`~pretrain.ablate.table` (Markdown,
caption, README section).
"""
