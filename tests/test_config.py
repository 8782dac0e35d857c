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
    paths = sorted((root / "configs").rglob("*.yaml"))
    assert paths
    for p in paths:
        load_config(p)  # raises ConfigError on any bad key


def test_demo_config_is_valid_and_is_the_readme_model():
    """`segprune demo`'s embedded config passes the same checks as a user's file, and it is the model the
    README and docs/results/demo.md describe (DeepLabv3-R18, width 0.125, OS 8, 64x64, keep 0.5)."""
    from segprune.config import demo_config
    cfg = demo_config()
    assert validate(cfg, raise_error=False) == []
    assert cfg["model"] == {**cfg["model"], "name": "deeplabv3_resnet18", "width": 0.125, "output_stride": 8}
    assert cfg["data"]["seg"]["input_size"] == [64, 64] and cfg["prune"]["keep_ratio"] == 0.5
    assert cfg["method"]["name"] == "mtp" and cfg["method"]["l1_schedule"] == "growing"


# MTP paper, Appendix 6.1: the settings each shipped paper config must carry
_APPENDIX = {
    "voc_deeplabv3_r101_mtp.yaml": {
        "model.name": "deeplabv3_resnet101", "data.seg.name": "voc_sbd", "data.seg.crop_size": [513, 513],
        "data.seg.scale_range": [0.5, 2.0], "data.seg.batch_size": 16, "train.seg.lr": 0.007, "train.seg.epochs": 50,
        "method.alpha1": 1e-3, "method.alpha2": 1e-3, "data.cls.batch_size": 256, "method.lr_cls": 0.001,
        "finetune.seg.lr": 0.0007, "finetune.cls.epochs": 20, "finetune.seg.epochs": 50},
    "cityscapes_deeplabv3_r101_mtp.yaml": {
        "model.name": "deeplabv3_resnet101", "data.seg.name": "cityscapes", "data.seg.crop_size": [512, 1024],
        "data.seg.scale_range": [0.5, 2.0], "data.seg.batch_size": 32, "train.seg.lr": 0.01, "train.seg.epochs": 480,
        "method.alpha1": 1e-3, "method.alpha2": 1e-3, "data.cls.batch_size": 256, "method.lr_cls": 0.001,
        "finetune.seg.lr": 0.0005, "finetune.cls.epochs": 20, "finetune.seg.epochs": 240,
        "eval.scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]},
    "cityscapes_bisenet_r18_mtp.yaml": {
        "model.name": "bisenet_resnet18", "data.seg.name": "cityscapes", "data.seg.crop_size": [768, 1536],
        "data.seg.scale_range": [0.75, 2.0], "data.seg.batch_size": 32, "train.seg.lr": 0.01, "train.seg.epochs": 80,
        "method.alpha1": 1e-4, "method.alpha2": 1e-4, "data.cls.batch_size": 512, "method.lr_cls": 0.001,
        "finetune.seg.lr": 0.001, "finetune.cls.epochs": 50, "finetune.seg.epochs": 80, "eval.scales": [1.0]},
    "ade20k_pspnet_r50_mtp.yaml": {
        "model.name": "pspnet_resnet50", "data.seg.name": "ade20k", "data.seg.crop_size": [480, 480],
        "data.seg.scale_range": [0.5, 2.0], "data.seg.batch_size": 32, "train.seg.lr": 0.01, "train.seg.epochs": 120,
        "method.alpha1": 1e-4, "method.alpha2": 1e-4, "data.cls.batch_size": 128, "method.lr_cls": 0.001,
        "finetune.seg.lr": 0.0005, "finetune.cls.epochs": 50, "finetune.seg.epochs": 120,
        "eval.scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]},
}


@pytest.mark.parametrize("name", sorted(_APPENDIX))
def test_paper_configs_carry_the_appendix_settings(name):
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper" / name)
    for key, want in _APPENDIX[name].items():
        val = cfg
        for k in key.split("."):
            val = val[k]
        assert val == want, (name, key, val, want)
    assert cfg["method"]["name"] == "mtp" and cfg["prune"]["threshold_mode"] == "ind"
    assert cfg["train"]["seg"]["power"] == 0.9 and cfg["finetune"]["seg"]["power"] == 0.9  # poly schedules
