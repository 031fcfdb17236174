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
