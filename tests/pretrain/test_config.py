import pytest

from pretrain.config import Config, ConfigError, config_from_dict, load_config, load_run_config, parse_override


def test_demo_recipe_loads_and_round_trips():
    cfg = load_config()
    assert cfg.model.sequence.num_layers == 2
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert again.fingerprint() == cfg.fingerprint()


def test_override_applies_and_parses_yaml_values():
    cfg = load_config(overrides=["train.max_steps=70", "optim.lr=1e-4", "model.structure.node_hidden=[16, 4]"])
    assert cfg.train.max_steps == 70
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.model.structure.node_hidden == (16, 4)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.max_stepz=3", "train.max_stepz"),
        ("model.text.hidden=3", "model.text.hidden"),
        ("train.max_steps=lots", "train.max_steps"),
        ("data.batch_size=1", "data.batch_size"),
        ("loss.backend=cuda", "loss.backend"),
        ("train.stage1_steps=999", "train.stage1_steps"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(overrides=[override])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_top_level_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_config(p)


def test_parse_override_types():
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=[1, 5]") == ("a.b", [1, 5])


def test_fingerprint_changes_with_model_only():
    a = Config()
    b = Config()
    b.train.max_steps += 1
    assert a.fingerprint() == b.fingerprint()
    b.model.embed_dim += 1
    assert a.fingerprint() != b.fingerprint()


def test_ring_strategy_accepted_with_and_without_false_negatives():
    cfg = load_config(overrides=["loss.strategy=ring"])
    assert cfg.loss.objective == "align_pro" and cfg.loss.strategy == "ring"  # presence masks ride the ring
    cfg = load_config(overrides=["loss.strategy=ring", "loss.false_negatives=text"])  # retargeted rows too
    assert cfg.loss.false_negatives == "text"
    cfg = load_config(overrides=["loss.strategy=ring", "loss.objective=protclip", "loss.protclip.false_negatives=go"])
    assert cfg.loss.protclip.false_negatives == "go"


def test_run_config_rewrite_never_shows_readers_a_partial_file(tmp_path):
    """Rank 0 rewrites RUN/config.yaml on a relaunch while the other ranks read it (pretrain.run.prepare):
    every read must see a whole file, never a truncated one (which read back as another model)."""
    import threading

    from pretrain.config import load_run_config, save_config

    cfg = load_config(overrides=["model.text.num_layers=1"])
    save_config(cfg, tmp_path / "config.yaml", deepspeed_config={"train_batch_size": 16})
    stop, errors = threading.Event(), []

    def rewrite():
        while not stop.is_set():
            save_config(cfg, tmp_path / "config.yaml", deepspeed_config={"train_batch_size": 16})

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(300):
            try:
                got, ds = load_run_config(tmp_path)
                if got.fingerprint() != cfg.fingerprint() or ds != {"train_batch_size": 16}:
                    errors.append("different content")
            except ConfigError as e:
                errors.append(str(e))
    finally:
        stop.set()
        writer.join()
    assert not errors, errors[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_an_empty_overlay_section_changes_nothing(tmp_path):
    """``train:`` with every key commented out is null in YAML; it must not reset the base's section."""
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 50\n  stage1_steps: 5\n")
    (tmp_path / "overlay.yaml").write_text("base: base.yaml\ntrain:\n  # max_steps: 60\n")
    cfg = load_config(tmp_path / "overlay.yaml")
    assert (cfg.train.max_steps, cfg.train.stage1_steps) == (50, 5)
    (tmp_path / "empty.yaml").write_text("train:\n")
    assert load_config(tmp_path / "empty.yaml", overrides=["train.max_steps=60"]).train.max_steps == 60


def test_exponent_floats_read_the_same_in_files_and_overrides(tmp_path):
    """YAML 1.1 reads 1e-4 (no dot) as a string; a recipe, an override and a list all mean the number."""
    (tmp_path / "r.yaml").write_text("optim:\n  lr: 1e-4\n  encoder_lr: 5E-5\n")
    cfg = load_config(tmp_path / "r.yaml", overrides=["optim.betas=[0.9, 1e-1]"])
    assert (cfg.optim.lr, cfg.optim.encoder_lr, cfg.optim.betas) == (1e-4, 5e-5, [0.9, 0.1])
    assert parse_override("optim.eps=1e-8") == ("optim.eps", 1e-8)
    assert parse_override("train.wandb_project=v1.2a") == ("train.wandb_project", "v1.2a")


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=0",
        "optim.encoder_lr=-3e-4",
        "optim.min_lr_ratio=-0.5",
        "optim.grad_clip=-1",
        "optim.betas=[0.9]",
        "optim.betas=[2, -1]",
        "optim.warmup_steps=-5",
        "data.seq_mask_prob=1.5",
        "data.residue_drop_prob=-0.2",
        "model.head_dropout=2",
        "eval.batch_size=0",
        "eval.max_samples=-3",
        "train.frozen_encoders=[txt]",
        "train.frozen_encoders=[text, text]",
        "train.activation_checkpointing=[esm]",
    ],
)
def test_out_of_range_values_are_errors_naming_the_field(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override])


