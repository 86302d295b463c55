"""WEAT: the Word Embedding Association Test (Caliskan, Bryson & Narayanan, Science 2017) on a run's
``embed`` vectors, for target and attribute word sets the user supplies.

Two target sets X and Y of equal size (e.g. two groups) and two attribute sets A and B (e.g. pleasant and
unpleasant words). For a word w::

    s(w, A, B) = mean_{a in A} cos(w, a) - mean_{b in B} cos(w, b)

the test statistic ``S = sum_{x in X} s(x, A, B) - sum_{y in Y} s(y, A, B)`` and the effect size::

    d = (mean_{x in X} s(x, A, B) - mean_{y in Y} s(y, A, B)) / std_{w in X u Y} s(w, A, B)

with the **sample** standard deviation (ddof=1), as the reference implementation of May et al. (2019,
``sentbias/weat.py``) computes it; d lies in [-2, 2] and is positive when X is closer to A (and Y to B)
than the other way round. The one-sided p-value is the share of the equal-size partitions (Xi, Yi) of
X u Y with ``S(Xi, Yi) > S(X, Y)``: over **all** of them (the observed one included) when there are no
more than ``permutations``, else over ``permutations`` random partitions (seeded) with the observed
partition counted once more, ``(1 + #greater) / (1 + permutations)``, so a sampled p is never 0. Values
equal to the observed statistic within floating-point rounding do not count as greater.

A word's vector is the run's ``embed`` vector of the word as a text (pooled as ``pretrain embed`` pools,
``mean`` by default), or, with ``templates`` (SEAT, May et al., NAACL 2019: "This is {}."), the mean over
the templates of the sentence vectors. SEAT itself makes each sentence a member of the sets; averaging per
word keeps the word as the unit the permutation test exchanges (sentences built on one word are not
independent of each other).

Caveat, repeated with every report: on contextual models WEAT is sensitive to the templates and the
pooling (May et al., 2019); a single test is not a verdict.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pretrain import PretrainError

CAVEAT = ("WEAT on contextual models is sensitive to the templates and the pooling (May et al., 2019): a "
          "single test is not a verdict, and no association found does not mean an unbiased model.")
DEFAULT_PERMUTATIONS = 10_000
FORMAT = ('{"targets": {"X": ["word", ...], "Y": [...]}, "attributes": {"A": [...], "B": [...]}, '
          '"templates": ["This is {}.", ...] (optional)}')
_CHUNK = 8192  # partitions scored at a time (bounds memory whatever the budget)


# ----------------------------------------------------------------------------------------------------------
# the statistic


def _cosines(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(n, m) cosine similarities of the rows of ``w`` with the rows of ``a``."""
    wn = np.linalg.norm(w, axis=1, keepdims=True)
    an = np.linalg.norm(a, axis=1, keepdims=True)
    if (wn == 0).any() or (an == 0).any():
        raise PretrainError("a vector of zeros: its cosine similarity is undefined")
    return (w / wn) @ (a / an).T


