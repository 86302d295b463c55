"""Configuration: YAML loading, dotted overrides, type coercion, unknown keys, validation, presets, docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pretrain.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    field_docs,
    from_dict,
    load_config,
    load_yaml,
    parse_overrides,
)

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------------------------------------- overrides


def test_parse_overrides_space_and_equals_forms():
    out = parse_overrides(["--train.lr", "3e-4", "--model.n_layer=6", "--data.path", "some/dir",
                           "--train.max-steps", "7"])
    assert out == {"train": {"lr": 3e-4, "max_steps": 7}, "model": {"n_layer": 6},
                   "data": {"path": "some/dir"}}


def test_parse_overrides_yaml_scalars():
    out = parse_overrides(["--train.plot", "false", "--train.compile=yes", "--train.min_lr_ratio", "0.5",
                           "--data.path="])
    assert out["train"] == {"plot": False, "compile": True, "min_lr_ratio": 0.5}
    assert out["data"] == {"path": ""}


@pytest.mark.parametrize("args, msg", [
    (["train.lr", "1"], "unexpected argument"),
    (["--"], "unexpected argument"),
    (["--train.lr"], "needs a value"),
    (["--train.lr", "--train.max_steps", "5"], "'--train.lr' needs a value"),
    (["--train", "5", "--train.lr", "1"], "conflicts"),
])
def test_parse_overrides_errors(args, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_overrides(args)


def test_load_config_precedence(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.002\n  max_steps: 50\nmodel:\n  n_layer: 3\n")
    cfg = load_config(p, ["--train.lr", "3e-4"],
                      base={"train": {"lr": 1.0, "batch_size": 3}, "model": {"n_layer": 9}})
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # override wins
    assert cfg.train.max_steps == 50  # YAML
    assert cfg.model.n_layer == 3  # YAML over base
    assert cfg.train.batch_size == 3  # base
    assert cfg.train.warmup_steps == TrainConfig().warmup_steps  # default
    assert cfg.data == DataConfig()


def test_load_config_dict_overrides_and_no_file():
    cfg = load_config(None, {"data": {"seq_len": 17}})
    assert cfg.data.seq_len == 17
    assert load_config() == Config()


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "train:\n", "t.yaml")) == Config()


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_yaml(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["--train.lr", "3e-4", "--model.tie_embeddings", "false", "--data.seq_len", "8"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


# ---------------------------------------------------------------------------------------------- coercion


def test_string_scientific_float_is_coerced():
    # YAML 1.1 reads "3e-4" (no dot) as a string; the float field must still accept it.
    cfg = load_config(None, ["--train.lr", "3e-4"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-4)


def test_yaml_file_scientific_float(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 6e-4\n  weight_decay: 0\n"))
    assert cfg.train.lr == pytest.approx(6e-4)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)


@pytest.mark.parametrize("raw, expected", [("12", 12), ("1e3", 1000), ("1_000", 1000), ("4.0", 4)])
def test_int_coercion_accepts_integral_values(raw, expected):
    cfg = load_config(None, ["--train.max_steps", raw])
    assert cfg.train.max_steps == expected and type(cfg.train.max_steps) is int


@pytest.mark.parametrize("raw", ["1.5", "abc", "true"])
def test_int_field_rejects_non_integers(raw):
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config(None, ["--train.max_steps", raw])


def test_int_field_rejects_yaml_float(tmp_path):
    with pytest.raises(ConfigError, match="model.n_layer must be an integer"):
        load_config(write(tmp_path, "model:\n  n_layer: 2.5\n"))


@pytest.mark.parametrize("raw, expected", [("true", True), ("false", False), ("yes", True), ("no", False),
                                           ("True", True), ("off", False)])
def test_bool_coercion(raw, expected):
    assert load_config(None, ["--train.plot", raw]).train.plot is expected


@pytest.mark.parametrize("raw, expected", [("1", True), ("0", False)])
def test_bool_override_accepts_1_and_0(raw, expected):
    assert load_config(None, ["--train.plot", raw]).train.plot is expected


@pytest.mark.parametrize("value", ["\"true\"", "\"No\"", "\"1\""])
def test_bool_from_quoted_yaml_string(tmp_path, value):
    cfg = load_config(write(tmp_path, f"model:\n  tie_embeddings: {value}\n"))
    assert cfg.model.tie_embeddings is (value.strip('"').lower() in ("true", "1"))


@pytest.mark.parametrize("raw", ["maybe", "2", "1.0"])
def test_bool_rejects_other_values(raw):
    with pytest.raises(ConfigError, match="train.plot must be true or false"):
        load_config(None, ["--train.plot", raw])


def test_float_field_rejects_bool_and_text():
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(None, ["--train.lr", "true"])
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(None, ["--train.lr", "fast"])


def test_int_field_rejects_bool(tmp_path):
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(write(tmp_path, "train:\n  batch_size: true\n"))


def test_str_field_coerces_numbers_and_rejects_lists(tmp_path):
    assert load_config(None, ["--data.path", "123"]).data.path == "123"
    with pytest.raises(ConfigError, match="data.path must be a string"):
        load_config(write(tmp_path, "data:\n  path: [a, b]\n"))


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train must be a mapping"):
        load_config(write(tmp_path, "train: 5\n"))


# ---------------------------------------------------------------------------------------------- unknown keys


def test_unknown_nested_key_in_yaml_suggests(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  lrr: 0.1\n"))
    assert "'train.lrr'" in str(e.value) and "did you mean 'lr'" in str(e.value)


def test_unknown_nested_key_in_override_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--train.lrr", "0.1"])
    assert "'train.lrr'" in str(e.value) and "did you mean 'lr'" in str(e.value)


def test_unknown_top_level_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 1\n"))
    with pytest.raises(ConfigError, match=r"'model.n_layers'.*did you mean 'n_layer'"):
        load_config(None, ["--model.n_layers", "2"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--data.zzzzzzzz", "1"])
    assert "valid keys" in str(e.value) and "seq_len" in str(e.value) and "path" in str(e.value)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, msg", [
    (["--train.schedule", "exponential"], "train.schedule"),
    (["--train.dtype", "fp16"], "train.dtype"),
    (["--train.lr", "0"], "train.lr"),
    (["--train.lr", "-1e-3"], "train.lr"),
    (["--train.batch_size", "0"], "batch_size"),
    (["--train.grad_accum", "0"], "grad_accum"),
    (["--train.max_steps", "0"], "max_steps"),
    (["--train.min_lr_ratio", "1.5"], "min_lr_ratio"),
    (["--train.decay_frac", "0"], "decay_frac"),
    (["--train.keep_checkpoints", "0"], "keep_checkpoints"),
    (["--train.log_interval", "0"], "log_interval"),
    (["--train.time_schedule", "true"], "time_schedule needs train.max_time_s"),
    (["--data.seq_len", "0"], "seq_len"),
    (["--model.d_model", "30", "--model.n_head", "4"], "divisible"),
    (["--model.d_model", "36", "--model.n_head", "4"], "even"),  # head size 9
    (["--model.n_head", "4", "--model.n_kv_head", "3"], "n_kv_head"),
    (["--model.dropout", "1.0"], "dropout"),
    (["--model.arch", "rnn"], "model.arch"),
    (["--model.n_layer", "0"], ">= 1"),
    (["--objective", "mlm"], "objective"),
])
def test_invalid_values_raise_config_error(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


def test_model_derived_sizes():
    m = ModelConfig(d_model=128, n_head=8, n_kv_head=0)
    assert (m.kv_heads, m.head_dim, m.ff_dim) == (8, 16, 384)  # 8/3*128 = 341 → 384
    m = ModelConfig(d_model=64, n_head=4, n_kv_head=2, d_ff=100)
    assert (m.kv_heads, m.head_dim, m.ff_dim) == (2, 16, 100)


def test_from_dict_directly():
    tc = from_dict(TrainConfig, {"lr": "1e-2", "schedule": "wsd"})
    assert tc.lr == pytest.approx(1e-2) and tc.schedule == "wsd"
    with pytest.raises(ConfigError, match="did you mean 'schedule'"):
        from_dict(TrainConfig, {"schedul": "wsd"})


# -------------------------------------------------------------------------------------------- presets & docs


def test_there_are_presets():
    assert PRESETS, "configs/*.yaml should hold at least one preset"


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_parses(path):
    raw = load_yaml(path)
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # every section the preset states is reflected in the parsed config
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert got == pytest.approx(value) if isinstance(value, float) else got == value


@pytest.mark.parametrize("cls", [Config, DataConfig, ModelConfig, TrainConfig])
def test_field_docs_cover_every_field(cls):
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(docs) == set(names)
    for name in names:
        assert isinstance(docs[name], str) and len(docs[name].strip()) > 5, name


def test_string_fields_take_override_text_as_typed():
    """YAML 1.1 would read 010 as octal 8 and yes as true; a string field keeps what was typed."""
    out = parse_overrides(["--data.path", "010", "--train.init_from=yes", "--train.max_steps", "7"])
    assert out == {"data": {"path": "010"}, "train": {"init_from": "yes", "max_steps": 7}}
    assert load_config(None, ["--data.path", "1:30"]).data.path == "1:30"


@pytest.mark.parametrize("text, value", [("010", 10), ("0x10", 16), ("0o10", 8), ("-3", -3), ("3e-4", 3e-4),
                                         ("1.5", 1.5), (".inf", float("inf")), ("1:30", "1:30"),
                                         ("1_000", "1_000")])
def test_numbers_are_read_as_yaml_1_2(tmp_path, text, value):
    """YAML 1.1 (PyYAML's default) reads 010 as octal 8, 1:30 as 90, 1_000 as 1000 and 3e-4 as a string."""
    assert parse_overrides(["--train.max_steps", text]) == {"train": {"max_steps": value}}
    assert load_yaml(write(tmp_path, f"train:\n  max_steps: {text}\n")) == {"train": {"max_steps": value}}
    if isinstance(value, int) and value > 0:
        assert load_config(None, ["--train.max_steps", text]).train.max_steps == value


def test_saved_config_reads_back_the_same(tmp_path):
    """Strings that YAML 1.2 reads as numbers are quoted when saved, so a run's config.yaml round-trips."""
    cfg = load_config(None, ["--data.path", "3e-4", "--train.init_from", "010"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    assert from_dict(Config, load_yaml(tmp_path / "c.yaml")) == cfg
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_a_key_given_twice_in_yaml_is_an_error(tmp_path):
    p = write(tmp_path, "train:\n  lr: 0.5\ntrain:\n  max_steps: 2\n")
    with pytest.raises(ConfigError, match="'train' is given twice.*line 3"):
        load_yaml(p)


@pytest.mark.parametrize("overrides, msg", [
    (["--objective", "mlm", "--model.arch", "bert", "--data.seq_len", "1"], "seq_len >= 2"),
    (["--train.eval_interval", "0", "--train.target_val_loss", "2"], "target_val_loss needs evaluations"),
])
def test_combinations_that_would_do_nothing_are_errors(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


# ------------------------------------------------------------------------------- sections are mappings


def test_a_section_that_is_not_a_mapping_is_an_error_even_when_an_override_touches_it(tmp_path):
    path = write(tmp_path, "train: 5\n")
    for overrides in (None, ["--train.lr", "1e-3"], {"train": {"lr": 1e-3}}):  # never silently replaced
        with pytest.raises(ConfigError) as e:
            load_config(path, overrides)
        assert str(e.value) == (f"config file {path}: train must be a mapping (indented `key: value` lines), "
                                "got int 5")
    with pytest.raises(ConfigError, match="model must be a mapping .*got list"):
        load_config(write(tmp_path, "model: [1, 2]\n", "list.yaml"), ["--model.n_layer", "2"])
    with pytest.raises(ConfigError, match="train must be a mapping"):  # falsy values too, not taken as {}
        from_dict(Config, {"train": 0})
    with pytest.raises(ConfigError, match="'train.lr' is 0.01, not a mapping"):
        load_config(write(tmp_path, "train:\n  lr: 0.01\n", "lr.yaml"), ["--train.lr.x", "1"])


def test_an_empty_section_changes_nothing(tmp_path):
    path = write(tmp_path, "train:\nmodel:\n  n_layer: 3\n")
    cfg = load_config(path, ["--train.lr", "1e-3"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == TrainConfig().max_steps and cfg.model.n_layer == 3
    # an empty section over a base that fills it keeps the base's values
    cfg = load_config(path, base={"train": {"max_steps": 7}})
    assert cfg.train.max_steps == 7


@pytest.mark.parametrize("override", [["--train.lr", "inf"], ["--train.lr", ".nan"],
                                      ["--train.grad_clip", "inf"], ["--model.rope_theta", "inf"],
                                      ["--mlm.mask_prob", "nan"]])
def test_non_finite_numbers_are_config_errors(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, override)
    from pretrain.config import FinetuneConfig

    with pytest.raises(ConfigError, match="finetune.lr must be a finite number"):
        FinetuneConfig(lr=float("inf"))
