"""`pretrain <command>`: the command-line interface. Each command is a thin shell over a Python function.

Errors the user can fix (bad input, bad config, corrupt checkpoints) print one line, ``error: ...``, and
exit with status 2. ``--json`` prints exactly one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from pretrain import Interrupted, PretrainError, __version__


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate config overrides (``--train.lr 3e-4``, ``--train.lr=3e-4``, top-level ``--objective mlm``)
    from other arguments."""
    import dataclasses

    from pretrain.config import Config

    top_level = {f.name for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(f.type)
                 and f.name not in ("data", "model", "train", "mlm", "rtd", "image")}
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in key or key in top_level:
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(human)


def cmd_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.data.images import is_image_input, prepare_images

    images = [is_image_input(i) for i in args.inputs]
    kind = "interactions" if args.interactions else "images" if all(images) else "text"
    if kind != "interactions" and any(images) and not all(images):
        raise PretrainError(f"{args.inputs[images.index(True)]} is image data but "
                            f"{args.inputs[images.index(False)]} is not: prepare images and text into "
                            "separate --out directories")
    # options of another kind of input, given explicitly: an error rather than silently ignored
    for other, options in args.kind_options.items():
        given = [opt for dest, (opt, default) in options.items() if getattr(args, dest) != default]
        if kind not in other.split(" and ") and given:
            verb = "applies" if len(given) == 1 else "apply"
            what = {"text": "text inputs", "images": "image inputs (IDX, .npz, .npy or folders of images)",
                    "interactions": "interaction logs (--interactions)", "text and images": "text and image "
                    "inputs"}
            raise PretrainError(f"{', '.join(given)} {verb} to {what[other]} only; these inputs are "
                                f"{what[kind].split(' (')[0]}")
    if kind == "interactions":
        from pretrain.data.interactions import prepare_interactions

        meta = prepare_interactions(
            args.inputs, args.out, user_column=args.user_column, item_column=args.item_column,
            time_column=args.time_column or None, rating_column=args.rating_column,
            min_rating=args.min_rating, min_item_count=args.min_item_count,
            min_user_items=args.min_user_items, items=args.items, licence=args.licence,
            overwrite=args.overwrite, log=_log)
        res = {"out": str(args.out), **{k: meta["interactions"][k] for k in ("users", "items", "interactions",
                                                                            "dropped")},
               "seconds": meta["seconds"]}
        d = res["dropped"]
        gone = [f"{d[k]:,} {what}" for k, what in (
            ("below_min_rating", "rows rated below --min-rating"),
            ("rare_item_rows", f"rows of {d['rare_items']:,} items under --min-item-count"),
            ("short_user_rows", f"rows of {d['short_users']:,} users under --min-user-items")) if d.get(k)]
        _emit(args, res, f"prepared {args.out}: {res['users']:,} users, {res['items']:,} items, "
                         f"{res['interactions']:,} interactions (leave-one-out: train / val / test)"
                         + (f"; dropped {', '.join(gone)}" if gone else ""))
        return res
    if kind == "images":
        res = prepare_images(args.inputs, args.out, image_size=args.image_size, channels=args.channels,
                             val_fraction=args.val_fraction, bad_files=args.bad_files, licence=args.licence,
                             overwrite=args.overwrite, workers=args.workers, seed=args.seed,
                             shard_images=args.shard_images, start_method="spawn")
        counts = " / ".join(f"{n:,} {sp}" for sp, n in res["images"].items())
        skipped = f"; {res['skipped']:,} unreadable skipped" if res["skipped"] else ""
        _emit(args, res, f"prepared {args.out}: {counts} images of {res['height']}x{res['width']}x"
                         f"{res['channels']}, {res['classes'] or 'no'} classes{skipped}")
        return res

    from pretrain.data.clean import CleanConfig
    from pretrain.data.prepare import prepare

    clean = CleanConfig(normalize=args.normalize, min_chars=args.min_chars, max_chars=args.max_chars,
                        max_symbol_ratio=args.max_symbol_ratio, min_alpha_ratio=args.min_alpha_ratio,
                        max_repeated_line_ratio=args.max_repeated_line_ratio, dedup_exact=args.dedup,
                        near_dup_threshold=args.near_dup, decontaminate=args.decontaminate or [],
                        decontaminate_fields=args.decontaminate_field, ngram=args.decontam_ngram,
                        pii=args.pii)
    if args.batch_mb <= 0:
        raise PretrainError("--batch-mb must be > 0")
    if args.tokenizer_sample_mb <= 0:
        raise PretrainError("--tokenizer-sample-mb must be > 0")
    meta = prepare(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, text_field=args.text_field, bad_files=args.bad_files,
                   shard_tokens=args.shard_tokens, overwrite=args.overwrite, clean=clean,
                   licence=args.licence, tokenizer_sample_chars=int(args.tokenizer_sample_mb * 1e6), log=_log,
                   workers=args.workers, batch_chars=max(1, int(args.batch_mb * 1e6)),
                   text_unit=args.text_unit, hf_split=args.hf_split, hf_revision=args.hf_revision,
                   hf_data_files=args.hf_data_files,
                   start_method="spawn")  # workers start clean, without this process's imports
    result = {"out": str(args.out), "vocab_size": meta["tokenizer"]["vocab_size"], "dtype": meta["dtype"],
              "train_tokens": meta["splits"]["train"]["tokens"],
              "val_tokens": meta["splits"]["val"]["tokens"],
              "train_documents": meta["splits"]["train"]["documents"],
              "val_documents": meta["splits"]["val"]["documents"],
              "removed": {k: v["documents"] for k, v in meta["cleaning"]["removed"].items()},
              "seconds": meta["seconds"]}
    if "mixture" in meta:
        result["mixture"] = {m["input"]: {"weight": m["weight"], "train_tokens": m["tokens"]["train"]}
                             for m in meta["mixture"]}
    _emit(args, result, f"prepared {args.out}: {result['train_tokens']:,} train / {result['val_tokens']:,} "
                        f"val tokens, vocab {result['vocab_size']:,}")
    return result


