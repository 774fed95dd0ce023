from __future__ import annotations

import pytest

from multitoken.config import ModelConfig, RunConfig, load_run_config
from multitoken.errors import ConfigError


def test_yaml_and_overrides_load_strictly(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  dim: 64\n  n_future: 2\ntrain:\n  steps: 7\n")
    cfg = load_run_config(f, ["model.n_layers=5", "--train.seq_len=32", "loss.weights=geometric:0.5"])
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.dim, cfg.model.n_future, cfg.model.n_layers) == (64, 2, 5)
    assert (cfg.train.steps, cfg.train.seq_len) == (7, 32)
    assert cfg.loss.weights == "geometric:0.5"


def test_list_and_optional_values():
    cfg = load_run_config(None, ["loss.weights=[1, 0.5, 0.5, 0.25]", "model.n_kv_heads=2",
                                 "data.max_files=none", "data.paths=a.txt,b.txt"])
    assert cfg.loss.weights == [1.0, 0.5, 0.5, 0.25]
    assert cfg.model.n_kv_heads == 2 and cfg.data.max_files is None
    assert cfg.data.paths == ["a.txt", "b.txt"]


@pytest.mark.parametrize("override, msg", [
    (["model.n_futur=2"], "n_futur"),
    (["modle.dim=2"], "modle"),
    (["model.n_future=0"], "n_future must be >= 1"),
    (["model.dim=30"], "divisible by n_heads"),
    (["model.dim=abc"], "expected an integer"),
    (["model.head_type=mlp"], "head_type"),
    (["model.n_layers=2", "model.n_future=4"], "n_layers"),
    (["train.seq_len=4096"], "max_seq_len"),
    (["loss.weights=[1, 2]"], "2 entries"),
    (["loss.method=fast"], "method"),
    (["train.steps=0"], "train.steps"),
])
def test_bad_values_are_config_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_run_config(None, override)


@pytest.mark.parametrize("override", ["data.paths=[oops", "loss.weights=[1, 0.5", "data.paths=[a]]"])
def test_malformed_list_override_is_a_config_error(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"override {key}=.* is not a valid YAML list"):
        load_run_config(None, [override])


def test_bracketed_values():
    cfg = load_run_config(None, ["data.paths=['a b.txt', c.txt]", "train.sample_prompt=[oops"])
    assert cfg.data.paths == ["a b.txt", "c.txt"]
    assert cfg.train.sample_prompt == "[oops"  # a string field keeps its text as it is


def test_unknown_yaml_key(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("model:\n  dimension: 64\n")
    with pytest.raises(ConfigError, match="unknown key.*dimension"):
        load_run_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")


def test_parameter_matching():
    # The paper: for every extra head layer, one layer leaves the trunk (7B: 28 + 4 = 32).
    assert ModelConfig(n_layers=32, n_future=4).n_trunk_layers == 28
    assert ModelConfig(n_layers=6, n_future=1).n_trunk_layers == 5
    assert ModelConfig(n_layers=6, n_future=4, head_type="linear").n_trunk_layers == 6


def test_recipes_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.glob("*.yaml"))
    assert recipes
    for r in recipes:
        load_run_config(r)


def test_shipped_recipes_load_and_train_on_their_whole_context():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert recipes
    for f in recipes:
        cfg = load_run_config(f)
        # Decoding reaches every position up to max_seq_len; a model never trained on the
        # later positions drafts (and decodes) badly there (seen with code-n4 v1, see
        # docs/code-n4.md).
        assert cfg.train.seq_len == cfg.model.max_seq_len, f.name
