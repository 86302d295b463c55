"""`pretrain export FT_DIR` of a classification / regression / token-classification fine-tune: the stock
``*ForSequenceClassification`` / ``*ForTokenClassification`` class (ModernBERT, Llama, GPT-2) computing the
fine-tune's logits, its labels in config.json, a tokenizer that lays a text out as fine-tuning did, so that
transformers' ``pipeline`` predicts as `pretrain predict` does; what the class cannot compute is refused.
Also: ``--lora --save-adapter`` writes a PEFT adapter that loads onto the pre-trained run's export; the
decoder export has a pad token; written files follow the process umask."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from _corpus import sentences, tiny_text_run

from pretrain.cli import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _perturb(model: torch.nn.Module) -> None:
    """Norms start at 1 and biases at 0: move them so a mix-up shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def _task_model(arch: str, kind: str, task: str, n_out: int, pooling: str):
    from pretrain.config import Config, ModelConfig
    from pretrain.data.tokenizer import build_tokenizer
    from pretrain.finetune.model import TaskModel
    from pretrain.models import build_model, get_spec

    tok = build_tokenizer(kind, sentences(200), 300)
    torch.manual_seed(0)
    spec = get_spec(arch)
    head = spec.hf.task(task)
    cfg = Config()
    cfg.model = ModelConfig(arch=arch, n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size,
                            max_seq_len=48, tie_embeddings=arch != "gpt")
    model = TaskModel(build_model(cfg.model), 64, n_out, pooling, spec.bidirectional, 0.0,
                      token_level=task == "token", head_features=head.head_features,
                      bias=head.head_bias).eval()
    _perturb(model)
    return model, cfg, tok


# ---------------------------------------------------------------------------- the mapping, per architecture
CLASSES = [("gpt", "bpe", "classification", "last", "LlamaForSequenceClassification"),
           ("gpt2", "bpe", "regression", "last", "GPT2ForSequenceClassification"),
           ("bert", "wordpiece", "classification", "cls", "ModernBertForSequenceClassification"),
           ("bert", "wordpiece", "regression", "mean", "ModernBertForSequenceClassification"),
           ("gpt", "bpe", "token", "none", "LlamaForTokenClassification"),
           ("gpt2", "bpe", "token", "none", "GPT2ForTokenClassification"),
           ("bert", "wordpiece", "token", "none", "ModernBertForTokenClassification")]


@pytest.mark.parametrize("arch,kind,task,pooling,cls", CLASSES)
def test_task_model_is_the_stock_class(arch, kind, task, pooling, cls, tmp_path):
    from pretrain.export import export_model

    n_out = 1 if task == "regression" else 3
    model, cfg, tok = _task_model(arch, kind, task, n_out, pooling)
    labels = None if task == "regression" else ["neg", "neu", "pos"]
    res = export_model(model, cfg, tmp_path / "hf", tok=tok, task=task, labels=labels)
    auto = transformers.AutoModelForTokenClassification if task == "token" \
        else transformers.AutoModelForSequenceClassification
    assert res["architecture"] == cls and res["auto_class"] == auto.__name__
    hf, loading = auto.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(hf).__name__ == cls
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    if task == "regression":
        assert conf["problem_type"] == "regression" and conf["num_labels"] == 1
    else:
        assert conf["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and conf["label2id"]["pos"] == 2
    # a padded batch: pad with the export's pad token, as a batched tokenizer would
    pad = conf["pad_token_id"]
    x = torch.randint(5, tok.vocab_size, (3, 40))
    x[x == pad] = 5
    x[x == tok.eot_id] = 6
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 29:] = mask[2, 7:] = False  # right padding
    x[:, -1][mask[:, -1]] = tok.eot_id
    for r in (1, 2):
        x[r, int(mask[r].sum()) - 1] = tok.eot_id  # (every input ends with the end-of-text token)
        x[r][~mask[r]] = pad
    with torch.no_grad():  # (ours ignores what the padding holds: the pad may be past its vocabulary)
        ours = model(torch.where(mask, x, tok.eot_id), mask)
        theirs = hf.eval()(input_ids=x, attention_mask=mask.long()).logits
    if task == "token":
        assert (ours - theirs)[mask].abs().max().item() <= 1e-4
    else:
        assert (ours - theirs).abs().max().item() <= 1e-4
    assert not (tmp_path / "hf" / "generation_config.json").exists()


