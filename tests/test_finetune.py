"""Transfer: fine-tuning (classification, pairs, regression, token labels; full / LoRA / from scratch),
prediction, linear probe, transfer report; bad input → clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import pytest
import torch
from _corpus import WORDS, tiny_text_run

from pretrain.cli import main
from pretrain.data.sources import sha256_file

POS = ["light", "day", "summer", "green"]
NEG = ["night", "dark", "winter", "rain"]
BASE = [w for w in WORDS if w not in POS + NEG]
FAST = ["--epochs", "8", "--lr", "3e-3", "--batch-size", "16", "--patience", "0", "--quiet"]


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Text with exactly one marker word; its group decides the label (learnable by a tiny model)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lab = rng.random() < 0.5
        words = [rng.choice(BASE) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POS if lab else NEG))
        out.append({"text": " ".join(words), "label": "pos" if lab else "neg"})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["mlm", "clm"])
def pretrained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ft_{request.param}")
    tiny_text_run(root, request.param)
    write_jsonl(root / "train.jsonl", sentiment_rows(240, 1))
    write_jsonl(root / "valid.jsonl", sentiment_rows(60, 2))
    return request.param, root


def test_classification_end_to_end(pretrained, capsys):
    objective, root = pretrained
    capsys.readouterr()
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(root / "ft"), *FAST, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["best"]["val_accuracy"] >= 0.8, res["best"]  # majority class is ~0.5
    lines = [json.loads(x) for x in (root / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and all("val_accuracy" in x for x in lines)
    assert res["best"]["val_accuracy"] == max(x["val_accuracy"] for x in lines)
    info = json.loads((root / "ft" / "finetune.json").read_text())
    assert info["pooling"] == ("cls" if objective == "mlm" else "last") and info["labels"] == ["neg", "pos"]

    # predict: row-aligned, and the saved best model reproduces the best validation accuracy
    assert main(["predict", str(root / "ft"), "--input", str(root / "valid.jsonl"), "--out",
                 str(root / "pred.jsonl"), "--json"]) == 0
    capsys.readouterr()
    preds = [json.loads(x) for x in (root / "pred.jsonl").read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in (root / "valid.jsonl").read_text().splitlines()]
    assert [p["row"] for p in preds] == list(range(len(gold)))
    acc = sum(p["prediction"] == g for p, g in zip(preds, gold)) / len(gold)
    assert acc == pytest.approx(res["best"]["val_accuracy"], abs=1e-6)
    assert all(abs(p["p_neg"] + p["p_pos"] - 1) < 1e-4 for p in preds)

    # predictions are written whole or not at all: a failed write keeps the previous file
    import pretrain.finetune.predict as trainer

    before = (root / "pred.jsonl").read_bytes()
    with pytest.raises(ValueError):
        trainer._write_rows(root / "pred.jsonl", [{"row": 0, "p": 0.5}, {"row": 1, "p": float("nan")}])
    assert (root / "pred.jsonl").read_bytes() == before and not list(root.glob(".pred*"))
    # weights that diverge are never evaluated nor saved as the best model
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(root / "ft_nan"), "--epochs", "1", "--lr", "1e30",
                 "--grad-clip", "0", "--warmup-frac", "0", "--batch-size", "60", "--quiet"]) == 2
    assert "diverged" in capsys.readouterr().err and not (root / "ft_nan" / "finetune.json").exists()


def test_from_scratch_differs_and_probe(pretrained, capsys):
    from pretrain.finetune.model import load_backbone

    objective, root = pretrained
    pre, *_ = load_backbone(root / "run", 0.0, False, 0)
    scr, *_ = load_backbone(root / "run", 0.0, True, 0)
    name = next(iter(pre.state_dict()))
    assert not torch.equal(pre.state_dict()[name], scr.state_dict()[name])
    capsys.readouterr()
    assert main(["probe", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["train_examples"] == 240 and res["dim"] == 32


def test_lora_trains_only_adapters_and_merge_matches(pretrained, tmp_path):
    pytest.importorskip("peft")
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.encode import _batch, encode_inputs
    from pretrain.finetune.loop import finetune
    from pretrain.finetune.model import TaskModel, _apply_lora, load_backbone, merged
    from pretrain.finetune.predict import load_finetuned

    objective, root = pretrained
    cfg = FinetuneConfig(lora=True, lora_r=4, epochs=4, lr=3e-3, batch_size=16, patience=0)
    res = finetune(root / "run", root / "train.jsonl", root / "valid.jsonl", tmp_path / "lora", cfg,
                   quiet=True)
    assert res["trained_params"] < res["total_params"] / 4

    backbone, pcfg, tok, _ = load_backbone(root / "run", 0.0, False, 0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = _apply_lora(TaskModel(backbone, 32, 2, "mean", objective == "mlm"), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".classifier." in n for n in trainable), trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, _ = encode_inputs(tok, ["the king spoke", "a dark night came"], None, objective == "mlm", 32, "end")
    x, mask, _ = _batch(ids, tok.eot_id)
    for _ in range(3):
        model(x, mask).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    base = model.get_base_model().backbone
    for k, v in before.items():  # the frozen base weights did not move
        key = k if k in base.state_dict() else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(base.state_dict()[key], v), k
    model.eval()
    with torch.no_grad():
        y_adapter = model(x, mask)
        y_merged = merged(model)(x, mask)
    assert not any("lora" in n for n, _ in merged(model).named_parameters())
    torch.testing.assert_close(y_merged, y_adapter, atol=1e-5, rtol=1e-4)
    # the saved (merged) model reloads as a plain TaskModel with the same predictions as it had in training
    ft, info, _ = load_finetuned(tmp_path / "lora")
    assert info["config"]["lora"] is True


def one_token_words(root: Path, encoder: bool) -> list[str]:
    """Words of the tiny corpus that are one token of its tokenizer (as a verbalizer uses them)."""
    from pretrain.data.tokenizer import Tokenizer

    tok = Tokenizer.load(root / "run" / "tokenizer.json")
    return [w for w in BASE if len(tok.encode(w if encoder else " " + w)) == 1]


def test_prompt_classification_end_to_end(pretrained, tmp_path, capsys):
    """--prompt/--verbalizer: the LM head scores label words at the slot; zero-shot first, then trained;
    no new head; the saved model predicts what it scored in validation."""
    objective, root = pretrained
    tr, va = str(root / "train.jsonl"), str(root / "valid.jsonl")
    w = one_token_words(root, objective == "mlm")
    capsys.readouterr()
    assert main(["finetune", str(root / "run"), "--train", tr, "--valid", va, "--out", str(tmp_path / "ft"),
                 *FAST, "--prompt", "{text} . it was {mask}", "--verbalizer", f"neg={w[0]},pos={w[1]}",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["best"]["val_accuracy"] >= 0.8, res["best"]
    lines = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    # zero-shot + 8 epochs
    assert lines[0]["step"] == 0 and lines[0]["train_loss"] is None and len(lines) == 9
    # the whole backbone, its LM head included; nothing new
    assert res["trained_params"] == res["total_params"]
    info = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert len(info["prompt"]["label_ids"]) == 2
    assert main(["predict", str(tmp_path / "ft"), "--input", va, "--out", str(tmp_path / "pred.jsonl"),
                 "--json"]) == 0
    preds = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in (root / "valid.jsonl").read_text().splitlines()]
    acc = sum(p["prediction"] == g for p, g in zip(preds, gold)) / len(gold)
    assert acc == pytest.approx(res["best"]["val_accuracy"], abs=1e-6)
    # early stopping counts from the first trained evaluation, not from the zero-shot one: with a learning
    # rate too small to change anything, patience 1 stops after the second epoch, not the first
    assert main(["finetune", str(root / "run"), "--train", tr, "--valid", va, "--out", str(tmp_path / "ft2"),
                 "--quiet", "--epochs", "5", "--lr", "1e-9", "--patience", "1",
                 "--prompt", "{text} . it was {mask}", "--verbalizer", f"neg={w[0]},pos={w[1]}"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "ft2" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]


def test_prompt_encoding_and_errors(pretrained, tmp_path, capsys):
    from pretrain.config import ConfigError, FinetuneConfig
    from pretrain.finetune.encode import encode_prompts, verbalizer_ids
    from pretrain.finetune.loop import finetune
    from pretrain.finetune.model import load_backbone

    objective, root = pretrained
    encoder = objective == "mlm"
    _, _, tok, _ = load_backbone(root / "run", 0.0, False, 0)
    w = one_token_words(root, encoder)
    texts = ["the king spoke", " ".join(BASE * 2)]
    template = "{text} it was {mask} ." if encoder else "{text} it was {mask}"
    ids, truncated = encode_prompts(tok, template, texts, None, encoder, 24, "end")
    assert truncated == 1 and all(len(x) <= 24 for x in ids)
    tail = tok.encode(" it was")
    if encoder:  # [CLS] text it was [MASK] . [SEP]: one slot per row, the template kept whole
        assert all(x[0] == tok.cls_id and x[-1] == tok.eot_id and x.count(tok.mask_id) == 1 for x in ids)
        assert all(x[x.index(tok.mask_id) - len(tail):x.index(tok.mask_id)] == tail for x in ids)
        (x,), _ = encode_prompts(tok, "{text} {mask}", ["a [MASK] b"], None, True, 24, "end")
        assert x.count(tok.mask_id) == 1  # a mask token in the text itself is dropped
    else:  # a decoder ends right before the slot: the next token is the label word
        assert all(x[-len(tail):] == tail for x in ids)
        with pytest.raises(ConfigError, match="must end the template"):
            encode_prompts(tok, "{mask} {text}", texts, None, False, 24, "end")
    with pytest.raises(ConfigError, match="no word for"):
        verbalizer_ids(tok, f"neg={w[0]}", ["neg", "pos"], encoder)
    with pytest.raises(ConfigError, match="not a label"):
        verbalizer_ids(tok, f"neg={w[0]},pos={w[1]},meh={w[2]}", ["neg", "pos"], encoder)
    with pytest.raises(ConfigError, match="one-token words"):
        verbalizer_ids(tok, f"neg={w[0]},pos=greenwinterish", ["neg", "pos"], encoder)
    if tok.unk_id is not None:  # WordPiece: a character it never saw is one [UNK] token
        with pytest.raises(ConfigError, match="not in this vocabulary"):
            verbalizer_ids(tok, f"neg={w[0]},pos=ζ", ["neg", "pos"], encoder)
    assert verbalizer_ids(tok, f"pos={w[1]},neg={w[0]}", ["neg", "pos"], encoder) == \
        [tok.encode(x if encoder else " " + x)[0] for x in w[:2]]
    for bad, match in (({"prompt": "{text} was"}, "needs both"),
                       ({"prompt": "{text} was", "verbalizer": "a=b,c=d"}, "must hold {mask}"),
                       ({"prompt": "{text} {label} {mask}", "verbalizer": "a=b"}, "unknown field"),
                       ({"prompt": "{text} {mask}", "verbalizer": "a=b,c"}, "label=word"),
                       ({"prompt": "{text} {mask}", "verbalizer": "a=b", "task": "regression"},
                        "classification only")):
        with pytest.raises(ConfigError, match=match):
            FinetuneConfig(**bad)
    with pytest.raises(ConfigError, match="no head to train"):
        finetune(root / "run", root / "train.jsonl", root / "valid.jsonl", tmp_path / "o",
                 FinetuneConfig(prompt="{text} {mask}", verbalizer=f"neg={w[0]},pos={w[1]}", head_only=True),
                 quiet=True)


def test_pairs_and_regression(tmp_path, pretrained):
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import finetune

    _, root = pretrained
    rng = random.Random(3)

    def pair_rows(n):
        rows = []
        for _ in range(n):
            a = rng.choice(POS + NEG)
            same = rng.random() < 0.5
            b = a if same else rng.choice([w for w in POS + NEG if w != a])
            rows.append({"a": f"{rng.choice(BASE)} {a} {rng.choice(BASE)}", "b": f"{b} {rng.choice(BASE)}",
                         "same": "yes" if same else "no", "score": float(sum(w in POS for w in (a, b)))})
        return rows

    write_jsonl(tmp_path / "tr.jsonl", pair_rows(200))
    write_jsonl(tmp_path / "va.jsonl", pair_rows(50))
    cfg = FinetuneConfig(text_column="a", text_pair_column="b", label_column="same", epochs=3, lr=3e-3,
                         batch_size=16, patience=0)
    res = finetune(root / "run", tmp_path / "tr.jsonl", tmp_path / "va.jsonl", tmp_path / "pair", cfg,
                   quiet=True)
    assert 0 <= res["best"]["val_accuracy"] <= 1 and res["steps"] == 3 * 13
    cfg = FinetuneConfig(task="regression", text_column="a", text_pair_column="b", label_column="score",
                         epochs=6, lr=3e-3, batch_size=16, patience=0)
    res = finetune(root / "run", tmp_path / "tr.jsonl", tmp_path / "va.jsonl", tmp_path / "reg", cfg,
                   quiet=True)
    assert res["best"]["val_pearson"] > 0.3, res["best"]  # learns something about the score
    assert main(["predict", str(tmp_path / "reg"), "--input", str(tmp_path / "va.jsonl"), "--out",
                 str(tmp_path / "reg.csv")]) == 0
    assert len((tmp_path / "reg.csv").read_text().splitlines()) == 51


def test_token_classification(tmp_path, pretrained):
    _, root = pretrained
    rng = random.Random(4)

    def conll(n):
        lines = ["-DOCSTART- O", ""]
        for _ in range(n):
            for _ in range(rng.randint(3, 8)):
                if rng.random() < 0.3:
                    lines += [f"{rng.choice(POS)} B-POS", f"{rng.choice(BASE)} I-POS"]
                else:
                    lines.append(f"{rng.choice(BASE)} O")
            lines.append("")
        return "\n".join(lines)

    (tmp_path / "tr.conll").write_text(conll(150))
    (tmp_path / "va.conll").write_text(conll(40))
    assert main(["finetune", str(root / "run"), "--task", "token", "--train", str(tmp_path / "tr.conll"),
                 "--valid", str(tmp_path / "va.conll"), "--out", str(tmp_path / "tok"), *FAST]) == 0
    info = json.loads((tmp_path / "tok" / "finetune.json").read_text())
    best = info["best"]
    assert info["token_label"] == ("first" if info["encoder"] else "last")
    assert best["val_accuracy"] > 0.75 and "val_f1" in best, best
    assert main(["predict", str(tmp_path / "tok"), "--input", str(tmp_path / "va.conll"), "--out",
                 str(tmp_path / "pred.conll")]) == 0
    assert main(["predict", str(tmp_path / "tok"), "--input", str(tmp_path / "va.conll"), "--out",
                 str(tmp_path / "pred.jsonl")]) == 2  # CoNLL text, not JSON lines
    pred = [x.split() for x in (tmp_path / "pred.conll").read_text().splitlines()]
    gold = [x.split() for x in (tmp_path / "va.conll").read_text().splitlines()[2:]]
    assert [p[0] for p in pred if p] == [g[0] for g in gold if g]  # word-aligned


def test_token_labels_sit_where_the_model_has_seen_the_word():
    """A decoder labels a word's last sub-token (its first, with a char tokenizer, is the space before it); an
    encoder its first that is not whitespace. Truncation drops whole words, at the end or the start, or
    errors."""
    from pretrain.data.tokenizer import char_tokenizer, train_wordpiece
    from pretrain.finetune.data import TaskDataError
    from pretrain.finetune.encode import IGNORE, encode_words

    sent = [["the", "cat", "runs"]]
    tok = char_tokenizer("the cat runs")
    ids, labels, at, n = encode_words(tok, sent, [[0, 1, 2]], False, 64)
    assert [tok.decode([ids[0][i]]) for i in at[0]] == ["e", "t", "s"] and n == 0
    assert ([lab for lab in labels[0] if lab != IGNORE] == [0, 1, 2]
            and [labels[0][i] for i in at[0]] == [0, 1, 2])
    wp = train_wordpiece(["the cat runs fast"] * 20, 200)
    ids, labels, at, _ = encode_words(wp, sent, [[0, 1, 2]], True, 64)
    assert [wp.decode([ids[0][i]]) for i in at[0]] == ["the", "cat", "runs"] and ids[0][0] == wp.cls_id
    # "the", " cat", " runs": 3 + 4 + 5 tokens; max_len 9 leaves 8 beside <eot>: "the cat" (7) or " runs" (5)
    ids, labels, at, n = encode_words(tok, sent, [[0, 1, 2]], False, 9)
    assert n == 1 and tok.decode(ids[0][:-1]) == "the cat" and at[0][2] == -1
    ids, labels, at, n = encode_words(tok, sent, [[0, 1, 2]], False, 9, "start")
    assert (n == 1 and tok.decode(ids[0][:-1]) == " runs" and at[0][:2] == [-1, -1]
            and labels[0][at[0][2]] == 2)
    # older models
    ids, labels, at, _ = encode_words(tok, sent, [[0, 1, 2]], False, 64, label_at="first_piece")
    assert [tok.decode([ids[0][i]]) for i in at[0]] == ["t", " ", " "]
    with pytest.raises(TaskDataError, match="t.conll: sentence 1 is 12 tokens, more than the 8"):
        encode_words(tok, sent, None, False, 9, "error", "t.conll")


def test_metrics_match_the_usual_definitions():
    from scipy.stats import spearmanr
    from sklearn.metrics import f1_score

    from pretrain.finetune.metrics import compute_metrics

    pred, gold = [0.1, 0.2, 0.3, 0.6, 0.5, 0.4], [0, 0, 0, 1, 1, 1]  # tied gold scores, as in STS data
    assert compute_metrics("regression", pred, gold)["spearman"] == pytest.approx(spearmanr(pred, gold)[0])
    gold_c, pred_c = ["a", "a", "b", "b"], ["a", "c", "b", "c"]  # a class only in the predictions counts too
    assert compute_metrics("classification", pred_c, gold_c)["macro_f1"] == pytest.approx(
        f1_score(gold_c, pred_c, average="macro"))


def test_transfer_report(tmp_path, pretrained, capsys):
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough for the report machinery")
    capsys.readouterr()
    assert main(["transfer", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(tmp_path / "rep"), "--budgets", "20,all",
                 "--seeds", "2", "--min-steps", "10", "--max-epochs", "3", "--batch-size", "16",
                 "--search-carves", "1", "--json"]) == 0  # (automatic carves: the finetune --search test)
    res = json.loads(capsys.readouterr().out)
    assert res["verdict"].startswith("verdict: pre-training ")
    assert [r["n"] for r in res["summary"]] == [20, 240]
    first, full = res["summary"]
    assert set(first["arms"]) == {"pretrained", "scratch", "tfidf"} and set(first["gain"]) == {"pretrained"}
    assert first["arms"]["pretrained"]["seeds"] == 2 and full["arms"]["scratch"]["seeds"] == 1
    lo, hi = first["gain"]["pretrained"]["ci95"]
    assert lo <= first["gain"]["pretrained"]["mean"] <= hi and full["gain"]["pretrained"]["ci95"] is None
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(report["results"]) == 3 * (2 + 1) and 0.3 < report["majority_baseline"] < 0.7
    # a recipe per arm and budget, chosen by 5 candidates on the carves asked for; every seed uses it
    assert set(report["recipes"]) == {"pretrained_n20", "scratch_n20", "pretrained_n240", "scratch_n240"}
    for key, rec in report["recipes"].items():
        assert len(rec["trials"]) == 5 and rec["lr"] in (1e-4, 3e-4, 1e-3, 3e-3) and rec["carves"] == 1
        arm, n = key.rsplit("_n", 1)
        runs = [r for r in report["results"] if r["arm"] == arm and r["n"] == int(n)]
        assert all(r["lr"] == rec["lr"] and r["pooling"] == rec["pooling"] and r["epochs"] == rec["epochs"]
                   for r in runs)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.startswith("**verdict: ") and "| 20 |" in md and "| 240 |" in md and "carved" in md
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    # run again: finished runs are reused for the same inputs, redone when the data changed
    done = sorted((tmp_path / "rep" / "runs").glob("*_n20_s*/done.json"))
    stamp = lambda: [p.stat().st_mtime_ns for p in done]  # noqa: E731
    first_stamps = stamp()
    args = ["transfer", str(root / "run"), "--train", str(root / "train.jsonl"),
            "--out", str(tmp_path / "rep"), "--budgets", "20", "--seeds", "1", "--min-steps", "10",
            "--max-epochs", "3", "--batch-size", "16", "--quiet", "--valid"]
    assert main([*args, str(root / "valid.jsonl")]) == 0
    assert stamp() == first_stamps  # nothing retrained
    valid2 = tmp_path / "valid2.jsonl"
    valid2.write_text((root / "valid.jsonl").read_text().replace('"pos"', '"neg"', 1))
    assert main([*args, str(valid2)]) == 0
    redone = {p: json.loads(p.read_text())["inputs"]["valid_sha256"] for p in done if "_s0" in str(p.parent)}
    assert len(redone) == 2 and all(v == sha256_file(valid2) for v in redone.values())


def test_transfer_fixed_recipe_and_several_runs(tmp_path, pretrained, capsys):
    """--recipe fixed keeps the single-recipe mode; two runs of one architecture share one scratch arm."""
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough")
    import shutil

    shutil.copytree(root / "run", tmp_path / "other")
    capsys.readouterr()
    assert main(["transfer", str(root / "run"), str(tmp_path / "other"), "--train", str(root / "train.jsonl"),
                 "--valid", str(root / "valid.jsonl"), "--out", str(tmp_path / "rep"), "--budgets", "20",
                 "--seeds", "2", "--recipe", "fixed", "--no-tfidf", "--min-steps", "5", "--max-epochs", "2",
                 "--batch-size", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    row = res["summary"][0]
    assert set(row["arms"]) == {"run", "other", "scratch"} and set(row["gain"]) == {"run", "other"}
    # the same weights fine-tuned with the same seeds: the same figures
    assert row["arms"]["run"]["values"] == row["arms"]["other"]["values"]
    assert "run: pre-training" in res["verdict"] and "other: pre-training" in res["verdict"]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["recipes"] == {} and {r["lr"] for r in report["results"] if r["arm"] == "scratch"} == {1e-3}


def test_budget_sampling_keeps_every_class():
    from pretrain.finetune.transfer import parse_budgets, sample_budget

    labels = ["a"] * 95 + ["b"] * 5
    for seed in range(5):
        idx = sample_budget(labels, 4, seed, 100)
        assert len(idx) == len(set(idx)) == 4 and {labels[i] for i in idx} == {"a", "b"}
        assert idx == sample_budget(labels, 4, seed, 100)
    assert parse_budgets("100,1k,all", 5000) == [100, 1000, 5000]
    assert parse_budgets("10k,all", 5000) == [5000]


def test_layer_wise_learning_rates(pretrained):
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import param_groups as _param_groups
    from pretrain.finetune.model import TaskModel, load_backbone

    objective, root = pretrained
    backbone, pcfg, _, _ = load_backbone(root / "run", 0.0, False, 0)
    model = TaskModel(backbone, 32, 2, "mean", objective == "mlm")
    groups = _param_groups(model, FinetuneConfig(lr=1e-3, layer_decay=0.5, head_lr=5e-3), pcfg.model.n_layer)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(model.classifier.weight)] == 5e-3
    block0 = next(p for n, p in named.items() if ".0." in n)
    block1 = next(p for n, p in named.items() if ".1." in n)
    emb = next(p for n, p in named.items() if "emb" in n)
    assert lr_of[id(block1)] == pytest.approx(1e-3)  # the top block gets lr, each one below a factor less
    assert lr_of[id(block0)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(emb)] == pytest.approx(1e-3 * 0.5 ** 2)


def test_bad_input(tmp_path, pretrained, capsys):
    _, root = pretrained
    run, tr, va = str(root / "run"), str(root / "train.jsonl"), str(root / "valid.jsonl")

    def err(*args) -> str:
        capsys.readouterr()
        assert main(list(args)) == 2
        return capsys.readouterr().err

    unseen = write_jsonl(tmp_path / "unseen.jsonl",
                         [{"text": "a b", "label": "pos"}, {"text": "c", "label": "meh"}])
    assert "never seen in the training data: meh" in err("finetune", run, "--train", tr,
                                                         "--valid", str(unseen), "--out", str(tmp_path / "o"))
    empty = write_jsonl(tmp_path / "empty.jsonl",
                        [{"text": "a b", "label": "pos"}, {"text": "  ", "label": "neg"}])
    assert "row 2 has no text" in err("finetune", run, "--train", str(empty), "--valid", va,
                                      "--out", str(tmp_path / "o"))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "neg"}])
    assert "mixes numbers and text" in err("finetune", run, "--train", str(mixed), "--valid", va,
                                           "--out", str(tmp_path / "o"))
    (tmp_path / "mixed.csv").write_text("text,label\na b,1\nc d,pos\n")
    assert "mixes numbers and text" in err("finetune", run, "--train", str(tmp_path / "mixed.csv"),
                                           "--valid", va, "--out", str(tmp_path / "o"))
    e = err("finetune", run, "--train", tr, "--valid", va, "--out", str(tmp_path / "o"),
            "--label-column", "sentiment")
    assert "no column 'sentiment'" in e and "text, label" in e or "label, text" in e
    assert "not a pre-trained run" in err("finetune", str(tmp_path), "--train", tr, "--valid", va,
                                          "--out", str(tmp_path / "o"))
    assert "not a fine-tuned model" in err("predict", run, "--input", va, "--out", str(tmp_path / "p.jsonl"))
    long = write_jsonl(tmp_path / "long.jsonl",
                       [{"text": " ".join(BASE * 3), "label": "pos"}, {"text": "day", "label": "neg"}])
    assert "more than the" in err("finetune", run, "--train", str(long), "--valid", va,
                                  "--out", str(tmp_path / "o"), "--truncation", "error")
    assert "max_length 999 exceeds" in err("finetune", run, "--train", tr, "--valid", va,
                                           "--out", str(tmp_path / "o"), "--max-length", "999")
    capsys.readouterr()
    assert main(["finetune", run, "--train", str(long), "--valid", va, "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"] == {"train": 1, "valid": 0}
    o = str(tmp_path / "o2")
    # no room for the text (this used to loop forever), the pre-training run as --out, bad numbers
    assert "leaves no room for the text" in err("finetune", run, "--train", tr, "--valid", va, "--out", o,
                                                "--max-length", "1")
    assert "is a pre-training run" in err("finetune", run, "--train", tr, "--valid", va, "--out", run)
    assert "lora_dropout must be in [0, 1)" in err("finetune", run, "--train", tr, "--valid", va, "--out", o,
                                                   "--lora", "--lora-dropout", "5")
    assert "--batch-size must be >= 1" in err("predict", str(tmp_path / "o"), "--input", va, "--out",
                                              str(tmp_path / "p.jsonl"), "--batch-size", "0")
    one = write_jsonl(tmp_path / "one.jsonl",
                      [{"text": "a b", "label": "pos"}, {"text": "c", "label": "pos"}])
    assert "at least two labels" in err("probe", run, "--train", str(one), "--valid", str(one))
    assert "reads CoNLL text files" in err("finetune", run, "--task", "token", "--train", tr, "--valid", va,
                                           "--out", o)
    # a stray comma or quote: an error naming the line, never a text cut short or rows merged
    (tmp_path / "extra.csv").write_text("text,label\nthe cat, dog runs,pos\nred sun,neg\n")
    assert "extra.csv:2: row has 3 field(s), the header 2" in err("finetune", run, "--train",
                                                                  str(tmp_path / "extra.csv"),
                                                                  "--valid", va, "--out", o)
    (tmp_path / "quote.csv").write_text('text\nthe cat\n"dog runs\nred sun\n')
    assert "malformed CSV" in err("predict", str(tmp_path / "o"), "--input", str(tmp_path / "quote.csv"),
                                  "--out", str(tmp_path / "q.jsonl"))
    ft_json = tmp_path / "o" / "finetune.json"
    ft_json.write_text("{not json", encoding="utf-8")
    assert "finetune.json is corrupt" in err("predict", str(tmp_path / "o"), "--input", va, "--out",
                                             str(tmp_path / "p.jsonl"))
    ft_json.write_text("{}", encoding="utf-8")
    assert "finetune.json is incomplete" in err("predict", str(tmp_path / "o"), "--input", va, "--out",
                                                str(tmp_path / "p.jsonl"))


def test_every_table_format_reads_the_same_examples(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pretrain.finetune.data import read_examples

    rows = [{"a": f"text {i}, with a comma", "b": f"pair {i}", "y": ["neg", "pos"][i % 2]} for i in range(7)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for name, delim in (("t.csv", ","), ("t.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["a", "b", "y"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    want = ([r["a"] for r in rows], [r["b"] for r in rows], [r["y"] for r in rows])
    for name in ("t.jsonl", "t.json", "t.parquet", "t.csv", "t.tsv"):
        ex = read_examples(tmp_path / name, "a", "y", pair_column="b")
        assert (ex.texts, ex.pairs, ex.labels) == want, name
    nums = (read_examples(tmp_path / "n.csv", "a", "y")
            if (tmp_path / "n.csv").write_text("a,y\nx,1\nz,0.5\n") else None)
    assert nums.labels == [1, 0.5]


ONE_STEP = ["--epochs", "1", "--max-steps", "2", "--batch-size", "16", "--quiet"]


def test_finetune_writes_only_into_its_own_folders(tmp_path, pretrained, capsys):
    """Rule 1 for `finetune --out`: a new or empty folder or an earlier fine-tune; a Hugging Face export, a
    pre-training run or other files need --overwrite; the run and the data's folder are never the output."""
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough for the output rule")
    run, tr, va = str(root / "run"), str(root / "train.jsonl"), str(root / "valid.jsonl")

    def ft(out, *extra) -> int:
        capsys.readouterr()
        return main(["finetune", run, "--train", tr, "--valid", va, "--out", str(out), *ONE_STEP, *extra])

    assert ft(tmp_path / "ft") == 0 and ft(tmp_path / "ft") == 0  # new, then its own earlier output
    # an export keeps its weights (this used to replace them)
    assert main(["export", run, "--out", str(tmp_path / "hf")]) == 0
    weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    assert ft(tmp_path / "hf") == 2
    err = capsys.readouterr().err
    assert "a Hugging Face export" in err and "--overwrite" in err
    assert "not an earlier `pretrain finetune`'s output" in err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == weights
    assert not (tmp_path / "hf" / "finetune.yaml").exists()
    # --overwrite writes the fine-tune into it; what it does not write stays
    assert ft(tmp_path / "hf", "--overwrite") == 0
    assert (tmp_path / "hf" / "finetune.json").is_file() and (tmp_path / "hf" / "config.json").is_file()
    # the run, its checkpoint's run folder, the folder of a data file: refused, --overwrite or not
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(Path(tr).read_text())
    for out, train in ((root / "run", tr), (root, tr), (data, str(data / "train.jsonl"))):
        capsys.readouterr()
        assert main(["finetune", run, "--train", train, "--valid", va, "--out", str(out), *ONE_STEP,
                     "--overwrite"]) == 2
        assert "an input of `pretrain finetune`" in capsys.readouterr().err
    assert not (root / "run" / "finetune.yaml").exists() and sorted(os.listdir(data)) == ["train.jsonl"]