def _as_matrix(v: Any, name: str) -> np.ndarray:
    m = np.asarray(v, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise PretrainError(f"{name} must be a non-empty (n, dim) array of vectors, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise PretrainError(f"{name} holds non-finite values")
    return m


def weat_statistics(X: np.ndarray, Y: np.ndarray, A: np.ndarray, B: np.ndarray,
                    permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> dict[str, Any]:
    """WEAT on vectors (rows): target sets ``X``, ``Y`` (equal sizes), attribute sets ``A``, ``B``. Returns
    ``effect_size`` (None when every s(w, A, B) is equal), ``statistic`` S, ``p_value`` (one-sided: X
    closer to A than Y is), ``p_method`` 'exact' or 'sampled', ``permutations`` (partitions the p-value
    counts: all of them, or the random ones drawn), ``partitions`` (how many equal-size partitions of
    X u Y exist), ``mean_s_x``, ``mean_s_y``, ``std_s`` (ddof=1), ``std_ddof`` and the per-word
    associations ``s_x``, ``s_y`` (see the module doc)."""
    X, Y, A, B = (_as_matrix(v, n) for v, n in ((X, "X"), (Y, "Y"), (A, "A"), (B, "B")))
    if len({m.shape[1] for m in (X, Y, A, B)}) != 1:
        raise PretrainError(f"X, Y, A and B must have the same dimension, got "
                            f"{[m.shape[1] for m in (X, Y, A, B)]}")
    if len(X) != len(Y):
        raise PretrainError(f"X and Y must be of the same size (the permutation test partitions X u Y into "
                            f"equal halves), got {len(X)} and {len(Y)}")
    if permutations < 1:
        raise PretrainError(f"permutations must be >= 1, got {permutations}")
    n = len(X)
    s = _cosines(np.vstack([X, Y]), A).mean(1) - _cosines(np.vstack([X, Y]), B).mean(1)  # (2n,)
    sx, sy = s[:n], s[n:]
    statistic = float(sx.sum() - sy.sum())
    std = float(np.std(s, ddof=1)) if len(s) > 1 else 0.0
    effect = float((sx.mean() - sy.mean()) / std) if std > 1e-12 * max(1.0, float(np.abs(s).max())) else None

    # S(Xi, Yi) = 2 sum_{Xi} s - total: a partition's S exceeds the observed one iff its X-half sum does
    observed = float(sx.sum())
    tol = 1e-9 * max(1.0, float(np.abs(s).sum()))
    partitions = math.comb(2 * n, n)
    if partitions <= permutations:
        method = "exact"
        greater = 0
        combos = itertools.combinations(range(2 * n), n)
        while True:
            block = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, _CHUNK)), np.int64)
            if not block.size:
                break
            greater += int((s[block.reshape(-1, n)].sum(1) > observed + tol).sum())
        counted = partitions
        p = greater / partitions
    else:
        method = "sampled"
        rng = np.random.default_rng(seed)
        greater = 0
        for lo in range(0, permutations, _CHUNK):
            k = min(_CHUNK, permutations - lo)
            halves = rng.random((k, 2 * n)).argsort(1)[:, :n]
            greater += int((s[halves].sum(1) > observed + tol).sum())
        counted = permutations
        p = (1 + greater) / (1 + permutations)
    return {"effect_size": effect, "statistic": statistic, "p_value": float(p), "p_method": method,
            "permutations": int(counted), "partitions": int(partitions), "seed": seed if method == "sampled"
            else None, "mean_s_x": float(sx.mean()), "mean_s_y": float(sy.mean()), "std_s": std,
            "std_ddof": 1, "s_x": [float(v) for v in sx], "s_y": [float(v) for v in sy]}


# ----------------------------------------------------------------------------------------------------------
# the words file


def _word_sets(p: Path, spec: dict[str, Any], key: str) -> list[tuple[str, list[str]]]:
    sets = spec[key]
    if not isinstance(sets, dict):
        raise PretrainError(f"{p}: {key!r} must be an object of two named word lists, got "
                            f"{type(sets).__name__}; the format is {FORMAT}")
    if len(sets) != 2:
        named = f" ({', '.join(map(repr, sets))})" if sets else ""
        raise PretrainError(f"{p}: {key!r} must name exactly two sets, got {len(sets)}{named}; the format is "
                            f"{FORMAT}")
    out = []
    for name, words in sets.items():
        if not isinstance(words, list):
            raise PretrainError(f"{p}: {key}.{name} must be a list of words, got {type(words).__name__}")
        if not words:
            raise PretrainError(f"{p}: {key}.{name} is empty")
        clean = []
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w.strip():
                raise PretrainError(f"{p}: {key}.{name}[{i}] is {w!r}, not a word (a non-empty string)")
            w = w.strip()
            if w in clean:
                raise PretrainError(f"{p}: {key}.{name} lists {w!r} twice")
            clean.append(w)
        out.append((str(name), clean))
    return out


