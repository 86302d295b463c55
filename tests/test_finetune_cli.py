"""`pretrain finetune | transfer` options: the flags generated from FinetuneConfig, a --config YAML file under
them, unknown keys refused with a suggestion."""

from __future__ import annotations

import pytest

from pretrain.cli import build_parser
from pretrain.config import ConfigError, FinetuneConfig
from pretrain.finetune.cli import _config


def _parse(*argv: str):
    return build_parser().parse_args(["finetune", "RUN", "--train", "t.jsonl", "--valid", "v.jsonl",
                                      "--out", "ft", *argv])


def test_defaults_yaml_then_flags(tmp_path):
    assert _config(_parse()) == FinetuneConfig()
    f = tmp_path / "ft.yaml"
    f.write_text("lr: 1.0e-4\nepochs: 7\nhead_only: true\ntext_column: sentence\n")
    cfg = _config(_parse("--config", str(f)))
    assert (cfg.lr, cfg.epochs, cfg.head_only, cfg.text_column) == (1e-4, 7, True, "sentence")
    cfg = _config(_parse("--config", str(f), "--epochs", "2", "--no-head-only", "--text-column", "text"))
    assert (cfg.lr, cfg.epochs, cfg.head_only, cfg.text_column) == (1e-4, 2, False, "text")
    # a flag given with the default's value still overrides the file
    assert _config(_parse("--config", str(f), "--epochs", "3")).epochs == 3


def test_saved_finetune_yaml_round_trips(tmp_path):
    from dataclasses import asdict

    from pretrain.config import dump_yaml

    cfg = FinetuneConfig(lr=2e-5, layer_decay=0.8, lora=True, pooling="mean")
    (tmp_path / "finetune.yaml").write_text(dump_yaml(asdict(cfg)))  # what a fine-tuning run saves
    assert _config(_parse("--config", str(tmp_path / "finetune.yaml"))) == cfg


def test_unknown_or_bad_keys_are_errors(tmp_path):
    f = tmp_path / "ft.yaml"
    f.write_text("layer_decy: 0.9\n")
    with pytest.raises(ConfigError, match="did you mean 'layer_decay'"):
        _config(_parse("--config", str(f)))
    f.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs"):
        _config(_parse("--config", str(f)))
    with pytest.raises(ConfigError, match="not found"):
        _config(_parse("--config", str(tmp_path / "missing.yaml")))