def test_predict_replaces_only_its_own_unchanged_file(tmp_path, pretrained, capsys):
    """Rule 1 for `predict --out`: rerunning into its own earlier file works; a file it did not write, or one
    edited since, needs --overwrite; the input is never the output (this used to overwrite it)."""
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough for the output rule")
    va = root / "valid.jsonl"
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid", str(va),
                 "--out", str(tmp_path / "ft"), *ONE_STEP]) == 0
    args = ["predict", str(tmp_path / "ft"), "--input", str(va), "--out"]
    out = tmp_path / "preds.jsonl"
    assert main([*args, str(out)]) == 0 and main([*args, str(out)]) == 0
    capsys.readouterr()
    labelled = tmp_path / "labelled.jsonl"  # the user's own file
    labelled.write_text(va.read_text())
    assert main([*args, str(labelled)]) == 2
    err = capsys.readouterr().err
    assert "already exists and was not written by `pretrain predict`" in err and "--overwrite" in err
    assert labelled.read_text() == va.read_text()
    assert main([*args, str(labelled), "--overwrite"]) == 0 and '"prediction"' in labelled.read_text()
    with out.open("a") as f:  # predictions checked by hand are the user's work now
        f.write('{"row": 60, "note": "checked"}\n')
    assert main([*args, str(out)]) == 2 and "was changed after" in capsys.readouterr().err
    before = va.read_bytes()
    for extra in ([], ["--overwrite"]):
        assert main(["predict", str(tmp_path / "ft"), "--input", str(va), "--out", str(va), *extra]) == 2
        assert "an input of `pretrain predict`" in capsys.readouterr().err
    assert va.read_bytes() == before