def read_words(path: str | Path) -> dict[str, Any]:
    """A WEAT words file (see :data:`FORMAT`) → {"targets": [(name, words), (name, words)],
    "attributes": [...], "templates": [...] or None}, checked: exactly two sets of each, no empty set, only
    non-empty strings, targets of equal size, no word in two sets, templates each holding one ``{}``."""
    p = Path(path)
    if not p.is_file():
        raise PretrainError(f"words file not found: {p}")
    try:
        spec = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PretrainError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise PretrainError(f"{p} must hold a JSON object: {FORMAT}")
    for key in ("targets", "attributes"):
        if key not in spec:
            raise PretrainError(f"{p} has no {key!r} key; the format is {FORMAT}")
    extra = sorted(set(spec) - {"targets", "attributes", "templates"})
    if extra:
        raise PretrainError(f"{p}: unknown key(s) {', '.join(map(repr, extra))} (it takes targets, "
                            "attributes and templates)")
    targets, attributes = _word_sets(p, spec, "targets"), _word_sets(p, spec, "attributes")
    (nx, x), (ny, y) = targets
    if len(x) != len(y):
        raise PretrainError(f"{p}: the target sets must be of the same size (the permutation test partitions "
                            f"their union into equal halves): {nx!r} has {len(x)} words, {ny!r} {len(y)}")
    seen: dict[str, str] = {}
    for key, sets in (("targets", targets), ("attributes", attributes)):
        for name, words in sets:
            for w in words:
                if w in seen:
                    raise PretrainError(f"{p}: {w!r} is in two sets, {seen[w]} and {key}.{name}: each word "
                                        "may belong to one set only")
                seen[w] = f"{key}.{name}"
    templates = spec.get("templates")
    if templates is not None:
        if not isinstance(templates, list) or not templates:
            raise PretrainError(f'{p}: "templates" must be a non-empty list of strings such as '
                                '"This is {}."')
        for i, t in enumerate(templates):
            if not isinstance(t, str) or t.count("{}") != 1:
                raise PretrainError(f'{p}: templates[{i}] is {t!r}: a template is a string with one "{{}}" '
                                    "where the word goes")
    return {"targets": targets, "attributes": attributes, "templates": templates}


# ----------------------------------------------------------------------------------------------------------
# on a run


def _word_vectors(model, tok, cfg, words: list[str], templates: list[str] | None, pooling: str,
                  batch_size: int, device) -> tuple[np.ndarray, int]:
    """(len(words), d) vectors: each word's ``embed`` vector, or the mean over ``templates`` of the
    sentence vectors; and the number of texts truncated to the context."""
    from pretrain.features import embed_texts

    tpl = templates or ["{}"]
    texts = [t.replace("{}", w) for w in words for t in tpl]
    v, truncated = embed_texts(model, tok, cfg, texts, pooling, False, batch_size, device)
    return v.reshape(len(words), len(tpl), -1).mean(1).astype(np.float64), truncated


