"""The ``eval`` section of a recipe: retrieval cut-offs and the sizes of evaluation and validation.

A section module of the config layer: it imports nothing above ``pretrain.models``, so
``pretrain/config.py`` can compose it while the code beside it imports the composed config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.errors import ConfigError


@dataclass
class EvalConfig:
    batch_size: int = 64  # embedding batch size of evaluation
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # recall@k cut-offs
    max_samples: int | None = None  # cap of held-out proteins (None: all)
    validation_samples: int = 256  # proteins used by validation during training (train.validate_every)

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