def cmd_data(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.data.inspect import inspect

    if args.data_command == "audit":
        from pretrain.data.audit import audit, render

        res = audit(args.data_dir)
        _emit(args, res, render(res))
        return res
    if args.samples < 0:
        raise PretrainError("--samples must be >= 0")
    res = inspect(args.data_dir, samples=args.samples)
    if res.get("kind") == "images":
        im = res["image"]
        lines = [f"{res['data_dir']}: images {im['height']}x{im['width']}x{im['channels']} uint8, "
                 f"{len(res['classes']) or 'no'} classes, {len(res['sources'])} sources",
                 "mean " + ", ".join(f"{v:.4f}" for v in im["mean"]) + ", std "
                 + ", ".join(f"{v:.4f}" for v in im["std"]) + " (per channel, of the train pixels / 255)"]
        for split, info in res["splits"].items():
            mean = "" if info["pixel_mean"] is None else ", pixel mean " + ", ".join(
                f"{v:.4f}" for v in info["pixel_mean"])
            lines.append(f"\n[{split}] {info['images']:,} images, {info['shards']} shard(s)"
                         + ("" if info["labels"] else ", unlabelled") + mean)
            if info["class_counts"]:
                lines.append("  per class: " + ", ".join(f"{c} {k:,}"
                                                         for c, k in info["class_counts"].items()))
        if res["skipped"]:
            lines.append(f"\n{len(res['skipped']):,} unreadable images were skipped, e.g. "
                         f"{res['skipped'][0]['path']}")
        _emit(args, res, "\n".join(lines))
        return res
    lines = [f"{res['data_dir']}: tokenizer {res['tokenizer']['kind']}, "
             f"vocab {res['tokenizer']['vocab_size']:,}, {res['dtype']} shards, "
             f"{len(res['sources'])} sources"]
    for split, info in res["splits"].items():
        lines.append(f"\n[{split}] {info['tokens']:,} tokens, {info['documents']:,} documents, "
                     f"{info['bytes']:,} bytes"
                     + (f", {info['distinct_tokens']:,} distinct tokens" if "distinct_tokens" in info
                        else ""))
        if info.get("top_tokens"):
            lines.append("  most frequent: " + ", ".join(f"{t['token']!r} {t['count']:,}"
                                                         for t in info["top_tokens"][:10]))
        for s in info.get("samples", []):
            lines.append(f"  sample: {s!r}")
    if res.get("cleaning") and res["cleaning"]["removed"]:
        lines.append("\ncleaning removed: " + ", ".join(f"{k} {v['documents']:,}"
                                                        for k, v in res["cleaning"]["removed"].items()))
    _emit(args, res, "\n".join(lines))
    return res


RESUME_MODES = ("auto", "always", "never")


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """`pretrain train [PRESET|YAML] --out RUN_DIR [--resume auto|always|never|RUN_DIR]`.

    Resuming: ``auto`` (the default) continues RUN_DIR when it has a checkpoint and starts it otherwise;
    ``always`` continues it (an error when it has no checkpoint); ``never`` starts it (an error when it
    already has checkpoints). ``--resume RUN_DIR`` is ``--out RUN_DIR --resume always``. When continuing
    (``always`` / RUN_DIR) without a preset or YAML, the run's saved config.yaml is the base the overrides
    apply to; otherwise the config is the command's (defaults ← preset/YAML ← overrides), checked against the
    run's.
    """
    from pretrain.config import config_path, load_config

    if args.init_from:
        overrides = [*overrides, "--train.init_from", args.init_from]
    if args.skip_samples:
        overrides = [*overrides, "--train.skip_samples", args.skip_samples]
    config = config_path(args.config) if args.config is not None else None
    mode = args.resume if args.resume in RESUME_MODES else "run" if args.resume else "auto"
    if mode == "run":
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise PretrainError(f"--resume: {run} is not a run directory (no config.yaml)")
        if args.out and Path(args.out).resolve() != run.resolve():
            raise PretrainError("--resume RUN_DIR continues in RUN_DIR; do not also give a different --out")
        out: Path | None = run
    elif args.out:
        out = Path(args.out)
    elif args.resume:
        raise PretrainError(f"--resume {args.resume} needs --out RUN_DIR (to continue a run directory named "
                            f"{args.resume!r}, write --resume ./{args.resume})")
    elif args.print_config:
        out = None
    else:
        raise PretrainError("--out RUN_DIR is required (or --resume RUN_DIR)")
    saved = out / "config.yaml" if out is not None else None
    from_saved = config is None and mode in ("run", "always") and saved is not None and saved.is_file()
    cfg = load_config(saved if from_saved else config, overrides)
    if args.print_config:
        return _print_config(args, cfg, saved if from_saved else config, overrides)
    assert out is not None
    if mode in ("always", "never"):
        from pretrain.checkpoint import list_checkpoints

        have = list_checkpoints(out)
        if mode == "never" and have:
            raise PretrainError(f"--resume never: {out} already holds a run (checkpoints up to "
                                f"{have[-1].name}); give another --out, or --resume auto to continue it")
        if mode == "always" and not have:
            raise PretrainError(f"--resume always: {out} has no checkpoint to continue from (--resume auto "
                                "starts the run when it has none)")
    from pretrain.train import train

    summary = train(cfg, out, quiet=args.quiet, resume=mode in ("run", "always"), overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return summary
    val = summary["val_loss"]
    _emit(args, summary, f"trained {out}: step {summary['step']}, "
                         f"val loss {val:.4f} " if val is not None
                         else f"trained {out}: step {summary['step']}")
    return summary


def _print_config(args: argparse.Namespace, cfg: Any, source: Path | None,
                  overrides: list[str]) -> dict[str, Any]:
    """``pretrain train ... --print-config``: the config the run would train with, as YAML (``--json``: as one
    JSON object) on stdout. Resolved as training resolves it as far as that needs no training data: the data
    path made absolute and, when data.path is a prepared directory, the values taken from its meta.json
    (vocabulary, context, image size, ...) and the batch arithmetic checked; a model taken from
    train.init_from stays as configured."""
    import dataclasses

    from pretrain.config import PRESETS_DIR

    where = ("(no preset)" if source is None else f"preset {source.stem}"
             if source.resolve().parent == PRESETS_DIR else str(source))
    notes = [f"pretrain train: defaults <- {where} <- "
             + (" ".join(overrides) if overrides else "(no overrides)")]
    if cfg.data.path:
        data = Path(cfg.data.path)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data.resolve())))
        if cfg.train.init_from:
            notes.append(f"the model section comes from train.init_from ({cfg.train.init_from}) when "
                         "training")
        elif (data / "meta.json").is_file():
            from pretrain.data.manifest import load_meta
            from pretrain.train import resolve_batch, resolve_config

            cfg = resolve_config(cfg, load_meta(data))
            resolve_batch(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))
        else:
            notes.append(f"{data} is not a prepared data directory (yet): values left at 0 that come from "
                         "the data (model.vocab_size, ...) are filled in when training")
    else:
        notes.append("data.path is not set: training needs it (--data.path DIR, a `pretrain prepare` output)")
    if getattr(args, "json", False):
        print(json.dumps(cfg.to_dict()))
    else:
        print("".join(f"# {n}\n" for n in notes) + cfg.to_yaml(), end="")
    return {"config": cfg.to_dict(), "stop_reason": None}


