"""Extractive question answering: reading SQuAD / tables, windows with character offsets, decoding, SQuAD
EM/F1, null answers, bad input, and `pretrain finetune|predict|transfer --task qa` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _corpus import sentences, synthetic_squad, tiny_text_run

from pretrain.config import ConfigError, FinetuneConfig
from pretrain.data.tokenizer import build_tokenizer
from pretrain.finetune.data import TaskDataError
from pretrain.finetune.qa import (
    QAExamples,
    answer_tokens,
    decode,
    encode_qa,
    normalize_answer,
    read_qa,
    squad_em_f1,
    window_starts,
)

UNICODE_CONTEXT = ("  Der Große  Bär —\tnaïve café\u00a0owners in 東京 met  Zoë\n\n"
                   "Ångström at 9:30,\tthen   walked to the “Old Bridge”.   ")


def _tokenizers():
    text = [UNICODE_CONTEXT, *sentences(200)]
    return {"byte": build_tokenizer("byte"), "char": build_tokenizer("char", text),
            "bpe": build_tokenizer("bpe", text, 400), "wordpiece": build_tokenizer("wordpiece", text, 300)}


TOKS = _tokenizers()


def _examples(context: str, answers: list[str], question: str = "who met whom?") -> QAExamples:
    gold = [[(a, context.index(a))] if a else [] for a in answers]
    n = len(answers)
    return QAExamples([str(i) for i in range(n)], [question] * n, [context] * n, gold, "test")


def _spike(w, i: int, start: int, end: int) -> np.ndarray:
    """(T, 2) logits of window ``i`` that put the answer on positions start..end."""
    lg = np.zeros((len(w.ids[i]), 2), dtype=np.float32)
    lg[start, 0] = lg[end, 1] = 20.0
    return lg


# ---------------------------------------------------------------------------------------------------- metrics
def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    m = squad_em_f1(["the Eiffel Tower", "Eiffel", "Paris", "blue"],
                    [["Eiffel Tower."], ["Eiffel Tower"], ["Lyon", "in Paris"], ["red"]])
    assert m["exact_match"] == pytest.approx(1 / 4)
    # 1 + 2/3 (P 1, R 1/2) + 2/3 (best gold: 'in Paris', P 1, R 1/2) + 0
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)
    assert "no_answer_accuracy" not in m


def test_squad_null_answers_scored():
    m = squad_em_f1(["", "x", "", "a b"], [[], [], ["a b"], ["a b"]])
    assert m["exact_match"] == pytest.approx(2 / 4)
    assert m["no_answer_accuracy"] == pytest.approx(1 / 2)
    assert m["has_answer_f1"] == pytest.approx(1 / 2)


# ---------------------------------------------------------------------------------------------------- windows
def test_window_starts_share_stride_and_reach_the_end():
    assert window_starts(10, 4, 1) == [0, 3, 6]
    assert window_starts(10, 4, 0) == [0, 4, 8]
    assert window_starts(3, 4, 2) == [0]
    for n, room, stride in ((57, 9, 4), (100, 10, 9), (8, 8, 3)):
        s = window_starts(n, room, stride)
        assert s[-1] + room >= n and all(b - a == room - stride for a, b in zip(s, s[1:]))


@pytest.mark.parametrize("kind", sorted(TOKS))
@pytest.mark.parametrize("answer", ["Große  Bär", "naïve café", "東京", "Zoë\n\nÅngström", "9:30",
                                    "“Old Bridge”"])
def test_spans_map_back_to_exact_characters(kind, answer):
    """Whatever the tokenizer (bytes of a multi-byte character, BPE pieces with their leading space,
    lower-cased WordPiece), the answer's tokens decode back to exactly its characters in the context."""
    tok = TOKS[kind]
    ex = _examples(UNICODE_CONTEXT, [answer])
    cfg = FinetuneConfig(task="qa", doc_stride=8)
    w = encode_qa(tok, ex, kind == "wordpiece", 512, cfg, null=False, train=True)
    assert len(w.ids) == 1
    start, end = w.start[0], w.end[0]
    off = w.offsets[0]
    a, b = off[start - w.ctx_at[0]][0], off[end - w.ctx_at[0]][1]
    assert UNICODE_CONTEXT[a:b].strip() == answer
    got = decode(ex, w, [_spike(w, 0, start, end)], with_null=False, null=False, cfg=cfg)[0]
    assert got.text == answer and UNICODE_CONTEXT[got.start:got.end] == answer
    assert got.start == UNICODE_CONTEXT.index(answer)


