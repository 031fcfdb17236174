"""Recipe overlays (``base:``) and the ablation recipes built on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import CONFIGS_DIR, ConfigError, load_config, read_recipe

ABLATIONS = CONFIGS_DIR / "recipes" / "ablations"
# variant -> the fields it changes relative to its base (everything else must be the base's)
CHANGES = {
    "seq_struct": {("loss", "beta"): 0.0, ("loss", "gamma"): 0.0, ("loss", "intra_text"): 0.0},
    "seq_text": {("loss", "alpha"): 0.0, ("loss", "gamma"): 0.0, ("loss", "intra_struct"): 0.0},
    "no_augment": {("data", "text_augment"): False},
    "no_intra": {("loss", "intra_seq"): 0.0, ("loss", "intra_struct"): 0.0, ("loss", "intra_text"): 0.0},
    "per_pair_temperature": {("loss", "temperature"): "per_pair"},
    "per_term_temperature": {("loss", "temperature"): "per_term"},
    "text_lr_0p1": {("optim", "encoder_lr_mult", "text"): 0.1},
    "sigmoid": {("loss", "kind"): "sigmoid"},
}
# ProtCLIP switches: variant -> changed fields, on the ProtCLIP bases (demo_protclip.yaml is demo.yaml with the
# protclip objective and demo-sized heads; protclip_650M.yaml the real-size recipe)
PROTCLIP_BASES = {
    "demo_protclip": ABLATIONS / "demo_protclip.yaml",
    "protclip_650M": CONFIGS_DIR / "recipes" / "protclip_650M.yaml",
}
PROTCLIP_CHANGES = {
    "pda_gumbel": {("loss", "protclip", "pda_assign"): "gumbel"},
    "pda_per_segment": {("loss", "protclip", "pda_text"): "per_segment"},
}
# demo-only variants: name -> the fields it changes relative to demo.yaml
DEMO_CHANGES = {
    "hard_negatives_previous_epoch": {("data", "hard_negatives"): "previous_epoch"},
    "sigmoid_fn_text": {("loss", "kind"): "sigmoid", ("loss", "false_negatives"): "text"},
    "sigmoid_groups_positive": {
        ("loss", "kind"): "sigmoid",
        ("loss", "false_negatives"): "text",
        ("loss", "sigmoid_groups"): "positive",
    },
}


def _apply(want: dict, changes: dict) -> dict:
    for path, value in changes.items():
        node = want
        for key in path[:-1]:
            node = node[key]
        assert node[path[-1]] != value, path  # the base really differs
        node[path[-1]] = value
    return want


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_overlay_merges_sections_key_by_key_and_chains(tmp_path):
    _write(tmp_path / "a.yaml", "train:\n  max_steps: 7\n  stage1_steps: 1\n  seed: 3\neval:\n  ks: [1, 5, 10]\n")
    _write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\ntrain:\n  seed: 4\neval:\n  ks: [2]\n")
    c = _write(tmp_path / "c.yaml", "base: sub/b.yaml\ntrain:\n  log_every: 2\n")
    want_train = {"max_steps": 7, "stage1_steps": 1, "seed": 4, "log_every": 2}
    assert read_recipe(c) == {"train": want_train, "eval": {"ks": [2]}}
    cfg = load_config(c, ["train.max_steps=9"])  # overrides apply on top of the merged recipe
    assert (cfg.train.max_steps, cfg.train.seed, cfg.train.log_every, cfg.eval.ks) == (9, 4, 2, [2])


def test_overlay_errors_name_the_file(tmp_path):
    loop_a = _write(tmp_path / "x.yaml", "base: y.yaml\n")
    _write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="'base' chain loops"):
        load_config(loop_a)
    with pytest.raises(ConfigError, match=r"recipe file not found: .*nope.yaml \(base of .*z.yaml\)"):
        load_config(_write(tmp_path / "z.yaml", "base: nope.yaml\n"))
    with pytest.raises(ConfigError, match="'base' must be the path"):
        load_config(_write(tmp_path / "w.yaml", "base: [a.yaml]\n"))
    with pytest.raises(ConfigError, match="unknown config key 'loss.alhpa'"):
        load_config(_write(tmp_path / "v.yaml", f"base: {CONFIGS_DIR / 'recipes' / 'demo.yaml'}\nloss:\n  alhpa: 0\n"))


@pytest.mark.parametrize("base", ["demo", "align_pro_650M"])
@pytest.mark.parametrize("variant", sorted(CHANGES))
def test_ablation_recipe_changes_only_its_fields(base, variant):
    got = load_config(ABLATIONS / f"{base}_{variant}.yaml").to_dict()
    want = load_config(CONFIGS_DIR / "recipes" / f"{base}.yaml").to_dict()
    assert got == _apply(want, CHANGES[variant])


@pytest.mark.parametrize("base", sorted(PROTCLIP_BASES))
@pytest.mark.parametrize("variant", sorted(PROTCLIP_CHANGES))
def test_protclip_ablation_recipe_changes_only_its_switch(base, variant):
    got = load_config(ABLATIONS / f"{base}_{variant}.yaml").to_dict()
    assert got == _apply(load_config(PROTCLIP_BASES[base]).to_dict(), PROTCLIP_CHANGES[variant])


@pytest.mark.parametrize("variant", sorted(DEMO_CHANGES))
def test_demo_only_ablation_recipe_changes_only_its_fields(variant):
    got = load_config(ABLATIONS / f"demo_{variant}.yaml").to_dict()
    want = load_config(CONFIGS_DIR / "recipes" / "demo.yaml").to_dict()
    assert got == _apply(want, DEMO_CHANGES[variant])


def test_demo_protclip_is_demo_with_the_protclip_objective():
    got = load_config(ABLATIONS / "demo_protclip.yaml").to_dict()
    want = load_config(CONFIGS_DIR / "recipes" / "demo.yaml").to_dict()
    want["loss"]["objective"] = "protclip"
    want["loss"]["protclip"].update(bsr_hidden=64, bsr_heads=4, pda_proj_dim=64, pda_prototypes=64)
    assert got == want


def test_every_ablation_file_is_covered():
    names = {p.stem for p in ABLATIONS.glob("*.yaml")}
    want = {f"{b}_{v}" for b in ("demo", "align_pro_650M") for v in CHANGES}
    want |= {f"{b}_{v}" for b in PROTCLIP_BASES for v in PROTCLIP_CHANGES} | {"demo_protclip"}
    want |= {f"demo_{v}" for v in DEMO_CHANGES}
    assert names == want