def config_keys_help(width: int | None = None) -> str:
    """Every config key of `pretrain train` (dotted), with its type, default and docstring: the tail of
    ``pretrain train --help``."""
    import dataclasses
    import shutil
    import textwrap
    import typing

    from pretrain.config import Config, field_docs

    width = width or max(60, min(110, shutil.get_terminal_size().columns - 2))
    lines = ["config keys: set them in a preset or YAML file (`section:`, then `  key: value` under it), or",
             "on the command line as --section.key VALUE (e.g. --train.lr 3e-4 --model.n_layer 6);",
             "--print-config shows the result.", ""]

    def default(f: dataclasses.Field) -> str:
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        return json.dumps(value)

    def walk(cls: type, prefix: str) -> None:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            doc = " ".join((docs.get(f.name) or "").split())
            if dataclasses.is_dataclass(hints[f.name]):
                lines.extend(["", f"{prefix}{f.name}: {doc}"])
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            lines.append(f"  {prefix}{f.name} ({f.type}, default {default(f)})")
            lines.extend(textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ",
                                       break_on_hyphens=False))

    walk(Config, "")
    return "\n".join(lines)


_CONFIG_KEYS = "\0config-keys\0"  # the train parser's epilog, expanded when --help is printed


class _TrainHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`pretrain train --help`: the config keys listed after the options (built only when help is shown)."""

    def add_text(self, text: str | None) -> None:
        super().add_text(config_keys_help() if text == _CONFIG_KEYS else text)


def cmd_presets(args: argparse.Namespace) -> dict[str, Any]:
    """`pretrain presets [NAME]`: the presets that ship with the package, a line each; with NAME, its YAML."""
    from pretrain.config import config_path, preset_description, presets

    if args.name:
        path = config_path(args.name)
        res = {"name": path.stem, "path": str(path), "description": preset_description(path),
               "yaml": path.read_text(encoding="utf-8")}
        _emit(args, res, res["yaml"].rstrip("\n"))
        return res
    found = [{"name": name, "description": preset_description(p), "path": str(p)}
             for name, p in presets().items()]
    res = {"presets": found}
    pad = max((len(p["name"]) for p in found), default=0)
    _emit(args, res, "\n".join(f"{p['name']:{pad}}  {p['description']}" for p in found)
          + "\n\nuse: pretrain train NAME --out RUN_DIR [--section.key VALUE ...]\n"
            "`pretrain presets NAME` shows one; `pretrain train NAME --print-config` the config it resolves "
            "to")
    return res


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.inference import evaluate_run

    if args.tasks is not None:
        return _eval_harness(args)
    if args.limit is not None or args.num_fewshot is not None or args.include_path is not None:
        raise PretrainError("--limit, --num-fewshot and --include-path apply to --tasks only "
                            "(lm-evaluation-harness tasks)")
    if args.rec:
        return _eval_rec(args)
    given = [f for f, v, d in (("--k", args.k, 10), ("--negatives", args.negatives, 0),
                               ("--max-users", args.max_users, 0), ("--neighbours", args.neighbours, 0))
             if v != d]
    if given:
        raise PretrainError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --rec only "
                            "(ranking held-out items of an item-sequence run)")
    res = evaluate_run(args.run, args.data, split=args.split or "val", max_batches=args.max_batches,
                       device=args.device)
    if "images" in res:
        extra = "".join(f", {name} {res[k]:.2%}" for k, name in (("accuracy", "accuracy"),
                                                                  ("knn_accuracy", "k-NN accuracy"))
                        if res.get(k) is not None)
        _emit(args, res, f"{res['split']} loss {res['loss']:.4f}{extra} ({res['images']:,} images, step "
                         f"{res['step']})")
        return res
    bpb = f", {res['bits_per_byte']:.4f} bits/byte" if res["bits_per_byte"] is not None else ""
    if "accuracy" in res:
        bpb += f", masked-token accuracy {res['accuracy']:.2%}"
    _emit(args, res, f"{res['split']} loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}{bpb} "
                     f"({res['tokens']:,} tokens, step {res['step']})")
    return res


def _eval_harness(args: argparse.Namespace) -> dict[str, Any]:
    """``pretrain eval RUN --tasks NAMES``: lm-evaluation-harness tasks on the run (pretrain/harness.py)."""
    from pretrain.harness import harness_eval

    wrong = [f for f, v in (("--data", args.data), ("--split", args.split),
                            ("--max-batches", args.max_batches)) if v is not None]
    wrong += ["--rec"] if args.rec else []
    if wrong:
        raise PretrainError(f"{', '.join(wrong)}: not with --tasks (lm-evaluation-harness tasks bring their "
                            "own data)")
    res = harness_eval(args.run, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                       include_path=args.include_path, batch_size=args.batch_size, device=args.device)
    lines = [f"{res['run']} (step {res['step']}), lm-evaluation-harness {res['lm_eval_version']}"
             + (f", {args.num_fewshot}-shot" if args.num_fewshot is not None else "")
             + (f", at most {args.limit:g} documents per task" if args.limit is not None else "") + ":"]
    for task, metrics in res["tasks"].items():
        shown = [f"{k} {v:.4f}" + (f" ± {metrics[k + '_stderr']:.4f}" if metrics.get(k + "_stderr") else "")
                 for k, v in metrics.items() if not k.endswith("_stderr") and v is not None]
        n = res["n_samples"].get(task)
        lines.append(f"  {task}: {', '.join(shown) or 'no metrics'}" + (f" ({n:,} documents)" if n else ""))
    _emit(args, res, "\n".join(lines))
    return res


def _eval_rec(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.recommend import evaluate_rec

    split = args.split or "test"
    res = evaluate_rec(args.run, args.data, split=split, k=args.k, negatives=args.negatives,
                       max_users=args.max_users, neighbours=args.neighbours, device=args.device)
    k = res["k"]
    rows = [("ours (" + res["objective"] + ")", res["model"]), ("popularity", res["popularity"]),
            (f"item-kNN (decay {res['item_knn_settings']['decay']})", res["item_knn"])]
    lines = [f"{split} items of {res['users']:,} users, {res['ranking']} ranking over {res['items']:,} items "
             f"(history excluded), step {res['step']}:",
             f"  {'':28} {'HR@' + str(k):>8} {'NDCG@' + str(k):>8} {'MRR':>8}"]
    for name, m in rows:
        lines.append(f"  {name:28} {m[f'hr@{k}']:8.4f} {m[f'ndcg@{k}']:8.4f} {m['mrr']:8.4f}")
    ours = res["model"][f"ndcg@{k}"]
    for name, key in (("popularity", "popularity"), ("item-kNN", "item_knn")):
        d = res["paired"][f"ndcg@{k}_minus_{key}"]
        ratio = f"{ours / res[key][f'ndcg@{k}']:.2f}x" if res[key][f"ndcg@{k}"] > 0 else "-"
        lines.append(f"  NDCG@{k} vs {name}: {ratio}, {d['mean']:+.4f} per user "
                     f"(95% CI {d['ci95'][0]:+.4f} .. {d['ci95'][1]:+.4f})")
    _emit(args, res, "\n".join(lines))
    return res


def cmd_recommend(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.recommend import recommend

    res = recommend(args.run, history=args.history, user=args.user, k=args.k, device=args.device,
                    keep_seen=args.keep_seen)
    lines = []
    for i, r in enumerate(res["recommendations"], 1):
        extra = {k: v for k, v in r.items() if k not in ("item", "score")}
        desc = " ".join(str(v) for v in extra.values() if v is not None)
        lines.append(f"{i:3}. {r['item']:>10}  {r['score']:.4f}  {desc}".rstrip())
    _emit(args, res, "\n".join(lines) or "no items to recommend")
    return res


def cmd_bias(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.bias import bias_report

    if args.suite == "weat":
        return _bias_weat(args)
    wrong = [f for f, v in (("--words", args.words), ("--pooling", args.pooling),
                            ("--permutations", args.permutations)) if v is not None]
    if wrong:
        raise PretrainError(f"{', '.join(wrong)}: for --suite weat only")
    if not args.data:
        raise PretrainError("--suite crows-pairs needs --data crows_pairs_anonymized.csv")
    if args.max_pairs < 0 or args.batch_size < 1:
        raise PretrainError("--max-pairs must be >= 0 and --batch-size >= 1")
    res = bias_report(args.run, args.data, args.compare, args.png, args.device, args.batch_size, args.seed,
                      args.max_pairs, args.overwrite)
    lines = []
    for r in res["reports"]:
        o = r["overall"]
        lines.append(f"{r['run']} ({r['objective']}, step {r['step']}): {o['score']:.1f}% of {o['n']:,} "
                     f"pairs prefer the stereotyping sentence (95% CI {o['ci95'][0]:.1f}-{o['ci95'][1]:.1f}; "
                     f"50 = no preference; {r['ties']} ties; mean margin {r['mean_margin']:+.3f} nats)")
        for t, s in r["by_type"].items():
            lines.append(f"  {t:22} {s['score']:5.1f}  ({s['ci95'][0]:.1f}-{s['ci95'][1]:.1f})  n={s['n']}")
    if "difference" in res:
        d = res["difference"]
        lines.append(f"difference (first - second): {d['difference']:+.1f} points "
                     f"(95% CI {d['ci95'][0]:+.1f} .. {d['ci95'][1]:+.1f})")
    lines += [f"scoring: {res['reports'][0]['scoring']}", f"plot: {res['png']}",
              f"caveat: {res['reports'][0]['caveat']}"]
    _emit(args, res, "\n".join(lines))
    return res


def _bias_weat(args: argparse.Namespace) -> dict[str, Any]:
    """``pretrain bias RUN --suite weat --words WORDS.json``: the report printed, and saved as
    RUN/bias/weat.json (the export's model card carries it)."""
    from pretrain.bias import bias_dir
    from pretrain.io import check_output_file, record_output, write_json_atomic
    from pretrain.weat import DEFAULT_PERMUTATIONS, format_weat, weat

    wrong = [f for f, v in (("--data", args.data), ("--compare", args.compare), ("--png", args.png))
             if v is not None] + (["--max-pairs"] if args.max_pairs else [])
    if wrong:
        raise PretrainError(f"{', '.join(wrong)}: for --suite crows-pairs only")
    if not args.words:
        raise PretrainError("--suite weat needs --words WORDS.json (target and attribute word sets; see "
                            "docs/responsible.md)")
    permutations = DEFAULT_PERMUTATIONS if args.permutations is None else args.permutations
    if permutations < 1 or args.batch_size < 1:
        raise PretrainError("--permutations and --batch-size must be >= 1")
    saved = bias_dir(args.run) / "weat.json"
    check_output_file(saved, "bias", [args.words, args.run], args.overwrite)
    res = weat(args.run, args.words, args.device, args.pooling or "mean", permutations, args.seed,
               args.batch_size)
    saved.parent.mkdir(exist_ok=True)
    write_json_atomic(saved, res)
    record_output(saved, "bias")
    _emit(args, res, format_weat(res) + f"\nsaved: {saved}")
    return res


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.inference import generate_text

    texts = generate_text(args.run, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, args.seed, args.device, args.num_samples)
    res = {"prompt": args.prompt, "samples": texts}
    _emit(args, res, "\n---\n".join(texts))
    return res


def cmd_fill_mask(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.inference import fill_mask

    fills = fill_mask(args.run, args.text, args.top_k, args.device)
    res = {"text": args.text, "masks": fills}
    lines = []
    for i, options in enumerate(fills, 1):
        lines.append(f"[MASK] {i}: " + ", ".join(f"{o['token']} ({o['prob']:.3f})" for o in options))
    _emit(args, res, "\n".join(lines))
    return res


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.features import embed

    if args.items:
        from pretrain.recommend import embed_items

        if args.input:
            raise PretrainError("--items embeds the run's item vocabulary: give no --input")
        res = embed_items(args.run, args.out, args.neighbours, args.device, overwrite=args.overwrite)
        ex = "; ".join(f"{i} -> {', '.join(n)}" for i, n in list(res["examples"].items())[:2])
        _emit(args, res, f"wrote {res['rows']:,} x {res['dim']} item embeddings with their "
                         f"{res['neighbours']} nearest items to {res['out']} (e.g. {ex})")
        return res
    if not args.input:
        raise PretrainError("--input is required (or --items, for an item-sequence run)")
    res = embed(args.run, args.input, args.out, args.pooling, args.normalize, args.batch_size,
                args.text_field, args.device, overwrite=args.overwrite)
    trunc = f"; {res['truncated']:,} truncated to {res['max_tokens']} tokens" if res["truncated"] else ""
    _emit(args, res, f"wrote {res['rows']:,} x {res['dim']} embeddings ({res['pooling']} pooling) "
                     f"to {res['out']}{trunc}")
    return res


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.export import export_hf

    res = export_hf(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
    _emit(args, res, f"exported {args.run} (step {res['step']}) to {res['out']} as {res['architecture']} "
                     f"({', '.join(res['weights'])}, {res['dtype']})")
    return res


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    from pretrain.demo import run_demo

    res = run_demo(args.out, max_steps=args.max_steps, quiet=args.json, budget_s=args.budget_s,
                   overwrite=args.overwrite)
    if args.json:
        print(json.dumps(res))
    return res


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option (``--text-field``), kept working but hidden from --help: it stores what
    the new one (``new``) does and says, on stderr, to use that."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        print(f"warning: {option_string} is deprecated: use {self.new}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def _deprecated_alias(p: argparse.ArgumentParser, old: str, new: str, dest: str) -> None:
    """``old`` as a hidden alias of the option ``new`` (stored in ``dest``)."""
    p.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``error: ...``), exit status 2, like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        import difflib

        if message.startswith("unrecognized arguments: "):  # a typo: name the closest option of the command
            parser: argparse.ArgumentParser = self
            for action in self._actions:  # (the top-level parser reports a subcommand's unknown arguments)
                if isinstance(action, argparse._SubParsersAction):
                    for word in getattr(self, "argv", []):
                        if word in action.choices:
                            parser = action.choices[word]
                            break
            options = [o for o in parser._option_string_actions if o.startswith("--")]
            typos, elsewhere = [], []
            for arg in (a.split("=")[0] for a in message.split(": ", 1)[1].split() if a.startswith("--")):
                close = difflib.get_close_matches(arg, options, n=1, cutoff=0.75)
                others = [name for name, p in _subparsers(self).items()
                          if p is not parser and arg in p._option_string_actions]
                if close:
                    typos.append(f"{arg} → {close[0]}?")
                elif others and parser is not self:  # an option of another command, not a typo
                    elsewhere.append(f"{arg} is an option of {', '.join(others[:3])}, not of this command")
            if typos:
                message += f" (did you mean: {', '.join(typos)})"
            if elsewhere:
                message += f" ({'; '.join(elsewhere)})"
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    """`pretrain prepare`: corpus → cleaned, tokenized shards."""
    s = sub.add_parser("prepare", help="corpus → tokenizer → train/val token shards")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, folders, globs or hf:NAME[:CONFIG] (a Hugging Face dataset, streamed); "
                        "append ::WEIGHT to give an input a mixture weight (e.g. wiki/::3 code/::1)")
    s.add_argument("--out", required=True, help="data directory to write")
    s.add_argument("--tokenizer", default="bpe",
                   help="byte | char | bpe | wordpiece | unigram | path to tokenizer.json (default bpe)")
    s.add_argument("--vocab-size", type=int, default=8192,
                   help="vocabulary size for bpe/wordpiece/unigram (default 8192)")
    s.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (default 0.1)")
    s.add_argument("--text-column", dest="text_field", default="text", metavar="COLUMN",
                   help="JSON field or CSV/TSV/Parquet column holding the text (default text)")
    _deprecated_alias(s, "--text-field", "--text-column", "text_field")
    s.add_argument("--text-unit", choices=["file", "paragraph", "line"], default="file",
                   help="a .txt document is the whole file (default), each blank-line separated paragraph, "
                        "or each line")
    s.add_argument("--bad-files", choices=["error", "skip"], default="error",
                   help="binary or non-UTF-8 files, undecodable images: fail (default) or skip with a "
                        "warning")
    s.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    s.add_argument("--licence", default="", help="licence of the sources, recorded in the manifest")
    s.add_argument("--tokenizer-sample-mb", type=float, default=1000.0,
                   help="train bpe/wordpiece/unigram on an evenly spread sample of about this many MB "
                        "of text (default 1000)")
    s.add_argument("--workers", type=int, default=None,
                   help="cleaning/tokenizing (or image decoding) processes (0: in this process; default: one "
                        "per CPU, in-process for inputs under 32 MB or 2,000 images)")
    s.add_argument("--batch-mb", type=float, default=1.0,
                   help="MB of text per batch handed to a worker; with --workers it bounds peak memory "
                        "(default 1)")
    s.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard file (default 1e8)")
    s.add_argument("--hf-split", default="train", help="split of hf:NAME inputs (default train)")
    s.add_argument("--hf-revision", default=None, help="revision (branch, tag or commit) of hf:NAME inputs")
    s.add_argument("--hf-data-files", nargs="+", default=None, metavar="FILE",
                   help="data_files for hf: builders such as hf:json or hf:parquet (local paths or URLs)")
    g = s.add_argument_group("cleaning (each step optional; counts and examples go to meta.json)")
    g.add_argument("--normalize", default="NFC", help="Unicode normalisation form, '' for none (default NFC)")
    g.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this")
    g.add_argument("--max-chars", type=int, default=0, help="drop documents longer than this")
    g.add_argument("--max-symbol-ratio", type=float, default=0.0,
                   help="drop documents with more symbols than this")
    g.add_argument("--min-alpha-ratio", type=float, default=0.0,
                   help="drop documents with fewer letters than this")
    g.add_argument("--max-repeated-line-ratio", type=float, default=0.0,
                   help="drop documents in which more than this share of lines repeat")
    g.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    g.add_argument("--near-dup", type=float, default=0.0, metavar="JACCARD",
                   help="drop near-duplicates at this MinHash Jaccard similarity, e.g. 0.7")
    g.add_argument("--decontaminate", nargs="+", metavar="EVAL",
                   help="drop documents sharing an n-gram with these")
    g.add_argument("--decontaminate-field", nargs="+", default=["text"], metavar="FIELD",
                   help="fields/columns of JSONL/CSV/Parquet --decontaminate files to match, each of them "
                        "(default: text)")
    g.add_argument("--decontam-ngram", type=int, default=13, help="n for --decontaminate (default 13)")
    g.add_argument("--pii", choices=["", "report", "redact", "drop"], default="",
                   help="personal data (e-mail addresses, phone numbers, IP addresses, card numbers): "
                        "report (count them), redact (replace each by <EMAIL>, <PHONE>, <IP_ADDRESS>, "
                        "<CARD>) or drop the documents with any (default: off)")
    im = s.add_argument_group("images (IDX, .npz, .npy or folders of PNG/JPEG/WebP/BMP; see docs/images.md)")
    im.add_argument("--image-size", type=int, default=0, metavar="N",
                    help="resize (shorter side to N) and centre-crop every image to NxN (default: keep the "
                         "size, which must then be the same for every image)")
    im.add_argument("--channels", type=int, choices=[1, 3], default=0,
                    help="convert every image to 1 (grey) or 3 (RGB) channels (default: the first image's)")
    im.add_argument("--shard-images", type=int, default=0, metavar="N",
                    help="images per shard file (default: about 256 MiB of pixels)")
    im.add_argument("--seed", type=int, default=0,
                    help="seed of the validation images carved from train (default 0)")
    it = s.add_argument_group("interaction logs (--interactions: one item sequence per user, leave-one-out; "
                              "see docs/recommendations.md)")
    it.add_argument("--interactions", action="store_true",
                    help="the inputs are user-item interaction logs (CSV, TSV, JSONL, JSON or Parquet rows)")
    it.add_argument("--user-column", default="user_id", help="column of the user id (default user_id)")
    it.add_argument("--item-column", default="item_id",
                    help="column of the item id, in the log and in --items (default item_id)")
    it.add_argument("--time-column", default="timestamp",
                    help="numeric column that orders each user's interactions (default timestamp; '' for "
                         "file order)")
    it.add_argument("--rating-column", default="rating", help="column of the rating (default rating)")
    it.add_argument("--min-rating", type=float, default=None,
                    help="keep interactions rated at least this (default: all)")
    it.add_argument("--min-item-count", type=int, default=1,
                    help="drop items with fewer interactions than this (default 1)")
    it.add_argument("--min-user-items", type=int, default=3,
                    help="drop users with fewer interactions than this (default 3, the least leave-one-out "
                         "takes)")
    it.add_argument("--items", default=None, metavar="FILE",
                    help="item metadata table (e.g. movies.csv: title, genres) keyed by --item-column")
    s.add_argument("--json", action="store_true", help="print one JSON object with the result")
    # options that only one kind of input takes: (option, default) by dest, for cmd_prepare's checks
    text_dests = ["tokenizer", "vocab_size", "text_field", "text_unit", "tokenizer_sample_mb", "batch_mb",
                  "shard_tokens", "hf_split", "hf_revision", "hf_data_files", "val_fraction", "workers",
                  "bad_files"]
    text_dests += [a.dest for a in g._group_actions]
    image_dests = ["image_size", "channels", "shard_images", "seed"]
    inter_dests = [a.dest for a in it._group_actions if a.dest != "interactions"]

    def options(dests: list[str]) -> dict[str, tuple[str, Any]]:
        return {a.dest: (a.option_strings[0], a.default) for a in s._actions
                if a.dest in dests and a.help != argparse.SUPPRESS}  # (not a deprecated alias)

    shared = ["val_fraction", "workers", "bad_files"]  # text and images take these
    s.set_defaults(kind_options={"text": options([d for d in text_dests if d not in shared]),
                                 "images": options(image_dests),
                                 "interactions": options(inter_dests),
                                 "text and images": options(shared)})


def _add_data_and_train(sub: argparse._SubParsersAction) -> None:
    """`pretrain data inspect|audit` and `pretrain train`."""
    s = sub.add_parser("data", help="inspect or audit a prepared data directory")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="ACTION", parser_class=_Parser)
    s = dsub.add_parser("inspect", help="counts, token histogram, decoded samples, the manifest")
    s.add_argument("data_dir")
    s.add_argument("--samples", type=int, default=3)
    s.add_argument("--json", action="store_true")
    s = dsub.add_parser("audit", help="provenance: every source with its licence, sha256, size and tokens, "
                                      "and what cleaning, dedup, decontamination and PII checks removed")
    s.add_argument("data_dir")
    s.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("train", help="pre-train a model (resumes automatically if RUN_DIR has checkpoints)",
                       description="Pre-train a model into RUN_DIR from a preset (`pretrain presets` lists "
                                   "them)\nor a YAML file, plus --section.key VALUE overrides.",
                       epilog=_CONFIG_KEYS, formatter_class=_TrainHelpFormatter)
    s.add_argument("config", nargs="?", metavar="PRESET|YAML",
                   help="a preset name (e.g. tiny, gpt2-small: see `pretrain presets`) or a YAML file "
                        "(stating only what differs from the defaults)")
    s.add_argument("--out", help="run directory")
    s.add_argument("--resume", metavar="auto|always|never|RUN_DIR",
                   help="auto (default): continue --out's run when it has a checkpoint, else start it; "
                        "always: continue it (an error if it has no checkpoint; no preset given: its saved "
                        "config); never: start it (an error if it has checkpoints); RUN_DIR: continue the "
                        "run in RUN_DIR with its saved config (= --out RUN_DIR --resume always)")
    s.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults <- preset/YAML <- overrides) as YAML and exit")
    s.add_argument("--init-from", metavar="HF_DIR",
                   help="start from a local Hugging Face checkpoint (same as --train.init_from HF_DIR)")
    s.add_argument("--skip-samples", metavar="A-B[,C-D]",
                   help="global sample ranges to pass over, e.g. the batches before a loss spike "
                        "(same as --train.skip_samples)")
    s.add_argument("--overwrite", action="store_true",
                   help="write the run into a non-empty folder that is not a run (a run is always continued)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--json", action="store_true", help="print one JSON object with the summary")

    s = sub.add_parser("presets", help="list the presets that ship with the package (`pretrain train NAME`)")
    s.add_argument("name", nargs="?", help="show this preset's YAML")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_presets)