def test_what_the_class_cannot_compute_is_refused(tmp_path):
    from pretrain import PretrainError
    from pretrain.export import export_model

    model, cfg, tok = _task_model("gpt", "bpe", "classification", 2, "mean")
    with pytest.raises(PretrainError, match="pools the sequence by last, this fine-tune by mean"):
        export_model(model, cfg, tmp_path / "a", tok=tok, task="classification")
    model, cfg, tok = _task_model("bert", "wordpiece", "classification", 2, "last")
    with pytest.raises(PretrainError, match="by cls or mean, this fine-tune by last"):
        export_model(model, cfg, tmp_path / "b", tok=tok, task="classification")
    model, cfg, tok = _task_model("gpt", "bpe", "classification", 2, "last")
    model.classifier.bias = torch.nn.Parameter(torch.full((2,), 0.5))  # (fine-tuned before heads matched)
    with pytest.raises(PretrainError, match="`score` has no bias"):
        export_model(model, cfg, tmp_path / "c", tok=tok, task="classification")
    model, cfg, tok = _task_model("bert", "wordpiece", "classification", 2, "cls")
    model.head_features = False
    with pytest.raises(PretrainError, match="applies head transform"):
        export_model(model, cfg, tmp_path / "d", tok=tok, task="classification")
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------------- fine-tuned, exported, predicted
def _classification_data(root: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(["king", "queen", "river"])
        text = " ".join(sentences(1, seed * 1000 + i)[0].split()[:6] + [label] * 2)
        rows.append({"text": text, "label": label, "score": float(len(text) % 7)})
    path = root / f"cls_{seed}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _conll(root: Path, n: int, seed: int) -> Path:
    lines = []
    for i in range(n):
        for w in sentences(1, seed * 1000 + i)[0].rstrip(".").split()[:8]:
            lines.append(f"{w} {'B-ROY' if w.lower() in ('king', 'queen') else 'O'}")
        lines.append("")
    path = root / f"tags_{seed}.conll"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["bert", "gpt"])
def fine_tunes(request, tmp_path_factory):
    """A tiny pre-trained run, fine-tuned for classification, regression and token tags (files written under
    umask 027), each exported → (root, {task: (ft, export)}, data files)."""
    root = tmp_path_factory.mktemp(f"export_ft_{request.param}")
    old = os.umask(0o027)
    try:
        tiny_text_run(root, "mlm" if request.param == "bert" else "clm")
        train, valid = _classification_data(root, 48, 1), _classification_data(root, 16, 2)
        tags_train, tags_valid = _conll(root, 24, 3), _conll(root, 8, 4)
        common = ["--epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--max-length", "32", "--quiet"]
        out = {}
        for name, task, tr, va, extra in (
                ("classification", "classification", train, valid, []),
                ("regression", "regression", train, valid, ["--label-column", "score"]),
                ("token", "token", tags_train, tags_valid, []),
                ("lora", "classification", train, valid, ["--lora", "--save-adapter", "--lora-r", "4"])):
            ft, hf = root / f"ft_{name}", root / f"hf_{name}"
            assert main(["finetune", str(root / "run"), "--task", task, "--train", str(tr), "--valid",
                         str(va), "--out", str(ft), *common, *extra]) == 0
            assert main(["export", str(ft), "--out", str(hf)]) == 0
            out[name] = (ft, hf)
        assert main(["export", str(root / "run"), "--out", str(root / "hf_base")]) == 0
    finally:
        os.umask(old)
    return root, out, {"classification": valid, "regression": valid, "token": tags_valid}


