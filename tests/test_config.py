"""Config loading and validation: every bad input gives one ConfigError naming the file and keys."""
import pytest
import yaml

from segprune.cli import main
from segprune.config import DEFAULTS, ConfigError, load_config, merge, validate


def _yaml(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,needle", [
    ("prune: 0.5\n", "prune=0.5: must be a mapping"),
    ("model: 5\n", "model=5: must be a mapping"),
    ("data: {seg: 5}\n", "data.seg=5: must be a mapping"),
    ("finetune: {cls: [1, 2]}\n", "finetune.cls=[1, 2]: must be a mapping"),
])
def test_scalar_section_is_a_config_error(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, text))
    assert needle in str(e.value) and "c.yaml" in str(e.value)


def test_scalar_section_via_set_and_direct_validate():
    with pytest.raises(ConfigError, match=r"prune=0.5: must be a mapping"):
        load_config(None, ["prune=0.5"])
    cfg = merge(DEFAULTS, {})
    cfg["eval"] = "fast"
    assert validate(cfg, raise_error=False) == [validate(cfg, raise_error=False)[0]]
    assert "eval='fast'" in validate(cfg, raise_error=False)[0]


def test_empty_section_keeps_defaults(tmp_path):
    cfg = load_config(_yaml(tmp_path, "prune:\nmethod: {name: slimming}\n"))
    assert cfg["prune"] == DEFAULTS["prune"] and cfg["method"]["name"] == "slimming"


@pytest.mark.parametrize("text,needle", [
    ("method: {name: mpt}\n", "method.name='mpt': must be one of"),
    ("prune: {keep_ratio: half}\n", "prune.keep_ratio='half'"),
    ("train: {seg: {epochs: 2.5}}\n", "train.seg.epochs=2.5"),
    ("data: {seg: {input_size: [240]}}\n", "data.seg.input_size=[240]"),
])
def test_wrong_values_name_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, text))
    assert needle in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("prune: {keep_ratio: [0.5\n", "is not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping at top level, got list"),
])
def test_unreadable_config_files(tmp_path, text, needle):
    p = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_missing_config_file_and_bad_set_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    p = _yaml(tmp_path, yaml.safe_dump({"seed": 1}))
    assert main(["run", str(p), "--out", str(tmp_path / "o"), "--set", "prune.keep_ratio"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_keys_that_were_not_checked_before_are_all_reported_at_once(tmp_path):
    """Keys that used to pass unchecked (and failed late, e.g. eval.threads after all training)."""
    text = yaml.safe_dump({
        "model": {"name": "deeplabv3_resnet152", "multi_grid": [1, 2], "aspp_rates": [6, 0]},
        "data": {"seg": {"ignore_index": "x", "hflip": "yes", "num_train": 0, "validate": 1, "eval_split": ""},
                 "cls": {"validate": "no", "num_kinds": -1}},
        "method": {"max_iters_per_epoch": 0},
        "eval": {"threads": -3, "split": 7},
    })
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, text))
    msg = str(e.value)
    for needle in ("model.name='deeplabv3_resnet152': must be a registered model", "deeplabv3_resnet101",
                   "model.multi_grid=[1, 2]", "model.aspp_rates=[6, 0]", "data.seg.ignore_index='x'",
                   "data.seg.hflip='yes'", "data.seg.num_train=0", "data.seg.validate=1", "data.seg.eval_split=''",
                   "data.cls.validate='no'", "data.cls.num_kinds=-1", "method.max_iters_per_epoch=0",
                   "eval.threads=-3", "eval.split=7"):
        assert needle in msg, needle
    assert len(msg.strip().splitlines()) == 1 + 13  # the header line + one line per bad key (13)


def test_every_shipped_config_is_valid():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    paths = sorted((root / "configs").glob("*.yaml"))
    assert paths
    for p in paths:
        load_config(p)  # raises ConfigError on any bad key