def _add_inference(sub: argparse._SubParsersAction) -> None:
    """`pretrain eval | generate | fill-mask | embed`: using a pre-trained run."""
    s = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a run; --rec: ranking "
                                    "metrics of held-out items; --tasks: lm-evaluation-harness tasks")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--data", help="prepared data directory (default: the one the run trained on)")
    s.add_argument("--split", default=None,
                   help="val (default), train, or test (image and interaction data; --rec: test by default)")
    s.add_argument("--max-batches", type=int, default=None, help="evaluate on at most this many batches")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")
    h = s.add_argument_group("lm-evaluation-harness (--tasks; needs pip install 'pretrain[eval]')")
    h.add_argument("--tasks", default=None, metavar="NAMES",
                   help="comma-separated lm-evaluation-harness task names (e.g. hellaswag,arc_easy) or task "
                        "YAML files, run on the causal-LM run directly (no export); the results per task")
    h.add_argument("--limit", type=float, default=None, metavar="N",
                   help="at most N documents per task (a fraction of them when < 1; default: all)")
    h.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="in-context examples per prompt (default: each task's own)")
    h.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of further task YAML files (lm_eval's --include_path)")
    h.add_argument("--batch-size", type=int, default=16, help="sequences scored at once (default 16)")
    r = s.add_argument_group("recommendations (--rec; docs/recommendations.md)")
    r.add_argument("--rec", action="store_true",
                   help="HR@k, NDCG@k and MRR of each user's held-out item (leave-one-out), full ranking "
                        "over all items with the history excluded, beside popularity and item-kNN baselines")
    r.add_argument("--k", type=int, default=10, help="cut-off of HR and NDCG (default 10)")
    r.add_argument("--negatives", type=int, default=0, metavar="N",
                   help="rank the target among N sampled unseen items instead of all (as SASRec/BERT4Rec "
                        "papers report; not comparable with full ranking; default 0: full ranking)")
    r.add_argument("--max-users", type=int, default=0, help="an evenly spread subset of users (default: all)")
    r.add_argument("--neighbours", type=int, default=0,
                   help="neighbours kept per item by the item-kNN baseline (default 0: all, up to 20,000 "
                        "items; 500 for a larger catalogue)")

    s = sub.add_parser("recommend", help="top-k unseen items after a history (item-sequence runs)")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--history", help="item ids the user interacted with, oldest first, comma-separated")
    s.add_argument("--user", help="a user of the run's prepared data: their whole history")
    s.add_argument("--k", type=int, default=10, help="how many items (default 10)")
    s.add_argument("--keep-seen", action="store_true", help="do not leave out the items of the history")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("bias", help="bias probe: does the model prefer the stereotyping sentence of minimal "
                                    "pairs (CrowS-Pairs)?")
    s.add_argument("run", help="pre-trained run directory or checkpoint (causal or masked LM); crows-pairs: "
                               "also a fine-tune of one (its backbone with the pre-trained LM head)")
    s.add_argument("--suite", choices=["crows-pairs", "weat"], default="crows-pairs",
                   help="crows-pairs: %% of pairs where the stereotyping sentence scores higher, with "
                        "intervals; weat: the word embedding association test (effect size, permutation "
                        "p-value) on the run's embed vectors")
    s.add_argument("--data",
                   help="crows-pairs: crows_pairs_anonymized.csv (columns sent_more, sent_less, "
                        "stereo_antistereo, bias_type)")
    s.add_argument("--words", help="weat: WORDS.json with two target and two attribute word sets (and "
                                   "optional templates); see docs/responsible.md")
    s.add_argument("--pooling", choices=["mean", "cls", "last"], help="weat: how a text's vector is pooled, "
                                                                      "as in `pretrain embed` (default mean)")
    s.add_argument("--permutations", type=int,
                   help="weat: partitions for the p-value, exact when there are no more (default 10000)")
    s.add_argument("--compare", metavar="RUN2",
                   help="a second run (another corpus's, or a fine-tune of RUN), side by side, with the "
                        "paired difference")
    s.add_argument("--png", help="plot to write (default RUN/bias/crows-pairs.png)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace a --png (or RUN/bias/crows-pairs.json) that an earlier `pretrain bias` did "
                        "not write")
    s.add_argument("--max-pairs", type=int, default=0, help="the first N pairs only (default: all)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (weat: of the "
                                                       "sampled partitions)")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("generate", help="sample text from a run (KV-cached)")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("fill-mask", help="top-k fillers for each [MASK] in a text (masked-LM runs)")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("text", help='text with one or more [MASK] tokens, e.g. "the cat sat on the [MASK]."')
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("embed", help="one embedding per input row (.npy or .parquet); --items: every item's")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("--input", help=".txt (one text per line), .jsonl, .csv, .tsv or .parquet")
    s.add_argument("--items", action="store_true",
                   help="an item-sequence run's item embeddings (one per item) and each item's nearest items")
    s.add_argument("--neighbours", type=int, default=10, help="--items: nearest items listed (default 10)")
    s.add_argument("--out", required=True, help="FILE.npy or FILE.parquet")
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that an earlier `pretrain embed` did not write (or that "
                        "changed since)")
    s.add_argument("--pooling", choices=["mean", "cls", "last"], default="mean")
    s.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--text-column", dest="text_field", default="text", metavar="COLUMN",
                   help="JSON field or CSV/TSV/Parquet column holding the text (default text)")
    _deprecated_alias(s, "--text-field", "--text-column", "text_field")
    s.add_argument("--device", default="auto")
    s.add_argument("--json", action="store_true")