def test_allowed_edge_values():
    cfg = load_config(overrides=["optim.encoder_lr=0", "optim.grad_clip=0", "optim.warmup_steps=0"])
    assert (cfg.optim.encoder_lr, cfg.optim.grad_clip) == (0, 0)


@pytest.mark.parametrize("text", ["train: [unclosed\n", "- a list\n"])
def test_a_damaged_run_config_is_a_config_error(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match="config.yaml"):
        load_run_config(tmp_path)


# --------------------------------------------------------------------------- every numeric field, swept
# The sweep walks the dataclasses, so a field added later is covered without editing this test.

# Integer fields for which 0 is a meaningful value (each says why); a negative value is an error for
# every integer field (train.seed included: numpy's seeding refuses negative seeds).
ZERO_IS_VALID = {
    "optim.warmup_steps",  # no warm-up
    "train.stage1_steps",  # no stage 1 (encoders train from the first step)
    "train.seed",  # any seed in [0, 2**32)
    "train.validate_every",  # validation off
    "train.grad_cache_chunk",  # the plain one-pass step
    "data.bad_ratio_min_samples",  # the bad-sample ratio is taken from the first sample on
    "model.structure.node_hidden[1]",  # no vector channels: a GVP then carries scalars only
    "model.structure.edge_hidden[1]",
}
# Float fields for which a negative value is meaningful: only a logit offset (every other float is a rate, a weight, a
# probability, a temperature, a size in angstrom or seconds, or a pLDDT in [0, 100]).
NEGATIVE_IS_VALID: set[str] = {
    "loss.sigmoid_init_bias",  # a logit offset: SigLIP starts it at -10
}


def _yaml(value) -> str:
    import math

    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _numeric_fields(cls, prefix: str = "", default=None):
    """(dotted name, element index or None, scalar type, default value) of every int / float field, recursively."""
    import dataclasses
    import types
    import typing

    default = cls() if default is None else default
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        value = getattr(default, f.name)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, name, value)
        elif tp in (int, float):
            yield name, None, tp, value
        elif typing.get_origin(tp) in (list, tuple):
            (item, *_) = typing.get_args(tp)
            if item in (int, float):
                for i in range(len(value)):  # each element of the default (betas, ks, node_hidden, ...)
                    yield name, i, item, value


def _bad_numeric_overrides():
    cases = []
    for name, index, tp, default in _numeric_fields(Config):
        label = name if index is None else f"{name}[{index}]"
        bad = [float("nan"), float("inf"), float("-inf")] if tp is float else []
        if tp is float and label not in NEGATIVE_IS_VALID:
            bad.append(-1.5)
        if tp is int:
            bad.append(-1)
            if label not in ZERO_IS_VALID:
                bad.append(0)
        for value in bad:
            if index is not None:
                value = [value if i == index else v for i, v in enumerate(default)]
            cases.append(pytest.param(name, f"{name}={_yaml(value)}", id=f"{label}={_yaml(value)}"))
    return cases