def test_answer_tokens_of_a_character_span():
    off = [(0, 3), (3, 8), (8, 9), (10, 15)]  # 'the' ' quick' ',' ' brown' (a gap at 9)
    assert answer_tokens(off, 4, 9) == (1, 2)
    assert answer_tokens(off, 10, 15) == (3, 3)
    assert answer_tokens(off, 9, 10) is None  # only the gap: no token covers it


@pytest.mark.parametrize("encoder", [True, False])
def test_answer_across_a_window_boundary_is_found_in_the_window_holding_it_whole(encoder):
    tok = TOKS["wordpiece"] if encoder else TOKS["bpe"]
    cfg = FinetuneConfig(task="qa", doc_stride=12)
    room = 48 - (1 if encoder else 0) - len(tok.encode("who?")) - 2
    answer = "Queen Alice of the green castle"
    for k in range(80):  # filler before the answer until a window's edge falls inside it
        context = " ".join(f"w{i}" for i in range(k)) + f" {answer} " + " ".join(f"w{i}" for i in range(60))
        c_ids, c_off = tok.encode_offsets([context])[0]
        first, last = answer_tokens(c_off, context.index(answer), context.index(answer) + len(answer))
        starts = window_starts(len(c_ids), room, cfg.doc_stride)
        whole = [j for j, s in enumerate(starts) if s <= first and last < s + room]
        cut = [j for j, s in enumerate(starts) if s <= last and first < s + room and j not in whole]
        if cut and whole:
            break
    assert cut and whole, "the layout must put a window edge inside the answer"
    ex = _examples(context, [answer], "who?")
    w = encode_qa(tok, ex, encoder, 48, cfg, null=False, train=True)
    answered = [k for k in range(len(w.ids)) if w.start[k] != w.null_at[k]]
    assert len(answered) == len(whole)  # every window holding it whole, and only those, point at the answer
    if encoder:  # the others point at [CLS]
        assert len(w.ids) == len(starts)
        assert all(w.start[k] == 0 for k in range(len(w.ids)) if k not in answered)
    else:  # a decoder without unanswerable questions has no null position to point at: those are left out
        assert len(w.ids) == len(answered)
    # decoding: the answer, from the windows at inference (no targets)
    wv = encode_qa(tok, ex, encoder, 48, cfg, null=False, train=False)
    k = whole[0]
    pos = wv.ctx_at[k] + first - starts[k], wv.ctx_at[k] + last - starts[k]
    logits = [_spike(wv, i, *pos) if i == k else np.zeros((len(wv.ids[i]), 2), np.float32)
              for i in range(len(wv.ids))]
    got = decode(ex, wv, logits, with_null=encoder, null=False, cfg=cfg)[0]
    assert got.text == answer


def test_max_answer_length_limits_spans():
    tok = TOKS["wordpiece"]
    context = "alpha beta gamma delta epsilon zeta"
    ex = _examples(context, ["alpha"])
    w = encode_qa(tok, ex, True, 64, FinetuneConfig(task="qa"), null=False, train=False)
    lg = np.zeros((len(w.ids[0]), 2), np.float32)
    n = len(w.offsets[0])
    lg[w.ctx_at[0], 0] = 20.0  # start on the first context token, end on the last
    lg[w.ctx_at[0] + n - 1, 1] = 20.0
    long = decode(ex, w, [lg], True, False, FinetuneConfig(task="qa", max_answer_length=n))[0]
    assert long.text == context
    short = decode(ex, w, [lg], True, False, FinetuneConfig(task="qa", max_answer_length=3))[0]
    first, last = answer_tokens(w.offsets[0], short.start, short.end)
    assert short.text and last - first + 1 <= 3


# ------------------------------------------------------------------------------------------------- SQuAD 2.0
def _squad(path: Path, paragraphs: list[tuple[str, list[tuple[str, str | None]]]],
           version: str = "v2.0") -> Path:
    """A SQuAD file: (context, [(question, answer text or None = unanswerable)])."""
    paras = []
    for p, (context, qas) in enumerate(paragraphs):
        items = []
        for k, (q, a) in enumerate(qas):
            item = {"id": f"q{p}-{k}", "question": q,
                    "answers": [] if a is None else [{"text": a, "answer_start": context.index(a)}]}
            if version == "v2.0":
                item["is_impossible"] = a is None
            items.append(item)
        paras.append({"context": context, "qas": items})
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paras}]}),
                    encoding="utf-8")
    return path


