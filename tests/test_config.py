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
