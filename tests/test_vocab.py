"""One vocabulary across commands: --text-column everywhere (the old --text-field still works),
`finetune --max-train`, `predict` copying the input's columns and scoring its labels; the metrics are
scikit-learn's / scipy's, and entity F1 matches seqeval's."""

from __future__ import annotations

import json
import random
import warnings

import numpy as np
import pytest
from _corpus import tiny_text_run
from test_finetune import sentiment_rows, write_jsonl

from pretrain.cli import build_parser, main
from pretrain.finetune.metrics import compute_metrics, entity_spans

# --------------------------------------------------------------------------------------- entity-span F1

EDGE_CASES = [  # (gold, predicted) sentences
    (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"]),  # IOB2, exact
    (["B-PER", "I-PER", "O"], ["B-PER", "O", "O"]),  # a span cut short: wrong
    (["I-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]),  # I- without B- starts a span (the same span)
    (["O", "I-LOC", "O", "I-LOC"], ["O", "B-LOC", "O", "B-LOC"]),
    (["B-PER", "B-PER", "I-PER"], ["B-PER", "I-PER", "I-PER"]),  # B- right after B-: two spans
    (["B-ORG"], ["B-ORG"]),  # single-token entities
    (["B-ORG", "O", "B-MISC"], ["B-MISC", "O", "B-ORG"]),  # right spans, wrong types
    (["B-PER", "I-LOC", "I-LOC"], ["B-PER", "B-LOC", "I-LOC"]),  # a type change ends a span
    (["I-PER", "I-PER", "B-PER", "O"], ["I-PER", "I-PER", "I-PER", "O"]),  # IOB1 (CoNLL-2003)
    (["S-PER", "O", "B-LOC", "E-LOC"], ["S-PER", "O", "B-LOC", "I-LOC"]),  # IOBES
    (["B-LOC", "E-LOC", "E-LOC", "S-LOC"], ["B-LOC", "I-LOC", "E-LOC", "S-LOC"]),
    (["O", "O", "O"], ["B-PER", "O", "O"]),  # nothing to find, a false positive
    (["B-PER", "O"], ["O", "O"]),  # nothing predicted
    (["PER", "PER", "O", "LOC"], ["PER", "O", "O", "LOC"]),  # unprefixed (IO) tags
]


def _seqeval(gold: list[list[str]], pred: list[list[str]]) -> tuple[float, float, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    with warnings.catch_warnings():  # (unprefixed tags: "seems not to be NE tag"; nothing predicted)
        warnings.simplefilter("ignore")
        return (precision_score(gold, pred), recall_score(gold, pred), f1_score(gold, pred))


def _ours(gold: list[list[str]], pred: list[list[str]]) -> tuple[float, float, float]:
    tp = fp = fn = 0
    for g, p in zip(gold, pred):
        sg, sp = entity_spans(g), entity_spans(p)
        tp, fp, fn = tp + len(sp & sg), fp + len(sp - sg), fn + len(sg - sp)
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return prec, rec, 2 * prec * rec / max(prec + rec, 1e-12)


def test_entity_spans_are_seqevals():
    pytest.importorskip("seqeval")
    from seqeval.metrics.sequence_labeling import get_entities

    for gold, pred in EDGE_CASES:
        for tags in (gold, pred):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = {(s, e + 1, t) for t, s, e in get_entities(tags)}
            assert entity_spans(tags) == theirs, tags
        assert _ours([gold], [pred]) == pytest.approx(_seqeval([gold], [pred])), (gold, pred)
    # all the edge cases as one evaluation set
    gold, pred = [g for g, _ in EDGE_CASES], [p for _, p in EDGE_CASES]
    assert _ours(gold, pred) == pytest.approx(_seqeval(gold, pred))
    # random sequences over every prefix, two types and the odd tags
    rng = random.Random(0)
    tags = ["O", "O", "O"] + [f"{p}-{t}" for p in "BIES" for t in ("PER", "LOC")] + ["PER", "B-"]
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(300)]
    pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in s] for s in gold]
    assert _ours(gold, pred) == pytest.approx(_seqeval(gold, pred))


def test_token_metrics_use_entity_f1_for_iobes_too():
    gold = [["S-PER", "O", "B-LOC", "E-LOC"]]
    assert compute_metrics("token", [["S-PER", "O", "B-LOC", "I-LOC"]], gold)["f1"] == 1.0  # the same spans
    m = compute_metrics("token", [["S-PER", "O", "B-LOC", "S-LOC"]], gold)  # 1 of 3 right, 1 of 2 found
    assert m["f1"] == pytest.approx(0.4) and m["metric"] == m["f1"] and m["accuracy"] == 0.75
    assert "f1" not in compute_metrics("token", [["NN", "VB"]], [["NN", "NN"]])  # no entity tags: accuracy


def test_metrics_are_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

    rng = np.random.default_rng(0)
    g, p = rng.normal(size=50), rng.normal(size=50)
    p[:10] = p[0]  # ties
    m = compute_metrics("regression", list(p), list(g))
    assert m["pearson"] == pytest.approx(pearsonr(p, g)[0]) and m["metric"] == m["pearson"]
    assert m["spearman"] == pytest.approx(spearmanr(p, g)[0])
    assert m["mse"] == pytest.approx(mean_squared_error(g, p))
    assert compute_metrics("regression", [1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["pearson"] == 0.0  # undefined
    gold, pred = [1, 2, 2, 3, 3, 3], [1, 2, 3, 3, 3, 4]  # numbers and a class only predicted
    m = compute_metrics("classification", pred, gold)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))


# ----------------------------------------------------------------------------------------- flag names


def test_text_column_is_the_flag_and_text_field_an_alias(tmp_path, capsys):
    parser = build_parser()
    sub = {a.dest: a for a in parser._actions if a.dest == "command"}["command"].choices
    for command in ("prepare", "embed", "finetune", "probe", "transfer", "predict"):
        assert "--text-column" in sub[command].format_help(), command
        assert "--text-field" not in sub[command].format_help(), command
    args = parser.parse_args(["embed", "RUN", "--input", "x.jsonl", "--out", "e.npy", "--text-field", "body"])
    assert args.text_field == "body"
    assert "--text-field is deprecated: use --text-column" in capsys.readouterr().err
    # prepare reads the column either way (the alias is no "text-only option given" for image inputs)
    write_jsonl(tmp_path / "c.jsonl", [{"body": f"document number {i} " * 20} for i in range(20)])
    for flag in ("--text-column", "--text-field"):
        out = tmp_path / flag.strip("-")
        assert main(["prepare", str(tmp_path / "c.jsonl"), "--out", str(out), "--tokenizer", "byte",
                     flag, "body", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["train_tokens"] > 0
    assert main(["prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "x"),
                 "--tokenizer", "byte"]) == 2
    assert "no field 'text'" in (err := capsys.readouterr().err) and "(choose one with --text-column)" in err


# ------------------------------------------------------------------------- finetune --max-train, predict


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    tiny_text_run(root, "clm", steps=10)
    write_jsonl(root / "train.jsonl", sentiment_rows(120, 1))
    write_jsonl(root / "valid.jsonl", [{"id": f"v{i}", **r} for i, r in enumerate(sentiment_rows(30, 2))])
    assert main(["finetune", str(root / "run"), "--train", str(root / "train.jsonl"), "--valid",
                 str(root / "valid.jsonl"), "--out", str(root / "ft"), "--max-train", "24", "--epochs", "2",
                 "--batch-size", "8", "--lr", "3e-3", "--quiet", "--json"]) == 0
    return root


def test_finetune_max_train_uses_a_seeded_subset(tuned, tmp_path, capsys):
    from pretrain import PretrainError
    from pretrain.config import FinetuneConfig
    from pretrain.finetune.loop import max_train_subset
    from pretrain.finetune.transfer import transfer

    info = json.loads((tuned / "ft" / "finetune.json").read_text())
    assert info["train_examples"] == 24 and info["config"]["max_train"] == 24
    cfg = FinetuneConfig(max_train=24)
    rows = max_train_subset(cfg, tuned / "run", tuned / "train.jsonl")
    assert len(rows) == 24 and rows == max_train_subset(cfg, tuned / "run", tuned / "train.jsonl")
    other = FinetuneConfig(max_train=24, seed=1)
    assert rows != max_train_subset(other, tuned / "run", tuned / "train.jsonl")
    labels = [r["label"] for r in sentiment_rows(120, 1)]
    assert {labels[i] for i in rows} == {"pos", "neg"}
    assert max_train_subset(FinetuneConfig(max_train=500), tuned / "run", tuned / "train.jsonl") is None
    with pytest.raises(PretrainError, match="max_train does not apply to transfer"):
        transfer(tuned / "run", tuned / "train.jsonl", tuned / "valid.jsonl", tmp_path / "t", cfg)
    assert main(["finetune", str(tuned / "run"), "--train", "x", "--valid", "y", "--out", "z",
                 "--max-train", "-1"]) == 2
    assert "max_train must be >= 0" in capsys.readouterr().err


def test_predict_copies_columns_and_scores_labels(tuned, tmp_path, capsys):
    from pretrain.finetune.predict import evaluate_finetuned

    valid = tuned / "valid.jsonl"
    capsys.readouterr()
    assert main(["predict", str(tuned / "ft"), "--input", str(valid), "--out",
                 str(tmp_path / "p.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "on the input's labels: accuracy" in printed and "macro_f1" in printed
    assert main(["predict", str(tuned / "ft"), "--input", str(valid), "--out", str(tmp_path / "p.jsonl"),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    src = [json.loads(x) for x in valid.read_text().splitlines()]
    assert list(rows[0])[:5] == ["row", "id", "text", "label", "prediction"]
    assert [(r["id"], r["text"], r["label"]) for r in rows] == [(s["id"], s["text"], s["label"]) for s in src]
    # the same figures as the fine-tune's validation metrics (finetune --test's scoring)
    test = evaluate_finetuned(tuned / "ft", valid)
    assert res["metrics"] == pytest.approx({k[5:]: v for k, v in test.items()})
    acc = np.mean([r["prediction"] == r["label"] for r in rows])
    assert res["metrics"]["accuracy"] == pytest.approx(acc)

    # no labels, another id column, other column names
    plain = write_jsonl(tmp_path / "plain.jsonl",
                        [{"key": i, "sentence": s["text"]} for i, s in enumerate(src)])
    assert main(["predict", str(tuned / "ft"), "--input", str(plain), "--out", str(tmp_path / "q.csv"),
                 "--text-column", "sentence", "--id-column", "key", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert "metrics" not in res
    header, first = (tmp_path / "q.csv").read_text().splitlines()[:2]
    assert header.split(",")[:4] == ["row", "key", "sentence", "prediction"]
    assert first.startswith(f"0,0,{src[0]['text']},")
    assert main(["predict", str(tuned / "ft"), "--input", str(plain), "--out", str(tmp_path / "r.csv"),
                 "--text-column", "sentence", "--id-column", "nope"]) == 2
    assert "no column 'nope'; columns present: key, sentence (choose one with --id-column)" in \
        capsys.readouterr().err
    assert main(["predict", str(tuned / "ft"), "--input", str(plain), "--out", str(tmp_path / "r.csv")]) == 2
    assert "(choose one with --text-column)" in capsys.readouterr().err
