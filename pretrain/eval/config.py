"""The ``eval`` section of a recipe: retrieval cut-offs, the sizes of evaluation and validation, and
model selection (which validation metric picks the best checkpoint).

A section module of the config layer: it imports nothing above ``pretrain.models``, so
``pretrain/config.py`` can compose it while the code beside it imports the composed config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.errors import ConfigError

ZEROSHOT_TASKS = ("ec", "go_mf", "go_bp", "go_cc")


@dataclass
class EvalConfig:
    batch_size: int = 64  # embedding batch size of evaluation
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # recall@k cut-offs
    max_samples: int | None = None  # cap of held-out proteins (None: all)
    validation_samples: int = 256  # proteins used by validation during training (train.validate_every)
    # Zero-shot Fmax tasks added to validation (text prompts per label, pretrain.eval.zeroshot): any of
    # ec, go_mf, go_bp, go_cc; reported as val/zeroshot_fmax_<task> (sequence embeddings) and
    # val/zeroshot_fmax_<task>/structure.
    validation_zeroshot: list[str] = field(default_factory=list)
    ec_names: str | None = None  # EC descriptions TSV (EC_number, name, hier1..3) for the EC prompts
    # Validation key whose best checkpoint is pinned (never retired) and exported as RUN/export/best,
    # e.g. val/mean_R@10 or val/zeroshot_fmax_ec; null: no selection.
    select_metric: str | None = None
    select_mode: str = "max"  # max: higher is better (R@k, Fmax); min: lower is better

    def validate(self) -> None:
        """Checks of the section's values; raises ConfigError naming the field."""
        e = self
        for name in ("batch_size", "validation_samples", "max_samples"):
            value = getattr(e, name)
            if value is not None and value < 1:
                raise ConfigError(
                    f"eval.{name}={value}: must be >= 1" + (" (or null: all)" if name == "max_samples" else "")
                )
        if not e.ks or any(k < 1 for k in e.ks):
            raise ConfigError(f"eval.ks={e.ks}: expected positive integers")
        unknown = [t for t in e.validation_zeroshot if t not in ZEROSHOT_TASKS]
        if unknown:
            raise ConfigError(f"eval.validation_zeroshot: unknown task(s) {unknown}; expected some of {ZEROSHOT_TASKS}")
        if e.select_mode not in ("max", "min"):
            raise ConfigError(f"eval.select_mode={e.select_mode!r}: expected max or min")
        if e.select_metric is not None and e.select_metric not in self.validation_metrics():
            raise ConfigError(
                f"eval.select_metric={e.select_metric!r}: not a validation metric of this recipe; expected one of "
                f"{sorted(self.validation_metrics())} (a zero-shot task must be listed in eval.validation_zeroshot)"
            )

    def validation_metrics(self) -> set[str]:
        """The selectable keys validation reports (directional R@k and median ranks not listed)."""
        keys = {f"val/mean_R@{k}" for k in self.ks}
        for task in self.validation_zeroshot:
            keys |= {f"val/zeroshot_fmax_{task}", f"val/zeroshot_fmax_{task}/structure"}
        return keys