def test_squad2_unanswerable_questions_target_and_decode_null(tmp_path):
    ctx = "Alice held the sword. Bob held the crown."
    f = _squad(tmp_path / "v2.json", [(ctx, [("Who held the sword?", "Alice"), ("Who held the cup?", None)])])
    cfg = FinetuneConfig(task="qa")
    ex = read_qa(f, cfg)
    assert ex.answers == [[("Alice", 0)], []] and ex.unanswerable == 1
    for encoder, tok in ((True, TOKS["wordpiece"]), (False, TOKS["bpe"])):
        w = encode_qa(tok, ex, encoder, 64, cfg, null=True, train=True)
        assert w.start[1] == w.end[1] == w.null_at[1] == (0 if encoder else len(w.ids[1]) - 1)
        assert w.start[0] != w.null_at[0]
        null_lg = np.zeros((len(w.ids[1]), 2), np.float32)
        null_lg[w.null_at[1]] = 20.0
        span_lg = _spike(w, 0, w.start[0], w.end[0])
        got = decode(ex, w, [span_lg, null_lg], with_null=True, null=True, cfg=cfg)
        assert [a.text for a in got] == ["Alice", ""] and got[1].start == -1
        # a high threshold: the null must beat the best span by more than it, so the span stands
        lenient = decode(ex, w, [span_lg, null_lg], True, True, FinetuneConfig(task="qa", null_threshold=1.0))
        assert lenient[1].text != ""
        assert squad_em_f1([a.text for a in got], [["Alice"], []])["exact_match"] == 1.0


# -------------------------------------------------------------------------------------------------- bad input
def test_answer_not_at_answer_start_is_an_error_or_a_counted_skip(tmp_path, capsys):
    ctx = "Alice held the sword. Bob held the crown."
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": ctx, "qas": [
        {"id": "ok", "question": "Who held the sword?", "answers": [{"text": "Alice", "answer_start": 0}]},
        {"id": "off", "question": "Who held the crown?", "answers": [{"text": "Bob", "answer_start": 20}]},
        {"id": "off2", "question": "What?", "answers": [{"text": "crown", "answer_start": 3}]}]}]}]}
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(TaskDataError, match=r"2 question\(s\) have an answer that is not at its "
                                            r"answer_start.*"
                                            r"id off.*'Bob'.*the text is at 22.*--bad-rows skip"):
        read_qa(f, FinetuneConfig(task="qa"))
    ex = read_qa(f, FinetuneConfig(task="qa", bad_rows="skip"))
    assert ex.ids == ["ok"] and ex.skipped == 2
    assert "skipped 2 question(s)" in capsys.readouterr().err


def test_empty_context_and_missing_columns(tmp_path):
    rows = [{"question": "Who?", "context": "  ", "answer_text": "", "answer_start": -1}]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TaskDataError, match="empty context"):
        read_qa(f, FinetuneConfig(task="qa"))
    g = tmp_path / "cols.csv"
    g.write_text("q,passage\nWho?,Alice\n")
    with pytest.raises(TaskDataError, match=r"no column 'question'.*q, passage.*--question-column"):
        read_qa(g, FinetuneConfig(task="qa"))
    ex = read_qa(g, FinetuneConfig(task="qa", question_column="q", context_column="passage"),
                 with_answers=False)
    assert ex.questions == ["Who?"] and ex.ids == ["0"]
    h = tmp_path / "notsquad.json"
    h.write_text(json.dumps({"version": "1.1", "articles": []}))
    with pytest.raises(TaskDataError, match="top-level 'data' list"):
        read_qa(h, FinetuneConfig(task="qa"))


def test_table_rows_with_and_without_answers(tmp_path):
    ctx = "Alice held the sword."
    f = tmp_path / "t.csv"
    f.write_text(f'id,question,context,answer_text,answer_start\na,Who?,"{ctx}",Alice,0\nb,What?,"{ctx}",,\n')
    ex = read_qa(f, FinetuneConfig(task="qa"))
    assert ex.ids == ["a", "b"] and ex.answers == [[("Alice", 0)], []]


def test_question_too_long_and_stride_too_large():
    tok = TOKS["wordpiece"]
    ex = _examples("Alice held the sword " * 20, ["Alice"], question="who " * 40)
    with pytest.raises(TaskDataError, match=r"longer than --max-length 32.*id 0"):
        encode_qa(tok, ex, True, 32, FinetuneConfig(task="qa"), null=False, train=True)
    w = encode_qa(tok, ex, True, 32, FinetuneConfig(task="qa", bad_rows="skip"), null=False, train=True)
    assert w.skipped == 1 and not w.ids
    ok = _examples("Alice held the sword " * 20, ["Alice"], question="who?")
    with pytest.raises(ConfigError, match=r"--doc-stride 30 is too large.*--max-length 32.*"
                                          r"holds 2[0-9] context tokens"):
        encode_qa(tok, ok, True, 32, FinetuneConfig(task="qa", doc_stride=30), null=False, train=True)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module", params=["mlm", "clm"])
