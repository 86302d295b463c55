"""`pretrain export FT_DIR` of a question-answering fine-tune: a stock ``*ForQuestionAnswering`` class
(ModernBERT, Llama, GPT-2) whose start / end logits are the fine-tune's, a tokenizer that builds the windows
fine-tuning built, and transformers' question-answering rule answering every question as `pretrain predict`
does. Unsupported or damaged fine-tunes: one clear error, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus import sentences, synthetic_squad, tiny_text_run

from pretrain.cli import main

transformers = pytest.importorskip("transformers")

MAX_LENGTH, DOC_STRIDE = 64, 16


def questions(path: Path) -> list[tuple[str, str, str]]:
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [(q["id"], q["question"], p["context"])
            for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]


# ------------------------------------------------------------------- transformers' question-answering rule
def pipeline_answer(tok, model, question: str, context: str, max_seq_len: int, doc_stride: int,
                    max_answer_len: int) -> dict:
    """What ``pipeline('question-answering')(question=, context=, max_seq_len=, doc_stride=, max_answer_len=,
    align_to_words=False)`` answers — its preprocess / forward / postprocess for a fast tokenizer, top_k 1,
    no impossible answer, as in transformers 4.57 (the pipeline was removed in transformers 5): the tokenizer
    cuts the windows (``stride``), the softmax runs over the context tokens and [CLS], each window's best
    span by p(start) x p(end), the same text (ignoring case) from several windows adds up its scores."""
    question_first = tok.padding_side == "right"
    enc = tok(text=question if question_first else context, text_pair=context if question_first else question,
              padding="do_not_pad", truncation="only_second" if question_first else "only_first",
              max_length=max_seq_len, stride=doc_stride, return_token_type_ids=True,
              return_overflowing_tokens=True, return_offsets_mapping=True, return_special_tokens_mask=True)
    answers: list[dict] = []
    for span in range(len(enc["input_ids"])):
        ids = enc["input_ids"][span]
        p_mask = [s != 1 if question_first else 0 for s in enc.sequence_ids(span)]
        if tok.cls_token_id is not None:  # [CLS] stays in the softmax
            for c in np.nonzero(np.array(ids) == tok.cls_token_id)[0]:
                p_mask[c] = 0
        feature = {"input_ids": ids, "attention_mask": enc["attention_mask"][span],
                   "token_type_ids": enc["token_type_ids"][span]}
        with torch.no_grad():
            out = model(**{k: torch.tensor(feature[k])[None] for k in tok.model_input_names})
        start, end = out.start_logits.numpy(), out.end_logits.numpy()
        desired = np.abs(np.array(p_mask) - 1) & np.array(feature["attention_mask"])
        start = np.where(desired == 0, -10000.0, start)
        end = np.where(desired == 0, -10000.0, end)
        start = np.exp(start - start.max(axis=-1, keepdims=True))
        start = start / start.sum()
        end = np.exp(end - end.max(axis=-1, keepdims=True))
        end = end / end.sum()
        start[0, 0] = end[0, 0] = 0.0
        scores = np.tril(np.triu(np.matmul(start[..., None], end[:, None])), max_answer_len - 1)
        starts, ends = np.unravel_index([np.argmax(scores.flatten())], scores.shape)[1:]
        keep = np.isin(starts, desired.nonzero()) & np.isin(ends, desired.nonzero())
        for s, e in zip(starts[keep], ends[keep]):
            a, b = enc[span].offsets[s][0], enc[span].offsets[e][1]
            score = float(scores[0, s, e])
            same = next((x for x in answers if x["answer"].lower() == context[a:b].lower()), None)
            if same:
                same["score"] += score
            else:
                answers.append({"score": score, "start": a, "end": b, "answer": context[a:b]})
    return sorted(answers, key=lambda x: x["score"], reverse=True)[0]


def qa_pipeline(hf_dir: Path, info: dict) -> Callable[[str, str], dict]:
    """question, context → the answer of transformers' question-answering pipeline with the fine-tune's
    windows and answer length: the pipeline itself where transformers still has it (4.x), else its rule."""
    kw = {"max_seq_len": info["max_length"], "doc_stride": info["qa"]["doc_stride"],
          "max_answer_len": info["qa"]["max_answer_length"]}
    if hasattr(transformers, "QuestionAnsweringPipeline"):
        pipe = transformers.pipeline("question-answering", model=str(hf_dir), tokenizer=str(hf_dir))
        return lambda q, c: pipe(question=q, context=c, align_to_words=False, **kw)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    return lambda q, c: pipeline_answer(tok, model, q, c, **kw)


# ---------------------------------------------------------------------------- the mapping, per architecture
@pytest.mark.parametrize("arch,kind,cls", [("gpt", "bpe", "LlamaForQuestionAnswering"),
                                           ("gpt2", "bpe", "GPT2ForQuestionAnswering"),
                                           ("bert", "wordpiece", "ModernBertForQuestionAnswering")])
def test_task_model_is_the_stock_question_answering_class(arch, kind, cls, tmp_path):
    from pretrain.config import Config, ModelConfig
    from pretrain.data.tokenizer import build_tokenizer
    from pretrain.export import export_model
    from pretrain.finetune.model import TaskModel
    from pretrain.models import build_model, get_spec

    tok = build_tokenizer(kind, sentences(200), 300)
    torch.manual_seed(0)
    encoder = get_spec(arch).bidirectional
    cfg = Config()
    cfg.model = ModelConfig(arch=arch, n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size,
                            max_seq_len=48, tie_embeddings=arch != "gpt")
    model = TaskModel(build_model(cfg.model), 64, 2, "none", encoder, 0.0, token_level=True,
                      head_features=encoder).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb them so a mix-up would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    res = export_model(model, cfg, tmp_path / "hf", tok=tok, task="qa")
    assert res["architecture"] == cls and res["auto_class"] == "AutoModelForQuestionAnswering"
    hf, loading = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "hf",
                                                                             output_loading_info=True)
    assert type(hf).__name__ == cls
    assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    x = torch.randint(5, tok.vocab_size, (2, 40))
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 29:] = False  # right padding in the second row
    with torch.no_grad():
        ours = model(x, mask)
        theirs = hf.eval()(input_ids=x, attention_mask=mask.long())
    for i, logits in enumerate((theirs.start_logits, theirs.end_logits)):
        assert (ours[..., i] - logits)[mask].abs().max().item() <= 1e-4
    assert not (tmp_path / "hf" / "generation_config.json").exists()  # (a QA model does not generate)


# -------------------------------------------------------------------------- fine-tuned, exported, answered
@pytest.fixture(scope="module", params=["bert", "gpt"])
def qa_export(request, tmp_path_factory):
    """A tiny pre-trained run (as test_finetune's), fine-tuned for QA, exported → (fine-tune folder, export
    folder, dev file)."""
    root = tmp_path_factory.mktemp(f"export_qa_{request.param}")
    tiny_text_run(root, "mlm" if request.param == "bert" else "clm", seq_len=128)
    train = synthetic_squad(root / "train.json", 4, 1, filler=(3, 6))
    dev = synthetic_squad(root / "dev.json", 2, 2, filler=(3, 6))
    ft, hf = root / "ft", root / "hf"
    assert main(["finetune", str(root / "run"), "--task", "qa", "--train", str(train), "--valid", str(dev),
                 "--out", str(ft), "--max-length", str(MAX_LENGTH), "--doc-stride", str(DOC_STRIDE),
                 "--epochs", "2", "--lr", "3e-3", "--batch-size", "8", "--quiet"]) == 0  # (decisive enough:
    # no two spans of a window within float rounding of each other, so the answers compared below are exact)
    assert main(["export", str(ft), "--out", str(hf)]) == 0
    return ft, hf, dev


def test_exported_logits_and_windows_are_the_fine_tunes(qa_export):
    from pretrain.config import FinetuneConfig, from_dict
    from pretrain.finetune.encode import _batch
    from pretrain.finetune.predict import load_finetuned
    from pretrain.finetune.qa import encode_qa, read_qa

    ft, hf_dir, dev = qa_export
    model, info, tok = load_finetuned(ft)
    cfg = from_dict(FinetuneConfig, info["config"])
    ex = read_qa(dev, cfg, with_answers=False)
    w = encode_qa(tok, ex, info["encoder"], info["max_length"], cfg, info["qa"]["null"], train=False)
    assert len(w.ids) > 2 * len(ex)  # contexts of several windows
    # the exported tokenizer cuts the same windows (the pipeline's, the question first)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.padding_side == "right" and hf_tok.model_input_names == ["input_ids", "attention_mask"]
    for i, (q, c) in enumerate(zip(ex.questions, ex.contexts)):
        enc = hf_tok(q, c, truncation="only_second", max_length=info["max_length"],
                     stride=info["qa"]["doc_stride"], return_overflowing_tokens=True)
        assert enc["input_ids"] == [ids for ids, j in zip(w.ids, w.example) if j == i]
    # the same start / end logits (fp32, eval), padded batches included
    hf = transformers.AutoModelForQuestionAnswering.from_pretrained(hf_dir).eval()
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    for b in range(0, len(w.ids), 16):
        x, mask, _ = _batch(w.ids[b:b + 16], pad)
        with torch.no_grad():
            ours = model(x, mask)
            theirs = hf(input_ids=x, attention_mask=mask.long())
        for i, logits in enumerate((theirs.start_logits, theirs.end_logits)):
            assert (ours[..., i] - logits)[mask].abs().max().item() <= 1e-4


def test_question_answering_pipeline_answers_as_predict(qa_export, tmp_path):
    ft, hf_dir, dev = qa_export
    info = json.loads((ft / "finetune.json").read_text())
    # predict in fp32, as the export computes (by default it runs in bf16 where a CPU has native bf16), one
    # window at a time, as the pipeline: the very same logits
    assert main(["predict", str(ft), "--input", str(dev), "--out", str(tmp_path / "pred.jsonl"),
                 "--batch-size", "1", "--dtype", "fp32"]) == 0
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "pred.jsonl").read_text().splitlines())}
    answer = qa_pipeline(hf_dir, info)
    got, want = {}, {}
    for qid, question, context in questions(dev):
        a = answer(question, context)
        text = a["answer"].strip()  # (a byte-level BPE token carries its leading space)
        got[qid] = (text, a["start"] + len(a["answer"]) - len(a["answer"].lstrip()))
        want[qid] = (rows[qid]["answer"], rows[qid]["start"])
        assert context[got[qid][1]:got[qid][1] + len(text)] == text
    assert got == want


def test_export_card_config_and_tokenizer(qa_export, tmp_path):
    ft, hf_dir, _ = qa_export
    info = json.loads((ft / "finetune.json").read_text())
    conf = json.loads((hf_dir / "config.json").read_text())
    assert conf["architectures"][0].endswith("ForQuestionAnswering") and conf["num_labels"] == 2
    card = (hf_dir / "README.md").read_text()
    assert "pipeline_tag: question-answering" in card
    assert "fine-tuned for extractive question answering" in card
    assert f"max_seq_len={info['max_length']}, doc_stride={info['qa']['doc_stride']}" in card
    assert not (hf_dir / "generation_config.json").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = hf_tok("who?", "it.")["input_ids"]
    eot = hf_tok.convert_tokens_to_ids(hf_tok.eos_token)
    assert ids[-1] == eot and ids.count(eot) == 2 and (ids[0] == hf_tok.cls_token_id) == info["encoder"]
    # an earlier export is replaced in place; the fine-tune is never an output
    assert main(["export", str(ft), "--out", str(hf_dir)]) == 0
    assert main(["export", str(ft), "--out", str(ft)]) == 2


def _broken(ft: Path, dest: Path, change) -> Path:
    shutil.copytree(ft, dest)
    info = json.loads((dest / "finetune.json").read_text())
    text = change(info, dest)
    if text is not None:
        (dest / "finetune.json").write_text(text)
    return dest


@pytest.mark.parametrize("case,expect", [
    ("classification", "does not match finetune.json"),  # (a QA head's weights for a classifier's task)
    ("images", "is a fine-tune for image classification"),
    ("not_json", "is corrupt"),
    ("no_qa", "is corrupt or incomplete"),
    ("no_backbone", "is incomplete: no backbone"),
    ("head_features", "cannot compute what this fine-tune does"),
    ("weights", "is corrupt or does not match"),
    ("no_weights", "is not a fine-tuned model"),
])
def test_unsupported_or_damaged_fine_tune_is_one_clear_error(qa_export, tmp_path, capsys, case, expect):
    ft, _, _ = qa_export
    encoder = json.loads((ft / "finetune.json").read_text())["encoder"]
    if case == "head_features" and not encoder:
        pytest.skip("the decoders' question-answering classes have no head transform to disagree on")

    def change(info: dict, d: Path) -> str | None:
        if case == "classification":
            info["task"] = "classification"
        elif case == "images":
            info.update(task="classification", modality="images")
        elif case == "not_json":
            return "{ not json"
        elif case == "no_qa":
            del info["qa"]
        elif case == "no_backbone":
            del info["backbone"]
        elif case == "head_features":
            info["head_features"] = False
        elif case == "weights":
            (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
            return None
        elif case == "no_weights":
            (d / "model.safetensors").unlink()
            return None
        return json.dumps(info)

    bad = _broken(ft, tmp_path / "ft", change)
    capsys.readouterr()
    assert main(["export", str(bad), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
