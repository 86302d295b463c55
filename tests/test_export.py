"""Architectural compatibility with stock `transformers` models: the same weights give the same logits.

Our decoder must be a LlamaForCausalLM and our encoder a ModernBertForMaskedLM once names are mapped and
fused projections split (pretrain.export) — fp32, max abs difference <= 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

from pretrain import PretrainError
from pretrain.config import ModelConfig
from pretrain.export import hf_config_dict, to_hf_state_dict
from pretrain.models import build_model

transformers = pytest.importorskip("transformers")


def _randomize_gains(model: torch.nn.Module) -> None:
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so a mix-up would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def _hf_model(cfg: ModelConfig, model: torch.nn.Module, cls_name: str, config_cls: str):
    conf = getattr(transformers, config_cls)(**{k: v for k, v in hf_config_dict(cfg).items()
                                               if k not in ("architectures", "model_type")})
    conf._attn_implementation = "eager"
    hf = getattr(transformers, cls_name)(conf).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    tied = {"lm_head.weight", "decoder.weight"} if cfg.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    if cfg.tie_embeddings:
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("kv,tie", [(0, True), (2, False)])
def test_gpt_matches_llama(kv, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="gpt", n_layer=2, n_head=4, n_kv_head=kv, d_model=64, vocab_size=97,
                      max_seq_len=32, tie_embeddings=tie, rope_theta=500.0)
    model = build_model(cfg).eval()
    _randomize_gains(model)
    hf = _hf_model(cfg, model, "LlamaForCausalLM", "LlamaConfig")
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_encoder_matches_modernbert(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="bert", n_layer=3, n_head=4, d_model=64, vocab_size=101, max_seq_len=32,
                      tie_embeddings=tie, rope_theta=1000.0)
    model = build_model(cfg).eval()
    _randomize_gains(model)
    hf = _hf_model(cfg, model, "ModernBertForMaskedLM", "ModernBertConfig")
    x = torch.randint(5, cfg.vocab_size, (2, 24))
    mask = torch.ones_like(x)
    mask[1, 17:] = 0  # padding in the second row
    with torch.no_grad():
        ours = model(x, attention_mask=mask)
        theirs = hf(input_ids=x, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


# ================================================================== `pretrain export` → transformers Auto*


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from _corpus import TINY_TRAIN, overrides, write_corpus

    from pretrain.cli import main

    root = tmp_path_factory.mktemp("export")
    write_corpus(root / "corpus", n_docs=8)
    (root / "corpus" / "uni.txt").write_text(
        "Ünïcödé text — naïve café, 日本語, emoji 🙂 and  spaces\ttabs.\n" * 20)
    out = {}
    for name, tok, extra in (("gpt", "bpe", []),
                             ("bert", "wordpiece", ["--objective", "mlm", "--model.arch", "bert"])):
        assert main(["prepare", str(root / "corpus"), "--out", str(root / f"data_{name}"), "--tokenizer", tok,
                     "--vocab-size", "400", "--val-fraction", "0.2"]) == 0
        run = root / f"run_{name}"
        assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), *extra, "--data.path",
                     str(root / f"data_{name}"), "--data.seq_len", "64", "--train.max_steps", "15",
                     "--quiet"]) == 0
        assert main(["export", str(run), "--out", str(root / f"hf_{name}")]) == 0
        out[name] = (run, root / f"hf_{name}")
    return out


MIXED = "The  king spoke — naïve café 🙂\ttabs,\n\nnew   lines <|endoftext|> and [MASK] end."


def test_exported_decoder_loads_with_auto_classes(runs):
    from pretrain.checkpoint import load_pretrained

    run, hf_dir = runs["gpt"]
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert (hf_dir / f).is_file(), f
    model, _cfg, tok, _ = load_pretrained(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = hf_tok(MIXED)["input_ids"]
    assert ids == tok.encode(MIXED)  # identical tokenization, special tokens included
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4
    prompt = torch.tensor([tok.encode("The king")])
    ours = model.generate(prompt, 32, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.eot_id)
    assert ours.tolist() == theirs.tolist()


def test_exported_encoder_loads_with_auto_classes(runs):
    from pretrain.checkpoint import load_pretrained

    run, hf_dir = runs["bert"]
    model, _cfg, tok, _ = load_pretrained(run)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    enc = hf_tok(["the king [MASK] the crown.", MIXED], padding=True, return_tensors="pt")
    assert enc["input_ids"][0].tolist()[: len(tok.encode("the king [MASK] the crown.")) + 2] == \
        [tok.cls_id, *tok.encode("the king [MASK] the crown."), tok.eot_id]
    with torch.no_grad():
        ours = model(enc["input_ids"], attention_mask=enc["attention_mask"])
        theirs = hf(**enc).logits
    real = enc["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_export_refuses_a_non_empty_directory(runs, tmp_path, capsys):
    from pretrain.cli import main

    run, _ = runs["gpt"]
    (tmp_path / "x").write_text("keep me")
    assert main(["export", str(run), "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "x").read_text() == "keep me"
    # --overwrite: an encoder exported over a decoder export keeps no decoder file; the user's file stays
    assert main(["export", str(run), "--out", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "generation_config.json").is_file()
    assert main(["export", str(runs["bert"][0]), "--out", str(tmp_path), "--overwrite"]) == 0
    assert not (tmp_path / "generation_config.json").exists() and (tmp_path / "x").read_text() == "keep me"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ModernBertForMaskedLM"]


# ============================================================== `--train.init_from HF_DIR` (import)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny randomly initialised transformers Llama saved locally, with a tokenizer.json of ours."""
    from _corpus import write_corpus

    from pretrain.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("import")
    paths = write_corpus(root / "corpus", n_docs=8)
    tok = train_bpe([p.read_text() for p in paths], 350)
    conf = transformers.LlamaConfig(vocab_size=tok.vocab_size + 6, hidden_size=64, intermediate_size=160,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(conf).eval()
    _randomize_gains(hf)
    hf.save_pretrained(root / "hf", safe_serialization=True)
    tok.save(root / "hf" / "tokenizer.json")
    return root, hf


def test_import_llama_matches_and_trains(hf_llama, tmp_path, capsys):
    from _corpus import TINY_TRAIN, overrides

    from pretrain.cli import main
    from pretrain.export import load_hf

    root, hf = hf_llama
    section, sd = load_hf(root / "hf")
    model = build_model(ModelConfig(**section)).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randint(0, section["vocab_size"], (2, 30))
    with torch.no_grad():
        assert (model(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4
    # continue pre-training from it, on data tokenized with its tokenizer
    assert main(["prepare", str(root / "corpus"), "--out", str(tmp_path / "data"), "--tokenizer",
                 str(root / "hf"), "--val-fraction", "0.2"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), "--data.path", str(tmp_path / "data"),
                 "--train.init_from", str(root / "hf"), "--train.max_steps", "6",
                 "--train.eval_interval", "6", "--train.lr", "1e-3", "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["n_params"] == sum(p.numel() for p in hf.parameters())


def test_import_bad_inputs(hf_llama, tmp_path, capsys):
    import shutil

    from pretrain.cli import main

    root, _ = hf_llama
    base = ["train", "--out", str(tmp_path / "r"), "--data.path", str(root / "d"), "--data.seq_len", "16"]
    assert main(["prepare", str(root / "corpus"), "--out", str(root / "d"), "--tokenizer", "char"]) == 0
    capsys.readouterr()
    # data tokenized with another tokenizer
    assert main([*base, "--train.init_from", str(root / "hf")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    # an unsupported architecture
    other = tmp_path / "falcon"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"],
                                                   "model_type": "falcon"}))
    assert main([*base, "--train.init_from", str(other)]) == 2
    assert "cannot import FalconForCausalLM" in capsys.readouterr().err
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                   "model_type": "gpt2"}))
    assert main([*base, "--train.init_from", str(other)]) == 2
    assert "lacks the field" in capsys.readouterr().err
    # malformed config.json and weight index: a clear error, not a traceback
    from pretrain import PretrainError
    from pretrain.export import load_hf

    (other / "config.json").write_text("[1, 2]")
    with pytest.raises(PretrainError, match="must hold a JSON object, not a list"):
        load_hf(other)
    idx = tmp_path / "idx"
    shutil.copytree(root / "hf", idx)
    (idx / "model.safetensors").unlink()
    for text in ('{"weight_map": ', '{"metadata": {}}', "[]"):
        (idx / "model.safetensors.index.json").write_text(text)
        with pytest.raises(PretrainError, match="not a valid weight index"):
            load_hf(idx)
    # missing tokenizer files
    no_tok = tmp_path / "no_tok"
    shutil.copytree(root / "hf", no_tok)
    (no_tok / "tokenizer.json").unlink()
    assert main([*base, "--train.init_from", str(no_tok)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    # weights that do not fit the config (shape mismatch)
    bad = tmp_path / "bad"
    shutil.copytree(root / "hf", bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(conf))
    assert main(["prepare", str(root / "corpus"), "--out", str(tmp_path / "d2"),
                 "--tokenizer", str(bad)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "r2"), "--data.path", str(tmp_path / "d2"),
                 "--data.seq_len", "16", "--train.init_from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and "bad" in err
    # a --model.* override that contradicts the checkpoint's architecture is ignored with a warning
    conf = json.loads((root / "hf" / "config.json").read_text())
    assert main(["prepare", str(root / "corpus"), "--out", str(tmp_path / "d3"),
                 "--tokenizer", str(root / "hf")]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "r3"), "--data.path", str(tmp_path / "d3"),
                 "--data.seq_len", "16", "--train.init_from", str(root / "hf"),
                 "--model.n_layer", str(conf["num_hidden_layers"] + 3),
                 "--model.dropout", "0.1", "--train.max_steps", "2", "--quiet"]) == 0
    assert f"ignoring model.n_layer={conf['num_hidden_layers'] + 3}" in capsys.readouterr().err
    saved = (tmp_path / "r3" / "config.yaml").read_text()
    assert f"n_layer: {conf['num_hidden_layers']}" in saved and "dropout: 0.1" in saved


def test_import_gpt2_matches_trains_and_round_trips(tmp_path, capsys):
    """A tiny random GPT-2 saved locally → --train.init_from → same logits; training continues; and the
    continued run exports back to a GPT2LMHeadModel with the same logits."""
    from _corpus import TINY_TRAIN, overrides, write_corpus

    from pretrain.checkpoint import load_pretrained
    from pretrain.cli import main
    from pretrain.data.tokenizer import train_bpe
    from pretrain.export import load_hf

    paths = write_corpus(tmp_path / "corpus", n_docs=8)
    tok = train_bpe([p.read_text() for p in paths], 300)
    conf = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    _randomize_gains(hf)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok.save(tmp_path / "hf" / "tokenizer.json")
    section, sd = load_hf(tmp_path / "hf")
    model = build_model(ModelConfig(**section)).eval()
    model.load_state_dict(sd, strict=False)
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        assert (model(x) - hf(input_ids=x).logits).abs().max().item() <= 1e-4
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "data"), "--tokenizer",
                 str(tmp_path / "hf")]) == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), "--data.path", str(tmp_path / "data"),
                 "--init-from", str(tmp_path / "hf"), "--train.max_steps", "4", "--quiet"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "back")]) == 0
    ours, _, _, _ = load_pretrained(run)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (ours(x) - back(input_ids=x).logits).abs().max().item() <= 1e-4
    prompt = x[:1, :5]
    assert ours.generate(prompt, 20, temperature=0).tolist() == back.generate(
        prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0).tolist()


