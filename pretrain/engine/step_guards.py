"""When a run must stop: too many unreadable samples, too many non-finite steps in a row.

Pure rules on the global counts the trainer sums over ranks once per step, so every rank reaches
the same verdict at the same step. Each returns why the run stops (a message that says what to do
next), or None to go on.
"""

from __future__ import annotations

from pretrain.data.config import DataConfig


def bad_ratio_stop_reason(bad_samples: int, samples_seen: int, data: DataConfig) -> str | None:
    """Why the run must stop when more than ``data.max_bad_sample_ratio`` of the samples were bad.

    Until ``data.bad_ratio_min_samples`` samples were seen the ratio is taken of that many (one bad
    sample in the first batch must not stop a run).
    """
    ratio = bad_samples / max(1, samples_seen, data.bad_ratio_min_samples)
    if ratio > data.max_bad_sample_ratio and bad_samples > 0:
        return (
            f"{bad_samples} of {samples_seen} samples were unreadable, above "
            f"data.max_bad_sample_ratio={data.max_bad_sample_ratio}; check the shards in "
            f"{data.train_shards} (python -m data_shards validate) and RUN/bad_samples/"
        )
    return None


def nonfinite_stop_reason(in_a_row: int, step: int, limit: int, last_good: str) -> str | None:
    """Why the run must stop after ``limit`` (``train.max_nonfinite_steps``) skipped updates in a row.

    Args:
        in_a_row: consecutive steps with a non-finite loss or gradients, this one included.
        step: the step just taken.
        limit: ``train.max_nonfinite_steps``.
        last_good: where the last good checkpoint is (the trainer's description of it).
    """
    if in_a_row < limit:
        return None
    return (
        f"{in_a_row} consecutive steps (up to step {step}) had a non-finite loss or "
        f"gradients (train.max_nonfinite_steps={limit}); stopping without saving: {last_good}. "
        "Lower optim.lr / optim.encoder_lr or check the data, then relaunch to resume from it."
    )