def qa_setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"qa_{request.param}")
    tiny_text_run(root, request.param, seq_len=128, steps=5)
    return root, synthetic_squad(root / "train.json", 6, 1), synthetic_squad(root / "dev.json", 2, 2)


def test_finetune_predict_and_score_qa(qa_setup, capsys):
    from pretrain.cli import main

    root, train, dev = qa_setup
    ft = root / "ft"
    assert main(["finetune", str(root / "run"), "--task", "qa", "--train", str(train), "--valid", str(dev),
                 "--test", str(dev), "--out", str(ft), "--max-length", "64", "--doc-stride", "16",
                 "--epochs", "2", "--lr", "1e-3", "--quiet", "--json", "--overwrite"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"val_exact_match", "val_f1"} <= set(res["best"])
    assert res["best"]["val_metric"] == res["best"]["val_f1"]
    lines = [json.loads(x) for x in (ft / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all("val_f1" in x for x in lines)
    info = json.loads((ft / "finetune.json").read_text())
    assert info["task"] == "qa" and info["windows"]["train"] > 72  # (72 questions; long contexts: more)
    assert info["test"]["test_f1"] == pytest.approx(res["best"]["val_f1"], abs=1e-6)
    pred = root / "pred.jsonl"
    assert main(["predict", str(ft), "--input", str(dev), "--out", str(pred)]) == 0
    rows = [json.loads(x) for x in pred.read_text().splitlines()]
    doc = json.loads(dev.read_text())
    contexts = {q["id"]: p["context"] for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]}
    assert len(rows) == 24 and {"id", "answer", "start", "end", "score"} <= set(rows[0])
    for r in rows:  # every answer is the exact characters at its offsets
        if r["start"] >= 0:
            assert contexts[r["id"]][r["start"]:r["end"]] == r["answer"] and r["score"] > 0
    squad_pred = root / "pred.json"
    assert main(["predict", str(ft), "--input", str(dev), "--out", str(squad_pred)]) == 0
    assert json.loads(squad_pred.read_text()) == {r["id"]: r["answer"] for r in rows}


def test_transfer_qa_compares_with_scratch_and_the_sliding_window(qa_setup, capsys):
    from pretrain.cli import main

    root, train, dev = qa_setup
    out = root / "transfer"
    assert main(["transfer", str(root / "run"), "--task", "qa", "--train", str(train), "--valid", str(dev),
                 "--out", str(out), "--budgets", "16,all", "--seeds", "1", "--recipe", "fixed",
                 "--max-length", "64", "--doc-stride", "16", "--min-steps", "1", "--max-epochs", "1",
                 "--quiet", "--json", "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [a["kind"] for a in report["arms"]] == ["pretrained", "scratch", "sliding_window"]
    assert report["metric"] == "F1 (SQuAD)" and report["train_examples"] == 72
    runs = {(r["arm"], r["n"]) for r in report["results"]}
    assert runs == {(a, n) for a in ("pretrained", "scratch", "sliding_window") for n in (16, 72)}
    assert all("val_exact_match" in r for r in report["results"])
    assert "exact match" in (out / "report.md").read_text()


def test_a_finetuned_model_starts_another_finetune(qa_setup, tmp_path):
    """Intermediate-task training: a QA fine-tune's directory in place of the run gives its backbone, and
    for the same task its head, to the next fine-tune."""
    import torch

    from pretrain.cli import main
    from pretrain.finetune.model import TaskModel, carry_head, load_backbone, origin
    from pretrain.finetune.predict import load_finetuned

    root, train, dev = qa_setup
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--task", "qa", "--train", str(train), "--valid", str(dev), "--max-length", "64",
              "--doc-stride", "16", "--epochs", "1", "--lr", "1e-3", "--quiet"]
    assert main(["finetune", str(root / "run"), *common, "--out", str(first)]) == 0
    done, info, _ = load_finetuned(first)
    backbone, pcfg, tok, path = load_backbone(first, 0.0, False, 0)
    assert path == first and tok.sha256() == info["tokenizer_sha256"]
    for (k, a), b in zip(backbone.state_dict().items(), done.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    model = TaskModel(backbone, pcfg.model.d_model, 2, "none", info["encoder"], 0.0, token_level=True,
                      head_features=info["head_features"])
    assert not carry_head(model, first, "token")  # another task: a fresh head
    assert carry_head(model, first, "qa") and torch.equal(model.classifier.weight, done.classifier.weight)
    assert str(origin(first)) == info["pretrained_from"] and origin(root / "run") == root / "run"
    assert main(["finetune", str(first), *common, "--out", str(second)]) == 0
    assert json.loads((second / "finetune.json").read_text())["pretrained_from"] == str(first)