def test_sharded_export_loads(runs, tmp_path):
    from pretrain.checkpoint import load_pretrained
    from pretrain.export import export_hf

    run, _ = runs["gpt"]
    res = export_hf(run, tmp_path / "sharded", max_shard_bytes=20_000, dtype="bf16")
    assert len(res["weights"]) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    ours = load_pretrained(run)[0]
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():  # bf16 weights: agreement within bf16 rounding
        assert (ours(x) - hf(input_ids=x).logits).abs().max().item() < 0.1


def test_export_of_a_hub_data_run_and_a_failed_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("datasets")
    from _corpus import TINY_TRAIN, overrides, sentences

    import pretrain.export as export
    from pretrain.cli import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(sentences(20, i))}) + "\n" for i in range(8)))
    assert main(["prepare", "hf:json", "--hf-data-files", str(src), "--out", str(tmp_path / "d"),
                 "--tokenizer", "byte", "--val-fraction", "0.2"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *overrides(TINY_TRAIN), "--data.path", str(tmp_path / "d"),
                 "--train.max_steps", "2", "--train.warmup_steps", "0", "--quiet"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| hf:json |" in card and "| — |" in card  # a Hub source: its name, no byte size

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_model_card", broken)  # fails after the weights and tokenizer are written
    for out in (tmp_path / "new", tmp_path / "hf"):
        before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
        with pytest.raises(PretrainError, match="could not write the export .*disk full"):
            export.export_hf(run, out, dtype="bf16", overwrite=True)
        after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
        assert after == before  # no half-written export, the previous one intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (tmp_path / "hf").iterdir() if p.name.startswith(".")) == []
    # an existing, empty --out that is a symlink (or a mount point) stays what it is
    monkeypatch.undo()
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    export.export_hf(run, tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "config.json").is_file()
    # a move that fails part-way puts the earlier export back
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    real = export.os.replace
    calls = []

    def flaky(a, b):
        calls.append(a)
        if len(calls) == len(before) + 3:  # the old files moved aside, three of the new ones placed
            raise OSError("device busy")
        real(a, b)

    monkeypatch.setattr(export.os, "replace", flaky)
    with pytest.raises(PretrainError, match="device busy"):
        export.export_hf(run, tmp_path / "hf", dtype="bf16", overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_export_replaces_only_its_own_unedited_export(runs, hf_llama, tmp_path, capsys):
    """Rule 1 for `export --out`: an earlier export is exported over as long as none of its files was edited;
    another Hugging Face model, a fine-tune or the run itself are not."""
    from pretrain.cli import main

    run, _ = runs["gpt"]
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0  # its own earlier export, as it was written
    card = out / "README.md"
    assert card.read_text().splitlines()[-1].startswith("<!-- pretrain-record: ")  # invisible on the Hub
    card.write_text(card.read_text().replace("## Use", "## Intended use\n\nMy own words.\n\n## Use"))
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "README.md changed after it was written" in err and "--overwrite" in err
    assert "My own words" in card.read_text()
    assert main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert "My own words" not in card.read_text()
    # a model that pretrain did not export (a transformers checkpoint) keeps its weights
    hf_dir = hf_llama[0] / "hf"
    before = (hf_dir / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--out", str(hf_dir)]) == 2
    assert "a Hugging Face model not exported by pretrain" in capsys.readouterr().err
    assert (hf_dir / "model.safetensors").read_bytes() == before
    # the run itself, or a folder holding it: refused, --overwrite or not
    for where in (run, run.parent):
        assert main(["export", str(run), "--out", str(where), "--overwrite"]) == 2
        assert "an input of `pretrain export`" in capsys.readouterr().err
    assert not (run / "config.json").exists() and not (run.parent / "config.json").exists()
