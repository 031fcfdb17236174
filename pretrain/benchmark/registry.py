"""The benchmark task types a suite can name (``type:``), each one line in :data:`TASKS`.

A task type is a module with

* a config dataclass (the task's YAML keys; unknown keys are errors; optional ``validate(where)``),
* ``needs(suite, cfg, proteins, name) -> set[str]``: ids of the proteins table it embeds (``name``,
  the suite's name for the task, goes into error messages),
* ``run(ctx, name, cfg) -> {"rows": [metric_row(...)], "info": {...}}`` on frozen embeddings
  (:class:`pretrain.benchmark.context.BenchmarkContext`), each row a metric with its interval,
* optionally ``extra(suite, cfg, proteins, name) -> [(id, sequence, (structure file, chain) | None)]``:
  proteins the task needs that no row of the proteins table names (added to it before embedding).

To add a task, write such a module and add ``"kind": TaskType(KindConfig, kind.needs, kind.run)`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain.benchmark import classification, function, go_similarity, mutation, ppi, retrieval_task


@dataclass(frozen=True)
class TaskType:
    config: type  # dataclass of the task's options
    needs: Callable  # (suite, cfg, proteins, name) -> set of protein ids to embed
    run: Callable  # (ctx, name, cfg) -> {"rows": [...], "info": {...}}
    uses_text: bool = False  # embeds the suite's text column
    extra: Callable | None = None  # (suite, cfg, proteins, name) -> rows to add to the proteins table


TASKS: dict[str, TaskType] = {
    "function": TaskType(function.FunctionTaskConfig, function.needs, function.run),
    "classification": TaskType(classification.ClassificationTaskConfig, classification.needs, classification.run),
    "retrieval": TaskType(retrieval_task.RetrievalTaskConfig, retrieval_task.needs, retrieval_task.run, True),
    "ppi": TaskType(ppi.PpiTaskConfig, ppi.needs, ppi.run, extra=ppi.extra),
    "go_similarity": TaskType(go_similarity.GoSimilarityTaskConfig, go_similarity.needs, go_similarity.run),
    "mutation": TaskType(mutation.MutationTaskConfig, mutation.needs, mutation.run),
}
