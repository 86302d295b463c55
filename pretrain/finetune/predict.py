"""A fine-tuned model on disk (model.safetensors + finetune.json + tokenizer.json; no tokenizer for an image
model): saved atomically, loaded, and run over a file of inputs or a split of a prepared image directory
(``pretrain predict``), or scored on labelled data (``evaluate_finetuned``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrain import PretrainError
from pretrain.config import FinetuneConfig, from_dict
from pretrain.finetune.data import Examples, TokenExamples
from pretrain.finetune.encode import Encoded, _batch, _encode_task, length_batches, read_task
from pretrain.finetune.model import ImageTaskModel, TaskModel, merged
from pretrain.hardware import autocast_context, resolve_device
from pretrain.io import (
    atomic_path,
    check_output_file,
    record_output,
    write_json_atomic,
    write_text_atomic,
)

FT_FILE = "finetune.json"


WEIGHTS = "model.safetensors"


def save_finetuned(out: Path, model: nn.Module, info: dict[str, Any], tok) -> None:
    """The model, its tokenizer (``tok`` None: an image model, none) and finetune.json. finetune.json goes
    first and comes back last, so one always describes the weights and tokenizer beside it (after a crash in
    between, the folder is no model at all)."""
    from safetensors.torch import save_model

    (out / FT_FILE).unlink(missing_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_model(merged(model), str(tmp))  # tied embeddings are stored once (atomic_path: the umask's mode)
    if tok is None:
        (out / "tokenizer.json").unlink(missing_ok=True)  # (an earlier text fine-tune's)
    else:
        with atomic_path(out / "tokenizer.json") as tmp:
            tok.save(tmp)
    write_json_atomic(out / FT_FILE, info)


def load_finetuned(path: str | Path, device: str | torch.device = "cpu"):
    """A fine-tuning output directory → (TaskModel in eval mode, its finetune.json dict, Tokenizer); an image
    model: (ImageTaskModel, finetune.json, None)."""
    from safetensors.torch import load_model

    from pretrain.config import Config
    from pretrain.data.tokenizer import Tokenizer
    from pretrain.models import build_model

    path = Path(path)
    if not (path / FT_FILE).is_file() or not (path / WEIGHTS).is_file():
        raise PretrainError(f"{path} is not a fine-tuned model (expected {FT_FILE} and {WEIGHTS}; "
                            "make one with `pretrain finetune`)")
    try:
        info = json.loads((path / FT_FILE).read_text(encoding="utf-8"))
        images = info.get("modality") == "images"
        missing = [k for k in ("backbone", "task", "labels", "pooling", "encoder", "config",
                               "image" if images else "max_length") if k not in info]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise PretrainError(f"{path / FT_FILE} is corrupt ({e})") from None
    if missing:
        raise PretrainError(f"{path / FT_FILE} is incomplete: no {', '.join(missing)}")
    pcfg = from_dict(Config, info["backbone"])
    backbone = build_model(pcfg.model)
    n_out = 1 if info["task"] == "regression" else 2 if info["task"] == "qa" else len(info["labels"])
    prompt = info.get("prompt") or {}
    if images:
        model: nn.Module = ImageTaskModel(backbone, n_out, info["pooling"], 0.0)
    else:
        model = TaskModel(backbone, pcfg.model.d_model, n_out, info["pooling"], info["encoder"], 0.0,
                          token_level=info["task"] in ("token", "qa"), label_ids=prompt.get("label_ids"),
                          mask_id=prompt.get("mask_id"), head_features=bool(info.get("head_features")),
                          bias=info.get("head_bias", True) is not False)
    try:
        load_model(model, str(path / WEIGHTS))
    except Exception as e:
        raise PretrainError(f"{path / WEIGHTS} is corrupt or does not match {FT_FILE}: "
                            f"{str(e).splitlines()[0][:200]}") from None
    if images:
        return model.to(device).eval(), info, None
    tok = Tokenizer.load(path / "tokenizer.json")
    recorded = info.get("tokenizer_sha256")  # (absent: fine-tuned before it was recorded)
    if recorded is not None and tok.sha256() != recorded:
        raise PretrainError(f"{path / 'tokenizer.json'} is not the tokenizer this model was fine-tuned with "
                            f"(its sha256 is {tok.sha256()}, {FT_FILE} records {recorded}): put that one "
                            "back (the pre-trained run's tokenizer.json is the same file)")
    if tok.vocab_size > pcfg.model.vocab_size:
        raise PretrainError(f"{path / 'tokenizer.json'} has {tok.vocab_size:,} tokens but the model "
                            f"{pcfg.model.vocab_size:,}: "
                            "the tokenizer is not the one this model was fine-tuned with")
    return model.to(device).eval(), info, tok


def predict(ft_dir: str | Path, input_path: str | Path, out: str | Path, batch_size: int = 64,
            device: str = "auto", overwrite: bool = False, dtype: str = "auto", id_column: str | None = None,
            text_column: str | None = None, text_pair_column: str | None = None,
            label_column: str | None = None) -> dict[str, Any]:
    """Predict every row of ``input_path`` (same columns as training, or the ones ``text_column`` /
    ``text_pair_column`` name; labels not needed) into ``out`` (.jsonl, .csv, .tsv or .parquet; CoNLL
    .txt/.conll for token tasks). Each output row carries the input's text column(s) and its id column
    (``id_column``; by default ``id`` when the input has one) beside the prediction. When the input has
    labels (the fine-tune's label column, or ``label_column``; CoNLL tags; SQuAD answers; an image split's
    labels) they are copied too and the result's ``metrics`` are the fine-tune's validation metrics on them.
    An existing ``out`` is replaced only if an earlier ``predict`` wrote it (and it is unchanged since) or
    with ``overwrite``; never when it is the input."""
    if batch_size < 1:
        raise PretrainError("--batch-size must be >= 1")
    from pretrain.features import image_data, is_image_data

    images = is_image_data(input_path)
    check_output_file(out, "predict", [image_data(input_path)[0] if images else input_path, ft_dir],
                      overwrite)
    dev = resolve_device(device)
    model, info, tok = load_finetuned(ft_dir, dev)
    if tok is None or images:
        given = [f for f, v in (("--id-column", id_column), ("--text-column", text_column),
                                ("--text-pair-column", text_pair_column), ("--label-column", label_column))
                 if v is not None]
        if given:
            raise PretrainError(f"{', '.join(given)}: for text models (an image split has no columns)")
        return _predict_images(model, info, ft_dir, input_path, Path(out), batch_size, dev, dtype)
    cfg = _with_columns(from_dict(FinetuneConfig, info["config"]), ft_dir, text_column, text_pair_column,
                        label_column, id_column)
    if cfg.task == "qa":
        return _predict_qa(model, info, tok, cfg, input_path, Path(out), batch_size, dev, dtype)
    if cfg.task == "token" and Path(out).suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        raise PretrainError(f"token predictions are written as CoNLL text (one 'word tag' per line): --out "
                            f"{Path(out).name} should end in .conll or .txt")
    ex, ids = _read_input(cfg, input_path, id_column)
    enc = _encode_task(cfg, tok, info["encoder"], info["max_length"], ex, info["labels"],
                       info.get("token_label", "first_piece"))  # (absent: fine-tuned before it was recorded)
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    preds, scores = run_model(model, enc, cfg.task, info["labels"], pad, batch_size, dev, dtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.task == "token":
        assert isinstance(ex, TokenExamples)
        lines = []
        for words, tags in zip(ex.words, preds):
            lines += [f"{w} {t}" for w, t in zip(words, tags)] + [""]
        write_text_atomic(out, "\n".join(lines))
        gold = ex.tags
    else:
        assert isinstance(ex, Examples)
        rows = []
        for i, (p, s) in enumerate(zip(preds, scores)):
            row: dict[str, Any] = {"row": i}
            if ids is not None:
                row[_input_key(ids[1])] = ids[0][i]
            row[_input_key(cfg.text_column)] = ex.texts[i]
            if ex.pairs is not None:
                row[_input_key(str(cfg.text_pair_column))] = ex.pairs[i]
            if ex.labels is not None:
                row[_input_key(cfg.label_column)] = ex.labels[i]
            row["prediction"] = p
            if cfg.task == "classification":
                row.update({f"p_{name}": round(float(v), 6) for name, v in zip(info["labels"], s)})
            rows.append(row)
        _write_rows(out, rows)
        gold = ex.labels
    record_output(out, "predict")
    res: dict[str, Any] = {"out": str(out), "rows": len(preds), "task": cfg.task, "input": str(input_path),
                           "truncated": enc.truncated, "max_length": info["max_length"]}
    if gold is not None:
        extended = cfg.task == "classification" and not info.get("prompt") and cfg.metric in (
            "balanced_accuracy", "roc_auc")
        res["metrics"] = _metrics(cfg, preds, gold, np.stack(scores) if extended else None, info["labels"],
                                  str(input_path))
    return res


def _with_columns(cfg: FinetuneConfig, ft_dir: str | Path, text_column: str | None,
                  text_pair_column: str | None, label_column: str | None,
                  id_column: str | None) -> FinetuneConfig:
    """The fine-tune's config with the columns ``predict`` was told to read instead."""
    import dataclasses

    if text_pair_column is not None and cfg.text_pair_column is None:
        raise PretrainError(f"{ft_dir} was fine-tuned on single texts: --text-pair-column does not apply")
    if (text_column or text_pair_column or label_column) and cfg.task in ("token", "qa"):
        raise PretrainError(f"--text-column, --text-pair-column and --label-column are for tables of texts; "
                            f"this is a {cfg.task} model (CoNLL files name no columns; qa: "
                            "--question-column ... at fine-tuning)")
    changes = {k: v for k, v in (("text_column", text_column), ("text_pair_column", text_pair_column),
                                 ("label_column", label_column)) if v is not None}
    if id_column is not None and cfg.task == "qa":
        changes["id_column"] = id_column
    return dataclasses.replace(cfg, **changes)