BAD_NUMERIC = _bad_numeric_overrides()


def test_the_sweep_sees_every_section():
    names = {case.values[0] for case in BAD_NUMERIC}
    for section in (
        "model.sequence.",
        "model.structure.",
        "model.text.",
        "data.",
        "loss.protclip.",
        "optim.",
        "train.",
    ):
        assert any(n.startswith(section) for n in names), section
    assert {"eval.ks", "optim.betas", "model.embed_dim", "loss.alpha"} <= names and len(names) > 60


@pytest.mark.parametrize("name, override", BAD_NUMERIC)
def test_every_numeric_field_refuses_non_finite_and_out_of_range_values(name, override):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert name in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "data.text_rewrite_prob=1.5",
        "data.max_bad_sample_ratio=2",
        "data.min_plddt=101",
        "model.structure.drop_rate=1",
        "model.text.dropout=1.0",
        "model.text.max_length=1",
        "model.text.max_length=1000",  # beyond the preset's 512 positions
        "model.text.pooling=max",
        "model.text.preset=nope",
        "model.sequence.preset=esm3",
        "model.sequence.attention_heads=7",  # the preset's 320 wide is not divisible by 7
        "model.structure.num_positional=7",  # cosine + sine pairs
        "loss.protclip.bsr_dropout=1",
        "loss.protclip.mlm_prob=1",
        "loss.protclip.bsr_heads=0",  # was a ZeroDivisionError
        "optim.betas=[0.9, 1.0]",
        "optim.min_lr_ratio=1.5",
        "train.seed=4294967296",
        "eval.ks=[1, 0]",
    ],
)
def test_more_out_of_range_values_name_the_field(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(overrides=[override])


def test_non_finite_values_in_a_recipe_file_and_in_a_run_config(tmp_path):
    (tmp_path / "r.yaml").write_text("optim:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"optim\.lr=nan"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "big.yaml").write_text("loss:\n  alpha: 1" + "0" * 400 + "\n")  # an int beyond any float
    with pytest.raises(ConfigError, match=r"loss\.alpha=inf"):
        load_config(tmp_path / "big.yaml")
    (tmp_path / "config.yaml").write_text("data:\n  coord_noise: .inf\n")
    with pytest.raises(ConfigError, match=r"config\.yaml: data\.coord_noise=inf"):
        load_run_config(tmp_path)


def test_edge_values_that_stay_valid():
    overrides = [f"{name}=0" for name in sorted(ZERO_IS_VALID) if "[" not in name]
    overrides += ["model.structure.node_hidden=[16, 0]", "model.structure.edge_hidden=[8, 0]"]
    overrides += ["data.min_plddt=0", "data.residue_drop_prob=1", "train.seed=4294967295", "loss.protclip.bsr_ratio=1"]
    cfg = load_config(overrides=overrides)
    assert cfg.train.seed == 2**32 - 1 and cfg.model.structure.node_hidden == (16, 0)


def test_the_attention_implementation_keeps_the_model_fingerprint():
    """Fused and reference ESM-2 attention are the same weights: a run resumes across the switch, and a
    run whose config.yaml predates the field (no model.sequence.attention) keeps its fingerprint."""
    fused = load_config(overrides=["model.sequence.attention=fused"])
    reference = load_config(overrides=["model.sequence.attention=reference"])
    assert fused.fingerprint() == reference.fingerprint()
    assert fused.fingerprint(("model", "data")) == reference.fingerprint(("model", "data"))
    old = fused.to_dict()
    del old["model"]["sequence"]["attention"]
    assert config_from_dict(old).fingerprint() == fused.fingerprint()
    assert load_config(overrides=["model.embed_dim=32"]).fingerprint() != fused.fingerprint()  # others still count