def _scores(result) -> dict[str, float]:
    """A text-classification pipeline's answer for one text (top_k=None), as {label: probability}."""
    if result and isinstance(result[0], list):  # (some versions nest a single text's answer)
        result = result[0]
    return {d["label"]: d["score"] for d in result}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_text_classification_pipeline_predicts_as_predict(fine_tunes, tmp_path):
    root, out, data = fine_tunes
    ft, hf = out["classification"]
    assert main(["predict", str(ft), "--input", str(data["classification"]), "--out",
                 str(tmp_path / "p.jsonl"), "--dtype", "fp32"]) == 0
    rows = _rows(tmp_path / "p.jsonl")
    texts = [r["text"] for r in _rows(data["classification"])]
    conf = json.loads((hf / "config.json").read_text())
    info = json.loads((ft / "finetune.json").read_text())
    assert list(conf["id2label"].values()) == [str(n) for n in info["labels"]]
    classify = transformers.pipeline("text-classification", model=str(hf), top_k=None)
    for text, row in zip(texts, rows):
        got = _scores(classify(text))
        assert max(got, key=got.get) == row["prediction"]
        for name, p in got.items():
            assert abs(p - row[f"p_{name}"]) <= 1e-4
    # batched with padding: the same probabilities
    batched = transformers.pipeline("text-classification", model=str(hf), top_k=None, batch_size=8)
    for text, res in zip(texts, batched(texts)):
        want = _scores(classify(text))
        assert all(abs(p - want[k]) <= 1e-5 for k, p in _scores(res).items())


def test_regression_export_predicts_the_same_numbers(fine_tunes, tmp_path):
    root, out, data = fine_tunes
    ft, hf = out["regression"]
    assert main(["predict", str(ft), "--input", str(data["regression"]), "--out", str(tmp_path / "p.jsonl"),
                 "--dtype", "fp32"]) == 0
    rows = _rows(tmp_path / "p.jsonl")
    conf = json.loads((hf / "config.json").read_text())
    assert conf["problem_type"] == "regression" and conf["num_labels"] == 1
    score = transformers.pipeline("text-classification", model=str(hf), function_to_apply="none")
    texts = [r["text"] for r in _rows(data["regression"])]
    for text, row in zip(texts, rows):
        assert abs(score(text)[0]["score"] - row["prediction"]) <= 1e-4


def test_token_classification_pipeline_tags_as_predict(fine_tunes, tmp_path):
    from pretrain.finetune.data import read_conll
    from pretrain.finetune.encode import encode_words
    from pretrain.finetune.predict import load_finetuned

    root, out, data = fine_tunes
    ft, hf = out["token"]
    assert main(["predict", str(ft), "--input", str(data["token"]), "--out", str(tmp_path / "p.conll"),
                 "--dtype", "fp32"]) == 0
    predicted = [[line.split()[1] for line in block.splitlines()]
                 for block in (tmp_path / "p.conll").read_text().strip().split("\n\n")]
    model, info, tok = load_finetuned(ft)
    ex = read_conll(data["token"], with_tags=False)
    ids, _, first, _ = encode_words(tok, ex.words, None, info["encoder"], info["max_length"],
                                    label_at=info["token_label"])
    tag = transformers.pipeline("token-classification", model=str(hf), ignore_labels=[])
    hf_tok = tag.tokenizer
    for words, row_ids, at, want in zip(ex.words, ids, first, predicted):
        sentence = " ".join(words)
        assert hf_tok(sentence)["input_ids"] == row_ids  # the tokenizer lays the sentence out as fine-tuning
        entities = tag(sentence)
        specials = sum(1 for t in row_ids if t in (tok.cls_id, tok.eot_id))
        assert len(entities) == len(row_ids) - specials
        by_index = {e["index"]: e["entity"] for e in entities}
        assert [by_index[a] for a in at] == want