def _input_key(name: str) -> str:
    """An input column's name in the output rows (``input_NAME`` when it is one of predict's own)."""
    return f"input_{name}" if name in ("row", "prediction") or name.startswith("p_") else name


def _read_input(cfg: FinetuneConfig, path: str | Path, id_column: str | None):
    """(examples, (ids, id column) or None) of ``predict``'s input: with labels when it has them (the label
    column of a table; tags in every line of a CoNLL file), else without."""
    from pretrain.data.sources import column_error
    from pretrain.finetune.data import TaskDataError, _missing, _rows

    if cfg.task == "token":
        try:
            return read_task(cfg, path, with_labels=True), None
        except TaskDataError:  # words only (one column): no tags to score
            return read_task(cfg, path, with_labels=False), None
    rows, columns = _rows(Path(path))
    if id_column is not None and id_column not in columns:
        raise TaskDataError(str(column_error(Path(path), id_column, columns, "--id-column")))
    name = id_column or ("id" if "id" in columns else None)
    ids = ([r.get(name) for r in rows], name) if name else None
    labelled = cfg.label_column in columns and rows and all(_missing(r.get(cfg.label_column)) is None
                                                            for r in rows)
    if cfg.label_column in columns and not labelled:
        print(f"warning: {path}: some rows have no label in column {cfg.label_column!r}: no metrics",
              file=sys.stderr)
    return read_task(cfg, path, with_labels=bool(labelled)), ids


