import pytest

from chatforge.config import PretrainConfig, load_config, to_dict, valid_keys
from chatforge.core.io import UserError


def test_defaults_and_required_keys():
    keys = valid_keys(PretrainConfig)
    for k in ("model.depth", "train.max_steps", "train.checkpoint_every", "train.seed", "model.from"):
        assert k in keys


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  depth: 3\ntrain:\n  max_steps: 50\n  lr: 1e-3\n")
    cfg = load_config(PretrainConfig, p, ["train.max_steps=70", "model.from=some/dir", "train.schedule=wsd"])
    assert cfg.model.depth == 3 and cfg.train.max_steps == 70 and cfg.train.lr == 1e-3
    assert cfg.model.from_ == "some/dir" and cfg.train.schedule == "wsd"
    d = to_dict(cfg)
    assert d["model"]["from"] == "some/dir" and "from_" not in d["model"]


def test_typo_lists_valid_keys():
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, ["train.max_step=5"])
    assert "train.max_step" in str(e.value) and "train.max_steps" in str(e.value)
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, ["modle.depth=5"])
    assert "model.depth" in str(e.value)


@pytest.mark.parametrize("item", ["model.depth=abc", "train.lr=fast", "log.tensorboard=maybe",
                                  "train.schedule=linear", "train.max_steps=0", "model=3", "nokey"])
def test_type_and_range_errors(item):
    with pytest.raises(UserError):
        load_config(PretrainConfig, None, [item])


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(UserError, match="bad.yaml"):
        load_config(PretrainConfig, p)
    with pytest.raises(UserError, match="not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
