"""CLI commands for transfer: `pretrain finetune | predict | probe | transfer`.

The fine-tuning flags are generated from FinetuneConfig's fields (``--layer-decay`` sets ``layer_decay``),
with each field's docstring as help, so the CLI and the Python API cannot drift apart.

Text runs read tables (CSV/TSV/JSONL/Parquet) or CoNLL files; image runs read prepared image directories,
``DIR`` (the split of the option's role: --train 'train', --valid 'val', --test 'test'; --input the 'test'
split, else 'val') or ``DIR@SPLIT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

FT_SKIP = ("text_column", "label_column", "text_pair_column")  # added by hand (shared with probe)
CARVES_HELP = ("score each candidate recipe on this many carved splits, averaged: K carves cut the selection "
               "noise by sqrt(K) at K times the search's cost (default 0: 3 for up to 2,000 training labels "
               "— transfer's --search-max — else 1)")


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    print(json.dumps(result) if args.json else human)


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from pretrain.config import FinetuneConfig, field_docs

    docs = field_docs(FinetuneConfig)
    for f in dataclasses.fields(FinetuneConfig):
        if f.name in FT_SKIP or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = docs.get(f.name, "").replace("%", "%%")
        # unset flags stay out of the namespace, so a --config file's values hold unless a flag is given
        if isinstance(f.default, bool):
            state = "on" if f.default else "off"
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=f"{help_} (default {state})")
        elif f.default is dataclasses.MISSING:  # a list (report_to): comma-separated, split by from_dict
            p.add_argument(flag, dest=f.name, metavar="A,B", default=argparse.SUPPRESS,
                           help=f"{help_} (default none)")
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=argparse.SUPPRESS,
                           help=f"{help_} (default {f.default})")
    p.add_argument("--config", metavar="FILE.yaml", default=None,
                   help="fine-tuning options from a YAML file that states only what differs from the "
                        "defaults (the keys are the options' names: lr, layer_decay, ...; OUT/finetune.yaml "
                        "of an earlier run works); flags given on the command line override it")


def _add_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-column", default=argparse.SUPPRESS,
                   help="column/field with the text (default text)")
    p.add_argument("--text-pair-column", default=argparse.SUPPRESS,
                   help="second text column for sentence-pair tasks")
    p.add_argument("--label-column", default=argparse.SUPPRESS,
                   help="column/field with the label (default label)")


def _config(args: argparse.Namespace, **extra: Any):
    """The options: the defaults, then a --config YAML file (unknown keys are errors, with a suggestion), then
    the flags given on the command line."""
    from pretrain.config import FinetuneConfig, from_dict, load_yaml

    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return from_dict(FinetuneConfig, {**values, **extra})


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.finetune.loop import finetune
    from pretrain.finetune.recipe import finetune_search

    cfg = _config(args)
    if args.search:
        res = finetune_search(args.run, args.train, args.valid, args.out, cfg,
                              quiet=args.quiet or args.json, overwrite=args.overwrite, test_path=args.test,
                              carves=args.search_carves)
    else:
        res = finetune(args.run, args.train, args.valid, args.out, cfg,
                       quiet=args.quiet or args.json, overwrite=args.overwrite, test_path=args.test)
    best = res["best"]
    res.pop("history")
    shown = " ".join(f"{k[4:]} {v:.4f}" for k, v in best.items()
                     if k.startswith("val_") and k != "val_metric")
    test = res.get("test")
    tested = ("; test: " + " ".join(f"{k[5:]} {v:.4f}" for k, v in test.items() if k != "test_metric")
              if test else "")
    subset = (f" on {res['train_examples']:,} training rows (--max-train)"
              if cfg.max_train and res.get("train_examples") else "")
    _emit(args, res, f"fine-tuned {args.out}{subset}: best at epoch {best['epoch']:g} (step {best['step']}): "
                     f"{shown}{tested}; stopped by {res['stop_reason']} after {res['steps']} steps in "
                     f"{res['elapsed_s']:.0f}s" + _forgetting_line(res.get("forgetting")))
    return res


def _forgetting_line(f: dict[str, Any] | None) -> str:
    """'\npre-training val loss A -> B (+d, +r%) ...' when forgetting was measured (or replay used)."""
    if not f:
        return ""
    replay = f.get("replay")
    mixed = (f"; replay: {replay['steps']:,} pre-training steps ({replay['frac']:.0%}) from {replay['data']}"
             if replay else "")
    if "not_measured" in f:
        return f"\nforgetting not measured: {f['not_measured']}{mixed}" if replay else ""
    return (f"\nforgetting: pre-training val loss {f['before']:.4f} -> {f['after']:.4f} ({f['change']:+.4f}, "
            f"{f['relative']:+.1%}) on {f['tokens']:,} tokens of {f['data']}{mixed}")


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.finetune.predict import predict

    res = predict(args.model, args.input, args.out, batch_size=args.batch_size, device=args.device,
                  overwrite=args.overwrite, dtype=args.dtype, id_column=args.id_column,
                  text_column=args.text_column, text_pair_column=args.text_pair_column,
                  label_column=args.label_column)
    m = res.get("metrics")
    scored = ("\non the input's labels: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "metric")
              if m else "")
    _emit(args, res, f"wrote {res['rows']:,} predictions"
                     + (f" of {res['input']}" if res.get("input") else "") + f" to {res['out']}"
                     + (f" ({res['truncated']} inputs truncated to {res['max_length']} tokens)"
                        if res["truncated"] else "") + scored)
    return res


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.finetune.transfer import linear_probe

    res = linear_probe(args.run, args.train, args.valid, args.text_column, args.label_column, args.pooling,
                       args.max_train, args.seed, args.batch_size, args.device, args.random_init)
    extra = "".join(f", {k.replace('_', ' ')} {100 * res[k]:.2f}%" if k != "roc_auc" else f", ROC-AUC "
                    f"{res[k]:.4f}" for k in ("balanced_accuracy", "roc_auc") if k in res)
    _emit(args, res, f"linear probe ({res['pooling']} pooling, {res['dim']} features, "
                     f"{res['train_examples']:,} train examples): validation accuracy "
                     f"{100 * res['accuracy']:.2f}%{extra}")
    return res


def cmd_transfer(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.finetune.transfer import transfer

    res = transfer(args.run, args.train, args.valid, args.out, _config(args), budgets=args.budgets,
                   seeds=args.seeds, recipe=args.recipe, scratch_lr=args.scratch_lr, min_steps=args.min_steps,
                   max_epochs=args.max_epochs, all_seeds=args.all_seeds, search_max=args.search_max,
                   search_carves=args.search_carves,
                   tfidf=args.tfidf, quiet=args.quiet or args.json, overwrite=args.overwrite)
    rows = "; ".join(f"n={r['n']:,}: "
                     + " / ".join(f"{k} {100 * v['mean']:.1f}" for k, v in r["arms"].items())
                     for r in res["summary"])
    _emit(args, res, f"{res['verdict']}\ntransfer report in {args.out} (report.md, report.json, report.png): "
                     f"{rows}")
    return res


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the transfer commands on the main parser; each sets ``func`` to its handler."""
    s = sub.add_parser("finetune", help="fine-tune a pre-trained run on labelled data (classification, "
                                        "regression, token labels, extractive question answering; full, "
                                        "head-only or LoRA)")
    s.add_argument("run", help="pre-trained run directory or checkpoint")
    s.add_argument("--train", required=True,
                   help="labelled training file (CSV/TSV/JSONL/Parquet; CoNLL for --task token; SQuAD JSON "
                        "or a table with question, context, answer_text, answer_start for --task qa); for an "
                        "image run a prepared image directory, DIR (its train split) or DIR@SPLIT")
    s.add_argument("--valid", required=True,
                   help="labelled validation file (model selection, early stopping; with --search: scored "
                        "once at the end, choosing nothing); for an image run DIR (its val split) or "
                        "DIR@SPLIT")
    s.add_argument("--test", default=None,
                   help="labelled test data (a file, or DIR (its test split) / DIR@SPLIT for an image run): "
                        "the best model is scored on it once at the end (finetune.json's 'test'); it chooses "
                        "nothing")
    s.add_argument("--out", required=True, help="output directory (best model, metrics.jsonl)")
    s.add_argument("--search", action="store_true",
                   help="choose lr, pooling and epochs on a split carved from --train (5 short fine-tunes "
                        "per carve, into OUT/search), then fine-tune on all of --train with them")
    s.add_argument("--search-carves", type=int, default=0, help=CARVES_HELP)
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not an earlier fine-tune")
    _add_columns(s)
    _add_config_flags(s)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("predict", help="predictions of a fine-tuned model for every row of a file")
    s.add_argument("model", help="directory written by `pretrain finetune`")
    s.add_argument("--input", required=True,
                   help="file with the same text column(s) as training; labels not needed; for an image "
                        "model a prepared image directory, DIR (its test split, else val) or DIR@SPLIT")
    s.add_argument("--out", required=True, help=".jsonl, .csv, .tsv or .parquet (CoNLL text for token tasks; "
                                                 "for a QA model also .json: SQuAD's {id: answer} file)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that an earlier `pretrain predict` did not write (or that "
                        "changed since)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype: auto (bf16 on CUDA and on CPUs with native bf16, else fp32), "
                        "bf16 or fp32 (the exact figures of an fp32 export)")
    s.add_argument("--text-column", default=None,
                   help="column/field with the text (default: the fine-tune's)")
    s.add_argument("--text-pair-column", default=None,
                   help="second text column of a sentence-pair model (default: the fine-tune's)")
    s.add_argument("--label-column", default=None,
                   help="column with the true labels, when the input has them: copied into the output and "
                        "scored with the fine-tune's validation metrics (default: the fine-tune's)")
    s.add_argument("--id-column", default=None,
                   help="column copied into each output row to identify it (default: id, when there is one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("probe", help="linear probe: frozen embeddings + logistic regression (scikit-learn)")
    s.add_argument("run", help="pre-trained run directory or checkpoint")
    s.add_argument("--train", required=True, help="labelled file; image run: DIR (train split) or DIR@SPLIT")
    s.add_argument("--valid", required=True, help="labelled file; image run: DIR (val split) or DIR@SPLIT")
    s.add_argument("--text-column", default="text")
    s.add_argument("--label-column", default="label")
    s.add_argument("--pooling", default="auto", choices=["auto", "mean", "cls", "last"])
    s.add_argument("--max-train", type=int, default=0, help="use a random subset of this many training rows")
    s.add_argument("--random-init", action="store_true",
                   help="probe the same architecture freshly initialised (the control: what pre-training "
                        "added)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_probe)

    s = sub.add_parser("transfer", help="pre-trained vs from-scratch fine-tuning over label budgets: "
                                        "report.md / .json / .png")
    s.add_argument("run", nargs="+",
                   help="pre-trained run directory or checkpoint; several (e.g. an MLM and an RTD backbone "
                        "of one architecture and tokenizer) are compared side by side against one "
                        "from-scratch arm")
    s.add_argument("--train", required=True,
                   help="labelled training data (an image run: DIR, its train split, or DIR@SPLIT)")
    s.add_argument("--valid", required=True, help="evaluation data: scored, never used to choose anything "
                                                  "(with the default --recipe auto); an image run: DIR (its "
                                                  "val split) or DIR@SPLIT, e.g. DIR@test")
    s.add_argument("--out", required=True, help="report directory")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not an earlier transfer's")
    s.add_argument("--budgets", default="100,1000,10000,all", help="label budgets, e.g. 100,1k,10k,all")
    s.add_argument("--seeds", type=int, default=3, help="seeds per budget (default 3)")
    s.add_argument("--all-seeds", type=int, default=1, help="seeds for the full training set (default 1)")
    s.add_argument("--recipe", choices=["auto", "fixed"], default="auto",
                   help="auto (default): lr, pooling and epochs chosen per arm and budget on a split carved "
                        "from the training labels; fixed: --lr / --scratch-lr for every budget, the best "
                        "evaluation "
                        "on --valid reported")
    s.add_argument("--scratch-lr", type=float, default=1e-3,
                   help="learning rate of the from-scratch runs (--recipe fixed)")
    s.add_argument("--min-steps", type=int, default=300,
                   help="small budgets get epochs for at least this many steps (the search's epoch cap)")
    s.add_argument("--max-epochs", type=int, default=20, help="cap on those epochs")
    s.add_argument("--search-max", type=int, default=2000,
                   help="larger budgets choose their recipe on a random subset of this many examples")
    s.add_argument("--search-carves", type=int, default=0, help=CARVES_HELP)
    s.add_argument("--tfidf", "--shallow", dest="tfidf", action=argparse.BooleanOptionalAction, default=True,
                   help="a shallow baseline arm on the same labels (classification): TF-IDF + logistic "
                        "regression for text, logistic regression on the raw pixels for images")
    _add_columns(s)
    _add_config_flags(s, skip=("from_scratch", "seed", "max_train"))  # (--budgets choose the rows)
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_transfer)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `pretrain finetune|predict|probe|transfer`")