def _metrics(cfg: FinetuneConfig, preds: list[Any], gold: list[Any], probs: Any, names: list[Any],
             where: str) -> dict[str, float]:
    """The fine-tune's validation metrics of ``preds`` against the input's labels (labels the model never
    saw count as errors, with a warning)."""
    from pretrain.finetune.metrics import compute_metrics

    if cfg.task != "regression":
        flat = [t for s in gold for t in s] if cfg.task == "token" else gold
        unseen = sorted({str(v) for v in flat} - {str(n) for n in names})
        if unseen:
            print(f"warning: {where} has labels this model was not fine-tuned on: {', '.join(unseen[:10])}"
                  f"{' …' if len(unseen) > 10 else ''} (they count as errors)", file=sys.stderr)
    return compute_metrics(cfg.task, preds, gold, probs, names, cfg.metric)


def _qa_answers(model: nn.Module, info: dict[str, Any], tok, cfg: FinetuneConfig, ex, batch_size: int,
                dev: torch.device, dtype: str = "auto"):
    """Every question's answer (finetune.qa.Answer) from a QA model, windowed and decoded as in training
    (``cfg``: its finetune.json config: doc_stride, max_answer_length, n_best, null_threshold)."""
    from pretrain.finetune.qa import decode, encode_qa, null_in_softmax, window_logits

    null = info["qa"]["null"]
    w = encode_qa(tok, ex, info["encoder"], info["max_length"], cfg, null, train=False)
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    logits = window_logits(model, w, pad, batch_size, dev, dtype)
    return decode(ex, w, logits, null_in_softmax(info["encoder"], null), null, cfg), w