def test_transfer_writes_only_into_its_own_folders(tmp_path, pretrained, capsys):
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough for the output rule")
    args = ["transfer", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
            str(root / "valid.jsonl"), "--budgets", "all", "--seeds", "1", "--min-steps", "1", "--max-epochs",
            "1", "--epochs", "1", "--batch-size", "64", "--quiet", "--out"]
    mine = tmp_path / "reports"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    capsys.readouterr()
    assert main([*args, str(mine)]) == 2
    err = capsys.readouterr().err
    assert "other files (report.md)" in err and "--overwrite" in err
    assert (mine / "report.md").read_text() == "my report" and not (mine / "runs").exists()
    assert main([*args, str(mine), "--overwrite"]) == 0 and (mine / "report.json").is_file()
    assert main([*args, str(mine)]) == 0  # now its own earlier report: run again (finished runs reused)
    assert main([*args, str(root), "--overwrite"]) == 2  # the folder of its inputs
    assert "an input of `pretrain transfer`" in capsys.readouterr().err


def test_a_fine_tune_with_a_swapped_tokenizer_is_refused(pretrained, tmp_path, capsys):
    """finetune.json records the tokenizer's sha256; predict (every loader of a fine-tune) checks it."""
    import json as _json

    from pretrain.data.tokenizer import Tokenizer

    objective, root = pretrained
    ft = tmp_path / "ft"
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(ft), "--epochs", "1", "--quiet"]) == 0
    info = _json.loads((ft / "finetune.json").read_text())
    assert info["tokenizer_sha256"] == Tokenizer.load(ft / "tokenizer.json").sha256()
    doc = _json.loads((ft / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    if isinstance(vocab, dict):  # two ids swapped: the same size, another tokenizer
        a, b = sorted(vocab)[-2:]
        vocab[a], vocab[b] = vocab[b], vocab[a]
    else:
        vocab[-1], vocab[-2] = vocab[-2], vocab[-1]
    (ft / "tokenizer.json").write_text(_json.dumps(doc))
    assert main(["predict", str(ft), "--input", str(root / "valid.jsonl"), "--out",
                 str(tmp_path / "p.jsonl")]) == 2
    assert "not the tokenizer this model was fine-tuned with" in capsys.readouterr().err


def test_carved_split_keeps_every_class_for_training():
    from pretrain.finetune.recipe import carve

    labels = ["a"] * 50 + ["b"] * 3 + ["c"]
    idx = list(range(len(labels)))
    for seed in range(5):
        fit, select = carve(labels, idx, seed)
        assert sorted(fit + select) == idx and len(select) == round(0.2 * len(idx))
        assert {labels[i] for i in fit} == {"a", "b", "c"}  # the single "c" never leaves training
        assert {labels[i] for i in select} <= {labels[i] for i in fit}
        assert (fit, select) == carve(labels, idx, seed)
    # few labels, many classes: one per class in turn, not a carve of the few classes that have several
    many = [f"c{i}" for i in range(55)] + [f"d{i}" for i in range(20) for _ in range(2)] + ["e"] * 5
    for seed in range(5):
        fit, select = carve(many, list(range(len(many))), seed)
        assert len(select) == 20 and len({many[i] for i in select}) == 20
    fit, select = carve(None, list(range(10_000)), 0)
    assert len(select) == 1000 and len(fit) == 9000  # capped: a large budget keeps more for training


def test_small_budgets_are_judged_on_three_carves():
    from pretrain.finetune.recipe import auto_carves

    assert auto_carves(100) == 3 and auto_carves(2000) == 3  # carved splits of 20 to 400 rows
    assert auto_carves(2001) == 1 and auto_carves(5000, search_max=5000) == 3  # above search_max: a subset


def test_finetune_search_chooses_on_the_training_labels(tmp_path, pretrained, capsys):
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough")
    capsys.readouterr()
    out = tmp_path / "ft"
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(out), "--search", "--batch-size", "16",
                 "--epochs", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rec = res["recipe"]
    # 5 candidates, each on 3 carves (a small budget: recipe.auto_carves), recorded in the recipe
    assert len(rec["trials"]) == 5 and len(list((out / "search").iterdir())) == 15 and rec["carves"] == 3
    assert {t["pooling"] for t in rec["trials"]} == {"cls", "mean"}
    # the final run: the chosen recipe, no early stopping, one evaluation after the last epoch
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == rec["epochs"]
    info = json.loads((out / "finetune.json").read_text())
    assert info["config"]["lr"] == rec["lr"] and info["pooling"] == rec["pooling"]
    # the search never read the validation file: its runs validated on rows of the training file
    for run in (out / "search").iterdir():
        assert json.loads((run / "finetune.json").read_text())["valid_examples"] == 48


def test_verdict_says_when_pretraining_did_not_pay_off():
    from pretrain.finetune.transfer import Arm, summarise
    from pretrain.finetune.verdict import _line, _reasons

    arms = [Arm("pretrained", "r", "pretrained"), Arm("scratch", "r", "scratch"), Arm("tfidf", None, "tfidf")]
    res = [{"arm": a, "n": n, "seed": s, "metric": m}
           for n, vals in ((100, {"pretrained": [.50, .52, .51], "scratch": [.55, .56, .57],
                                  "tfidf": [.6] * 3}),
                           (1000, {"pretrained": [.80, .82, .81], "scratch": [.70, .71, .72],
                                   "tfidf": [.7] * 3}))
           for a, ms in vals.items() for s, m in enumerate(ms)]
    summary = summarise(res, [100, 1000], arms)
    assert summary[0]["gain"]["pretrained"]["ci95"][1] < 0 < summary[1]["gain"]["pretrained"]["ci95"][0]
    per_arm = [{"arm": "pretrained",
                "paid_off": [{"n": 1000, "gain": .1, "ci95": summary[1]["gain"]["pretrained"]["ci95"]}],
                "not": [{"n": 100, "gain": -.05, "ci95": summary[0]["gain"]["pretrained"]["ci95"]}]}]
    line = _line(per_arm, {"summary": summary})
    assert line.startswith("verdict: pre-training did NOT pay off at 100 labels: -5.0 points")
    assert "from scratch is better" in line
    assert "it did at 1,000 labels" in line
    checks = {"runs": {"pretrained": {"loss_trend": {"kind": "val_loss", "from": {"step": 800, "loss": 4.0},
                                                     "to": {"step": 1000, "loss": 3.5}, "drop": 0.125},
                                      "task_tokens_per_byte": 0.4, "pretrain_tokens_per_byte": 0.25,
                                      "task_continuation": 0.3, "task_unknown": 0.0}},
              "classes": 10, "per_class": {"100": 10.0, "1000": 100.0}}
    reasons = _reasons(checks, {"summary": summary}, [(arms[0], per_arm[0]["not"][0])])
    text = " ".join(reasons)
    assert "still falling" in text and "far from the pre-training text" in text
    assert "few labels: 10.0 per class at 100" in text and "TF-IDF" in text


def test_schedule_epochs_replays_a_longer_run_stopped_early(tmp_path, pretrained):
    """epochs 2 of a schedule over 4: the first two epochs of the 4-epoch run, step for step."""
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough")
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import finetune

    base = FinetuneConfig(batch_size=16, epochs=4, patience=0, dropout=0.0, device="cpu")
    args = (root / "run", root / "train.jsonl", root / "valid.jsonl")
    long = finetune(*args, tmp_path / "long", base, train_subset=list(range(64)), quiet=True)
    short = finetune(*args, tmp_path / "short", dataclasses.replace(base, epochs=2, schedule_epochs=4),
                     train_subset=list(range(64)), quiet=True)
    at2 = next(h for h in long["history"] if h["epoch"] == 2)
    assert short["steps"] == 8 and short["final"]["val_metric"] == at2["val_metric"]
    assert short["final"]["train_loss"] == pytest.approx(at2["train_loss"], abs=1e-5)


def test_loss_trend_reads_the_runs_metrics(tmp_path, pretrained):
    from pretrain.finetune.verdict import loss_trend

    objective, root = pretrained
    run = tmp_path / "run"
    import shutil

    shutil.copytree(root / "run", run)
    rows = [{"step": s, "train_loss": 5.0 - s / 100} for s in range(10, 101, 10)]
    rows += [{"step": 50, "val_loss": 4.0}, {"step": 100, "val_loss": 3.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = loss_trend(run)
    assert t["kind"] == "val_loss" and t["from"]["step"] == 50 and t["drop"] == pytest.approx(0.25)
    # evaluated once: the training loss of the last fifth against the fifth before
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]) + "\n")
    t = loss_trend(run)
    assert t["kind"] == "train_loss" and t["from"]["loss"] == pytest.approx(4.25) and t["drop"] > 0.01


def test_search_on_several_carves_averages_their_curves(tmp_path, pretrained):
    objective, root = pretrained
    if objective == "clm":
        pytest.skip("one backbone is enough")
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.recipe import inputs_identity, search

    train = root / "train.jsonl"
    labels = [json.loads(line)["label"] for line in train.read_text().splitlines()]
    cfg = FinetuneConfig(batch_size=16, epochs=2, device="cpu")
    rec = search(root / "run", train, list(range(60)), labels, tmp_path / "s", cfg, True,
                 inputs_identity(root / "run", train, train), max_epochs=3, min_steps=1, carves=2)
    runs = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert len(runs) == 10 and sum(r.endswith("_c1") for r in runs) == 5
    best = next(t for t in rec.trials if t["lr"] == rec.lr and t["pooling"] == rec.pooling)
    curves = [json.loads((tmp_path / "s" / f"lr{rec.lr:g}_{rec.pooling}{c}" / "done.json").read_text())
              ["result"]["curve"] for c in ("", "_c1")]
    i = [e for e, _ in curves[0]].index(best["best_epoch"])
    assert best["metric"] == pytest.approx((curves[0][i][1] + curves[1][i][1]) / 2)
    assert best["metric"] == max((a[1] + b[1]) / 2 for a, b in zip(*curves))
    assert rec.epochs == best["best_epoch"]