def _add_export_and_demo(sub: argparse._SubParsersAction) -> None:
    """`pretrain export` and `pretrain demo`."""
    s = sub.add_parser("export", help="write a run, or a question-answering fine-tune, in the Hugging Face "
                                      "layout (Llama / ModernBERT / GPT-2 ...)")
    s.add_argument("run", help="run directory or checkpoint directory, or a fine-tuned question-answering "
                               "model (a `pretrain finetune --task qa` output directory: exported as an "
                               "AutoModelForQuestionAnswering with its tokenizer)")
    s.add_argument("--out", required=True,
                   help="directory to write (config.json, model.safetensors, tokenizer...)")
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty directory that is not an earlier export, or one whose files "
                        "were edited since (only the files an export writes are replaced)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("demo",
                       help="the whole pipeline on a built-in corpus, offline (a few minutes on a CPU)")
    s.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    s.add_argument("--max-steps", type=int, default=None, help="pre-training steps (default 600)")
    s.add_argument("--budget-s", type=float, default=300.0, help="stop pre-training after this many seconds")
    s.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out that is not an earlier demo's")
    s.add_argument("--json", action="store_true")

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, p in action.choices.items()}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain", description="Pre-train your own foundation model.")
    p.add_argument("--version", action="version", version=f"pretrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    for add in (_add_prepare, _add_data_and_train, _add_inference, _add_export_and_demo):
        add(sub)

    from pretrain.finetune.cli import add_parsers as add_transfer_parsers

    add_transfer_parsers(sub)
    return p


def _format_warning(message, category, filename, lineno, line=None):  # one line, no source echo
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    rest, overrides = split_overrides(argv)
    parser = build_parser()
    parser.argv = rest  # type: ignore[attr-defined]  # for typo suggestions in usage errors
    args = parser.parse_args(rest)
    previous_term = None
    # kill / SIGTERM unwinds like Ctrl-C: clean-up runs
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        if args.command == "train":
            from pretrain.train import STOP_SIGNALS  # (torch is imported by training anyway)

            summary = cmd_train(args, overrides)
            if summary.get("stop_reason") in STOP_SIGNALS:  # stopped gracefully, checkpoint saved
                if os.environ.get("RANK", "0") == "0":
                    print(f"stopped by {summary['stop_reason']} at step {summary['step']}; checkpoint saved: "
                          f"continue with `pretrain train --resume {summary['run_dir']}`", file=sys.stderr)
                return 128 + int(getattr(signal, summary["stop_reason"]))
        else:
            if overrides:
                raise PretrainError(f"config overrides like {overrides[0]} only apply to `pretrain train`")
            handlers = {"prepare": cmd_prepare, "data": cmd_data, "eval": cmd_eval,
                        "generate": cmd_generate, "fill-mask": cmd_fill_mask, "embed": cmd_embed,
                        "recommend": cmd_recommend, "bias": cmd_bias,
                        "export": cmd_export, "demo": cmd_demo}
            # commands defined in other modules (pretrain/finetune/cli.py) carry their handler as args.func
            handler = handlers.get(args.command) or args.func
            handler(args)
    except PretrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed by its reader (`pretrain presets | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0
    except OSError as e:  # unreadable input, unwritable output, full disk
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or a signal asked to stop at once: 128 + its number
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + int(signum)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


if __name__ == "__main__":
    sys.exit(main())
