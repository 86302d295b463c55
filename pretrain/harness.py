"""``pretrain eval RUN --tasks NAMES``: EleutherAI's lm-evaluation-harness on a run, no export needed.

:func:`harness_eval` wraps the run's model and tokenizer in an ``lm_eval`` model class (registered as
``pretrain``; ``lm_eval --model pretrain --model_args run=RUN`` works too once this module is imported) and
hands it to ``lm_eval.simple_evaluate``. The three request types:

- ``loglikelihood(context, continuation)``: the sum of log p(continuation tokens | context), and whether
  each was the greedy choice; tokenized as Hugging Face's ``HFLM`` does it (the whole string encoded, the
  context's tokens split off; an empty context is the end-of-document token, the start of every document in
  training); a context longer than the model's window keeps its end.
- ``loglikelihood_rolling(text)``: the whole text scored in windows of the model's context, every token
  predicted once (perplexity tasks such as wikitext).
- ``generate_until(context, {until, max_gen_toks})``: greedy decoding (KV-cached), cut at the first stop
  string or the end-of-document token.

Causal-LM runs only: a masked-LM run has no left-to-right likelihood, and a pseudo-log-likelihood would give
figures no leaderboard compares with, so it is refused with an error (fine-tune it, or `pretrain bias`).
lm_eval is an optional extra: ``pip install 'pretrain[eval]'``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

from pretrain import PretrainError

EXTRA = "pip install 'pretrain[eval]'"
MODEL_NAME = "pretrain"
_LM_CLASS: Any = None


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise PretrainError("--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: "
                            f"{EXTRA} (the lm_eval package)")


def lm_class() -> Any:
    """The ``lm_eval.api.model.LM`` subclass wrapping a run (built and registered as ``pretrain`` once)."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    _require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class PretrainLM(LM):
        """A causal-LM run of this package as an lm-evaluation-harness model."""

        def __init__(self, run: str, device: str = "auto", batch_size: int | str = 16,
                     max_gen_toks: int = 256, dtype: str | None = None, **_: Any) -> None:
            super().__init__()
            from pretrain.checkpoint import load_pretrained
            from pretrain.hardware import resolve_device

            self.dev = resolve_device(device)
            model, cfg, tok, meta = load_pretrained(run, self.dev, part="whole")
            if tok is None:
                raise PretrainError(f"{run} is an image model: lm-evaluation-harness tasks are text")
            if cfg.objective != "clm":
                raise PretrainError(f"{run} is a {cfg.objective} (masked-LM) run: lm-evaluation-harness "
                                    "scores text left to right, which needs a causal-LM (objective clm) run; "
                                    "evaluate an encoder by fine-tuning it (`pretrain finetune`, `pretrain "
                                    "transfer`)")
            self.model, self.tok, self.cfg, self.meta = model, tok, cfg, meta
            self.ctx = int(cfg.model.max_seq_len)
            self.batch = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 16
            self.max_gen_toks = int(max_gen_toks)
            self.dtype = dtype or cfg.train.dtype  # autocast: the run's (auto: bf16 where native), or fp32

        # ---- tokenization, as lm_eval's HFLM does it
        def _encode(self, text: str) -> list[int]:
            return self.tok.encode(text, text_only=True) if text else []

        def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            if not context:
                return [self.tok.eot_id], self._encode(continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:  # trailing spaces of the context belong to the continuation
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = self._encode(context + continuation), self._encode(context)
            return ctx, whole[len(ctx):]

        # ---- scoring
        @torch.no_grad()
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """Sum of log-probabilities of each continuation after its context, and whether it is greedy."""
            from pretrain.hardware import autocast_context

            out: list[tuple[float, bool] | None] = [None] * len(pairs)
            rows = []
            for i, (ctx, cont) in enumerate(pairs):
                if not cont:
                    out[i] = (0.0, True)
                    continue
                seq = (ctx + cont)[-(self.ctx + 1):]
                rows.append((i, seq[:-1], min(len(cont), len(seq) - 1), seq[-len(cont):]))
            rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: less padding
            for lo in range(0, len(rows), self.batch):
                chunk = rows[lo:lo + self.batch]
                width = max(len(r[1]) for r in chunk)
                x = torch.full((len(chunk), width), self.tok.eot_id, dtype=torch.long)
                for j, (_, inp, _, _) in enumerate(chunk):
                    x[j, :len(inp)] = torch.tensor(inp)  # right-padded: causal, the padding is never seen
                with autocast_context(self.dev, self.dtype):
                    logits = self.model(x.to(self.dev))
                logp = logits.float().log_softmax(-1).cpu()
                for j, (i, inp, n, target) in enumerate(chunk):
                    lp = logp[j, len(inp) - n:len(inp)]  # (n, V): the positions predicting the continuation
                    want = torch.tensor(target[-n:])
                    out[i] = (float(lp.gather(1, want[:, None]).sum()), bool((lp.argmax(-1) == want).all()))
            return [o for o in out if o is not None]

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            res = self._score([self._pair(*r.args) for r in requests])
            for r, v in zip(requests, res):
                self.cache_hook.add_partial("loglikelihood", r.args, v)
            return res

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for r in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self._encode(r.args[0]), self.tok.eot_id, self.ctx, 1)]
                total = sum(lp for lp, _ in self._score(windows))
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
                out.append(total)
            return out

        @torch.no_grad()
        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            from pretrain.hardware import autocast_context

            out = []
            for r in requests:
                context, kwargs = r.args
                kwargs = dict(kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                budget = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                ids = self._encode(context) or [self.tok.eot_id]
                idx = torch.tensor([ids[-self.ctx:]], dtype=torch.long, device=self.dev)
                start, text = idx.size(1), ""
                while budget > 0:  # in chunks, to stop soon after a stop string
                    step = min(32, budget)
                    with autocast_context(self.dev, self.dtype):
                        idx = self.model.generate(idx, step, temperature=0.0, stop_token=self.tok.eot_id)
                    budget -= step
                    new = idx[0, start:].tolist()
                    done = self.tok.eot_id in new
                    if done:
                        new = new[:new.index(self.tok.eot_id)]
                    text = self.tok.decode(new)
                    cut = min((text.find(s) for s in until if s and s in text), default=-1)
                    if cut >= 0:
                        text = text[:cut]
                        break
                    if done:
                        break
                self.cache_hook.add_partial("generate_until", r.args, text)
                out.append(text)
            return out

    register_model(MODEL_NAME)(PretrainLM)
    _LM_CLASS = PretrainLM
    return PretrainLM


def _task_names(tasks: str | list[str], include_path: list[str]) -> list[str]:
    """Task names; a YAML file given as a task is registered (its folder added to the include path) and
    named by its ``task:`` key."""
    import yaml

    names = []
    for t in (tasks.split(",") if isinstance(tasks, str) else tasks):
        t = t.strip()
        if not t:
            continue
        p = Path(t)
        if p.suffix in (".yaml", ".yml") and p.is_file():
            try:
                doc = yaml.safe_load(p.read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise PretrainError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
                raise PretrainError(f"{p} is not an lm-evaluation-harness task (no 'task: NAME' key)")
            include_path.append(str(p.resolve().parent))
            names.append(doc["task"])
        elif p.suffix in (".yaml", ".yml"):
            raise PretrainError(f"task file not found: {p}")
        else:
            names.append(t)
    if not names:
        raise PretrainError("--tasks needs at least one task name (or a task YAML file)")
    return names


def harness_eval(run: str | Path, tasks: str | list[str], limit: float | None = None,
                 num_fewshot: int | None = None, include_path: str | Path | None = None,
                 batch_size: int = 16, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` (names, comma-separated or a list; or task YAML files) on the
    causal-LM run ``run``. ``limit``: at most this many documents per task (a fraction when < 1);
    ``num_fewshot``: in-context examples; ``include_path``: a folder of extra task YAML files. → {run, step,
    tasks: {task: {metric: value, metric_stderr: ...}}, versions, n_samples, config}."""
    if limit is not None and limit <= 0:
        raise PretrainError("--limit must be > 0")
    if num_fewshot is not None and num_fewshot < 0:
        raise PretrainError("--num-fewshot must be >= 0")
    if batch_size < 1:
        raise PretrainError("--batch-size must be >= 1")
    _require_lm_eval()
    paths = [str(include_path)] if include_path else []
    if include_path and not Path(include_path).is_dir():
        raise PretrainError(f"--include-path {include_path} is not a folder")
    names = _task_names(tasks, paths)
    lm = lm_class()(str(run), device=device, batch_size=batch_size)
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):  # the harness logs the defaults it fills in: stderr stays readable
        logging.getLogger(name).setLevel(logging.ERROR)
    manager = None
    if paths:  # local tasks only: no need to index the harness's thousands of task files (seconds)
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(n not in manager.all_tasks for n in names):
            manager = None
    manager = manager or TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        import difflib

        hints = [f"{n} → {m[0]}?" for n in unknown
                 if (m := difflib.get_close_matches(n, manager.all_tasks, 1))]
        raise PretrainError(f"unknown lm-evaluation-harness task(s): {', '.join(unknown)}"
                            + (f" (did you mean: {', '.join(hints)})" if hints else "")
                            + "; give a task YAML file, or its folder with --include-path")
    limit_arg: float | int | None = None if limit is None else (int(limit) if limit >= 1 else limit)
    try:
        res = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit_arg,
                              task_manager=manager, log_samples=False, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                              bootstrap_iters=1000)
    except (ConnectionError, OSError) as e:  # a task's dataset on the Hub, offline
        raise PretrainError(f"lm-evaluation-harness could not load a task's data: {str(e).splitlines()[0]} "
                            "(tasks that download from the Hugging Face Hub need a network; a local task "
                            "YAML can read files: dataset_path: json, dataset_kwargs: {data_files: ...})"
                            ) from None
    tasks_out: dict[str, dict[str, float | None]] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        clean: dict[str, float | None] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            name = key.split(",")[0]  # 'acc,none' -> 'acc' (the filter is 'none' for plain tasks)
            clean[name] = None if isinstance(value, float) and math.isnan(value) else float(value)
        tasks_out[task] = clean
    import lm_eval

    return {"run": str(run), "step": lm.meta.get("step"), "tasks": tasks_out,
            "n_samples": {t: v.get("effective") for t, v in (res or {}).get("n-samples", {}).items()},
            "num_fewshot": num_fewshot, "limit": limit, "lm_eval_version": lm_eval.__version__}