def test_prompt_fine_tune_is_refused(fine_tunes, tmp_path, capsys):
    root, out, data = fine_tunes
    arch = json.loads((out["classification"][0] / "finetune.json").read_text())["backbone"]["model"]["arch"]
    if arch != "bert":
        pytest.skip("the encoder's [MASK] prompt is enough")
    ft = tmp_path / "ft_prompt"
    assert main(["finetune", str(root / "run"), "--train", str(data["classification"]), "--valid",
                 str(data["classification"]), "--out", str(ft), "--prompt", "{text} it was {mask} .",
                 "--verbalizer", "king=king,queen=queen,river=river", "--epochs", "1", "--max-length", "32",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(ft), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "prompt-based fine-tune" in err and "no --prompt" in err
    assert not (tmp_path / "hf").exists()


def test_decoder_export_pads_and_generates_to_its_context(fine_tunes):
    root, out, _ = fine_tunes
    base = root / "hf_base"
    conf = json.loads((base / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(base)
    assert tok.pad_token is not None and tok.pad_token_id == conf["pad_token_id"]
    batch = tok(["a short one", "a somewhat longer text than the first"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2
    assert int(batch["attention_mask"][0].sum()) < batch["input_ids"].shape[1]  # (padded)
    if (base / "generation_config.json").exists():  # (a decoder)
        gen = json.loads((base / "generation_config.json").read_text())
        assert gen["max_length"] >= conf["max_position_embeddings"]
        assert gen["pad_token_id"] == tok.pad_token_id


def test_written_files_follow_the_umask(fine_tunes):
    """Everything the fixture's commands wrote under umask 027 (prepare, train, finetune, export): files
    0640, folders 0750 — safetensors' own 0600 included."""
    root, _, _ = fine_tunes
    written = [p for p in root.rglob("*") if p.name not in ("corpus",) and "corpus" not in p.parts
               and not p.is_symlink()]
    assert any(p.name == "model.safetensors" for p in written)
    wrong = {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in written
             if p.stat().st_mode & 0o777 != (0o750 if p.is_dir() else 0o640)}
    assert not wrong


def test_lora_adapter_loads_onto_the_base_export(fine_tunes):
    from peft import PeftModel

    from pretrain.finetune.encode import _batch, encode_inputs
    from pretrain.finetune.predict import load_finetuned

    root, out, data = fine_tunes
    ft, hf = out["lora"]
    adapter = ft / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= \
        {p.name for p in adapter.iterdir()}
    recipe = json.loads((adapter / "pretrain_adapter.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(adapter)
    auto = getattr(transformers, recipe["auto_class"])
    base = auto.from_pretrained(root / "hf_base", **recipe["base_config"])
    assert type(base).__name__ == recipe["architecture"]
    if recipe["vocab_size"] > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(recipe["vocab_size"])
    base.config.pad_token_id = tok.pad_token_id
    assert tok.pad_token_id == recipe["pad_token_id"]
    model = PeftModel.from_pretrained(base, adapter).eval()
    ours, info, our_tok = load_finetuned(ft)
    texts = [r["text"] for r in _rows(data["classification"])]
    ids, _ = encode_inputs(our_tok, texts, None, info["encoder"], info["max_length"], "end")
    batch = tok(texts, padding=True, return_tensors="pt")
    for i, row in enumerate(ids):  # the adapter's tokenizer lays the texts out as fine-tuning did
        assert batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist() == row
    x, mask, _ = _batch(ids, our_tok.eot_id)
    with torch.no_grad():
        want = ours(x, mask)
        got = model(**batch).logits
    assert (want - got).abs().max().item() <= 1e-4
    # the merged fine-tune exported whole predicts the same
    whole = transformers.AutoModelForSequenceClassification.from_pretrained(hf).eval()
    with torch.no_grad():
        assert (whole(**batch).logits - got).abs().max().item() <= 1e-4


def test_save_adapter_needs_lora_and_an_exportable_head(fine_tunes, tmp_path, capsys):
    root, _, data = fine_tunes
    args = ["finetune", str(root / "run"), "--train", str(data["classification"]), "--valid",
            str(data["classification"]), "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a"), "--save-adapter"]) == 2
    assert "needs lora" in capsys.readouterr().err
    decoder = (root / "hf_base" / "generation_config.json").exists()
    pooling = "mean" if decoder else "last"  # (Llama pools the last token; ModernBERT [CLS] or the mean)
    assert main([*args, "--out", str(tmp_path / "b"), "--lora", "--save-adapter", "--pooling", pooling]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot compute what this fine-tune does" in err