def _predict_qa(model: nn.Module, info: dict[str, Any], tok, cfg: FinetuneConfig, input_path: str | Path,
                out: Path, batch_size: int, dev: torch.device, dtype: str = "auto") -> dict[str, Any]:
    """``predict`` for question answering: per question its id, the answer text, its character offsets in
    the context (-1 when the model answers nothing) and its score, after the question; an ``out`` ending in
    .json is SQuAD's prediction file instead ({id: answer text}, what the official evaluation script reads).
    An input with answers (SQuAD's, or a table's answer columns) is also scored: ``metrics``."""
    from pretrain.finetune.data import TaskDataError
    from pretrain.finetune.qa import read_qa

    try:
        ex = read_qa(input_path, cfg, with_answers=True)
    except TaskDataError:  # no answers (or none usable): predictions only
        ex = read_qa(input_path, cfg, with_answers=False)
    answers, w = _qa_answers(model, info, tok, cfg, ex, batch_size, dev, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        write_text_atomic(out, json.dumps({i: a.text for i, a in zip(ex.ids, answers)}, ensure_ascii=False,
                                          indent=1))
    else:
        _write_rows(out, [{"id": i, "question": q, "answer": a.text, "start": a.start, "end": a.end,
                           "score": round(a.score, 6)} for i, q, a in zip(ex.ids, ex.questions, answers)])
    record_output(out, "predict")
    res: dict[str, Any] = {"out": str(out), "rows": len(answers), "task": "qa", "input": str(input_path),
                           "truncated": 0, "windows": len(w.ids), "skipped": ex.skipped + w.skipped,
                           "max_length": info["max_length"]}
    if ex.answers is not None:
        from pretrain.finetune.metrics import compute_metrics

        res["metrics"] = compute_metrics("qa", [a.text for a in answers],
                                         [[t for t, _ in a] for a in ex.answers])
    return res


def _image_model_input(model_dir: str | Path, info: dict[str, Any], input_path: str | Path, role: str,
                       labelled: bool):
    """The split ``input_path`` names for the image model in ``model_dir`` (its size checked), or an error
    when one of the two is text."""
    from pretrain.config import Config
    from pretrain.features import check_image_size, is_image_data
    from pretrain.finetune.images import read_images

    if info.get("modality") != "images":
        raise PretrainError(f"{input_path} is a prepared image directory, but {model_dir} is a text model: "
                            "give it a file of text")
    if not is_image_data(input_path):
        raise PretrainError(f"{model_dir} is an image model: --input must be a prepared image directory, DIR "
                            f"or DIR@SPLIT (`pretrain prepare IMAGES --out DIR`), not {input_path}")
    ex = read_images(input_path, role, with_labels=labelled)
    mcfg = from_dict(Config, info["backbone"]).model
    check_image_size(ex.source, ex.split, mcfg, model_dir)
    return ex, mcfg


def _predict_images(model: nn.Module, info: dict[str, Any], ft_dir: str | Path, input_path: str | Path,
                    out: Path, batch_size: int, dev: torch.device, dtype: str = "auto") -> dict[str, Any]:
    """``predict`` for an image model: one row per image of the split, its class probabilities (``p_NAME``)
    and, when the split has labels, the true ``label`` (and the result's ``metrics``, as validation's)."""
    from pretrain.finetune.images import run_images

    ex, mcfg = _image_model_input(ft_dir, info, input_path, "input", labelled=False)
    names = info["labels"]
    preds, probs = run_images(model, ex, mcfg, names, batch_size, dev, dtype)
    rows = []
    for i, (p, s) in enumerate(zip(preds, probs)):
        row: dict[str, Any] = {"row": i, "prediction": p}
        if ex.labels is not None:
            row["label"] = ex.labels[i]
        row.update({f"p_{name}": round(float(v), 6) for name, v in zip(names, s)})
        rows.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_rows(out, rows)
    record_output(out, "predict")
    res: dict[str, Any] = {"out": str(out), "rows": len(rows), "task": info["task"], "input": ex.source,
                           "truncated": 0, "max_length": None}
    if ex.labels is not None:
        res["metrics"] = _metrics(from_dict(FinetuneConfig, info["config"]), preds, ex.labels,
                                  np.asarray(probs), names, ex.source)
    return res


def evaluate_finetuned(ft_dir: str | Path, data_path: str | Path, batch_size: int = 64, device: str = "auto",
                       dtype: str = "auto") -> dict[str, float]:
    """The fine-tuned model in ``ft_dir`` scored on labelled data (a file like its training data; for an
    image model a prepared image directory, ``DIR`` meaning its 'test' split): the validation metrics, named
    ``test_*``, ``test_metric`` the one its config selects."""
    from pretrain.features import is_image_data
    from pretrain.finetune.data import check_known
    from pretrain.finetune.encode import _labels_of
    from pretrain.finetune.metrics import compute_metrics

    dev = resolve_device(device)
    model, info, tok = load_finetuned(ft_dir, dev)
    cfg = from_dict(FinetuneConfig, info["config"])
    names = info["labels"]
    if tok is None or is_image_data(data_path):
        from pretrain.finetune.images import run_images

        ex, mcfg = _image_model_input(ft_dir, info, data_path, "test", labelled=True)
        check_known(ex.labels, names, ex.source)
        preds, probs = run_images(model, ex, mcfg, names, batch_size, dev, dtype)
        m = compute_metrics("classification", preds, ex.labels, probs, names, cfg.metric)
    elif cfg.task == "qa":
        ex = read_task(cfg, data_path)
        answers, _ = _qa_answers(model, info, tok, cfg, ex, batch_size, dev, dtype)
        m = compute_metrics("qa", [a.text for a in answers], _labels_of(cfg, ex))
    else:
        ex = read_task(cfg, data_path)
        gold = _labels_of(cfg, ex)
        if cfg.task != "regression":
            check_known(gold, names, str(data_path))
        enc = _encode_task(cfg, tok, info["encoder"], info["max_length"], ex, names,
                           info.get("token_label", "first_piece"))
        pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
        preds, scores = run_model(model, enc, cfg.task, names, pad, batch_size, dev, dtype)
        extended = cfg.task == "classification" and not info.get("prompt") and cfg.metric in (
            "balanced_accuracy", "roc_auc")
        m = compute_metrics(cfg.task, preds, gold if cfg.task != "token" else ex.tags,
                            np.stack(scores) if extended else None, names, cfg.metric)
    return {f"test_{k}": v for k, v in m.items()}


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """One row per prediction, written atomically (a failed write keeps the previous file)."""
    import csv

    if out.suffix not in (".jsonl", ".csv", ".tsv", ".parquet"):
        raise PretrainError(f"--out must end in .jsonl, .csv, .tsv or .parquet, got {out.name}")
    with atomic_path(out) as tmp:
        if out.suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows), encoding="utf-8")
        elif out.suffix in (".csv", ".tsv"):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]),
                                   delimiter="\t" if out.suffix == ".tsv" else ",")
                w.writeheader()
                w.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), tmp)


@torch.no_grad()
def run_model(model: TaskModel, enc: Encoded, task: str, names: list[Any], pad: int, batch_size: int,
              device: torch.device, dtype: str = "auto") -> tuple[list[Any], np.ndarray | list]:
    """Predictions (label names / floats / per-word tags) and scores (class probabilities / floats)."""
    model.eval()
    n = len(enc.ids)
    preds: list[Any] = [None] * n
    scores: list[Any] = [None] * n
    for idx in length_batches([len(r) for r in enc.ids], batch_size, None):
        x, mask, _ = _batch([enc.ids[i] for i in idx], pad)
        with autocast_context(device, dtype):
            out = model(x.to(device), mask.to(device)).float().cpu()
        for r, i in enumerate(idx):
            if task == "regression":
                preds[i] = scores[i] = float(out[r, 0])
            elif task == "token":
                tag_idx = out[r].argmax(-1).tolist()
                default = names.index("O") if "O" in names else 0
                preds[i] = [names[tag_idx[t]] if t >= 0 else names[default] for t in enc.first[i]]
                scores[i] = None
            else:
                p = torch.softmax(out[r], -1)
                preds[i] = names[int(p.argmax())]
                scores[i] = p.numpy()
    return preds, scores