def weat(run: str | Path, words_path: str | Path, device: str = "auto", pooling: str = "mean",
         permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """WEAT of a pre-trained text run (causal or masked LM; ELECTRA: its discriminator, as ``embed``) on the
    word sets of ``words_path`` (:func:`read_words`), with the run's ``embed`` vectors (``pooling`` as in
    ``pretrain embed``: mean, cls for encoders, last). JSON-able: the sets' names and sizes, effect size,
    p-value and how it was computed (:func:`weat_statistics`), each target word's association, the words
    split into several tokens and those with unknown tokens, the run, step, objective, pooling and the
    caveat."""
    from pretrain.checkpoint import CheckpointError, load_pretrained
    from pretrain.features import POOLINGS
    from pretrain.hardware import resolve_device

    spec = read_words(words_path)
    if pooling not in POOLINGS:
        raise PretrainError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    dev = resolve_device(device)
    try:
        model, cfg, tok, meta = load_pretrained(run, dev, part="encoder")  # as `pretrain embed` loads it
    except CheckpointError as e:
        raise PretrainError(f"{run} is not a pre-trained run: {e}") from None
    if tok is None:
        raise PretrainError(f"{run} is an image run: WEAT embeds words, it needs a text (causal or masked "
                            "LM) run")
    from pretrain.recommend import is_item_vocabulary

    if is_item_vocabulary(tok):
        raise PretrainError(f"{run} was trained on item sequences: WEAT embeds words, it needs a text "
                            "(causal or masked LM) run")
    objective = (meta.get("config") or {}).get("objective", cfg.objective)

    (nx, x), (ny, y) = spec["targets"]
    (na, a), (nb, b) = spec["attributes"]
    words = [*x, *y, *a, *b]
    vec, truncated = _word_vectors(model, tok, cfg, words, spec["templates"], pooling, batch_size, dev)
    i = np.cumsum([0, len(x), len(y), len(a), len(b)])
    stats = weat_statistics(vec[i[0]:i[1]], vec[i[1]:i[2]], vec[i[2]:i[3]], vec[i[3]:i[4]], permutations,
                            seed)
    pieces = {w: tok.encode(w, text_only=True) for w in words}
    split = [w for w in words if len(pieces[w]) > 1]
    unknown = [w for w in words if tok.unk_id is not None and tok.unk_id in pieces[w]]
    templates = spec["templates"]
    tpl_unknown = [t for t in templates or [] if tok.unk_id is not None
                   and tok.unk_id in tok.encode(t.replace("{}", ""), text_only=True)]
    s_x, s_y = stats.pop("s_x"), stats.pop("s_y")
    return {"suite": "weat", "run": str(run), "step": meta.get("step"), "objective": objective,
            "pooling": pooling, "words_file": str(words_path), "templates": templates,
            "targets": [{"name": nx, "size": len(x)}, {"name": ny, "size": len(y)}],
            "attributes": [{"name": na, "size": len(a)}, {"name": nb, "size": len(b)}],
            **stats,
            "associations": {nx: dict(zip(x, s_x)), ny: dict(zip(y, s_y))},
            "words": len(words), "words_split": split, "words_with_unknown_tokens": unknown,
            "templates_with_unknown_tokens": tpl_unknown, "truncated": truncated, "caveat": CAVEAT}


def _count(n: int) -> str:
    """An integer for reading: with thousands separators, or as d.dde+N when it is long."""
    d = str(n)
    return f"{n:,}" if len(d) <= 9 else f"{d[0]}.{d[1:3]}e+{len(d) - 1}"


def format_weat(res: dict[str, Any]) -> str:
    """A few readable lines of a :func:`weat` result."""
    (x, y), (a, b) = res["targets"], res["attributes"]
    tpl = res.get("templates")
    lines = [f"WEAT on {res['run']} (step {res['step']}, {res['objective']}, {res['pooling']} pooling, "
             + (f"words in {len(tpl)} template(s))" if tpl else "each word as its own text)"),
             f"targets {x['name']} ({x['size']}) vs {y['name']} ({y['size']}); attributes {a['name']} "
             f"({a['size']}) vs {b['name']} ({b['size']})"]
    d = res["effect_size"]
    if d is None:
        lines.append("effect size: undefined (every target word is equally associated with both attribute "
                     "sets)")
    else:
        closer = (f"{x['name']} closer to {a['name']} and {y['name']} to {b['name']}" if d >= 0 else
                  f"{x['name']} closer to {b['name']} and {y['name']} to {a['name']}")
        lines.append(f"effect size d = {d:+.3f} (in [-2, 2]: {closer}; |d| 0.2 / 0.5 / 0.8 small / "
                     "medium / large, Cohen)")
    how = (f"exact, over all {_count(res['partitions'])} equal-size partitions"
           if res["p_method"] == "exact" else
           f"{res['permutations']:,} random partitions of {_count(res['partitions'])}, seed {res['seed']}, "
           "observed counted once more")
    pv = (f"p < {1 / res['partitions']:.3g} (no partition beats the observed one; " if res["p_value"] == 0
          else f"p = {res['p_value']:.4g} (")
    lines.append(f"{pv}one-sided, that {x['name']} is closer to {a['name']} than "
                 f"{y['name']} is; {how})")
    unk = res["words_with_unknown_tokens"]
    lines.append(f"words split into several tokens: {len(res['words_split'])} of {res['words']}; with "
                 f"unknown tokens: {len(unk)}" + (f" ({', '.join(unk[:10])}{' ...' if len(unk) > 10 else ''})"
                                                  if unk else ""))
    if res.get("templates_with_unknown_tokens"):
        lines.append(f"templates with unknown tokens: {len(res['templates_with_unknown_tokens'])}")
    if res.get("truncated"):
        lines.append(f"texts truncated to the context: {res['truncated']}")
    lines.append(f"caveat: {res['caveat']}")
    return "\n".join(lines)
