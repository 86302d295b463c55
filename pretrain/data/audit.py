"""``pretrain data audit``: the provenance of a prepared directory, from its meta.json alone.

Every source with its licence (as recorded by ``prepare --licence``; "unknown", and flagged, when none was),
content hash, size and what it contributed (tokens per split for text; images for image data; rows for an
interaction log), what each cleaning step removed from it and the personal data found in it; then the
cleaning settings and totals. The same table goes into the export's model card (:func:`markdown`).

The unit per source: **tokens** (text; the end-of-document separator before a document counts for it, so
a split's sources add up to its total), **images** (image data) or **rows** (interaction logs: a user's
sequence can mix rows of several files, so tokens are given per split only). Directories prepared before
per-source tokens were recorded say so ("not recorded") instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.data.clean import STEPS
from pretrain.data.manifest import load_meta

UNKNOWN = "unknown"
OLDER = "not recorded (prepared by an older version)"
UNITS = {"text": "tokens", "images": "images", "interactions": "rows"}


def audit(data_dir: str | Path) -> dict[str, Any]:
    """The provenance report of a prepared directory (JSON-able); a :class:`pretrain.PretrainError` for a
    directory that is not prepared data or whose meta.json is missing or corrupt."""
    return audit_meta(load_meta(data_dir), str(data_dir))


def audit_meta(meta: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    """:func:`audit` of an already-read meta.json (the export reads it itself)."""
    kind = meta.get("kind") or "text"
    unit = UNITS.get(kind, "tokens")
    cleaning = meta.get("cleaning") if isinstance(meta.get("cleaning"), dict) else {}
    per_source = cleaning.get("per_source") or {}
    pii = cleaning.get("pii") if isinstance(cleaning.get("pii"), dict) else None
    pii_per = (pii or {}).get("per_source") or {}
    raw = [s for s in meta.get("sources") or [] if isinstance(s, dict)]
    names = [_name(s) for s in raw]
    if len(set(names)) < len(names):  # two files of one name in different folders: their paths
        names = [_key(s) for s in raw]
    sources = []
    for s, name in zip(raw, names):
        licence = s.get("licence") or (meta.get("licence") if kind == "images" else None)
        row: dict[str, Any] = {
            "source": name, "path": s.get("path"), "format": s.get("format"),
            "licence": licence or UNKNOWN, "licence_recorded": bool(licence),
            "sha256": s.get("sha256") or None,
            "bytes": s.get("bytes") if isinstance(s.get("bytes"), int) else None}  # (a Hub source has none)
        if s.get("format") == "hub":
            row.update(name=s.get("name"), config=s.get("config"), split=s.get("split"),
                       revision=s.get("resolved_revision") or s.get("revision"),
                       fingerprint=s.get("fingerprint"))
        if kind == "images":
            row["content"] = s.get("content", "images")
            row["images"] = s.get("images", 0)
        elif kind == "interactions":
            row["content"] = s.get("content", "interactions")
            row["rows"] = s.get("documents", 0)
        else:
            row["documents"] = s.get("documents", 0)
            tokens = s.get("tokens")
            row["tokens"] = dict(tokens) if isinstance(tokens, dict) else None
            key = _key(s)
            if key in per_source:
                counts = per_source[key]
                row["kept"] = counts.get("kept", 0)
                row["removed"] = {k: v for k, v in counts.items() if k in STEPS and v}
            if pii is not None:
                found = pii_per.get(key) or {}
                row["pii"] = {"documents": found.get("documents", 0),
                              "matches": {k: v for k, v in (found.get("matches") or {}).items() if v}}
        for k in ("weight", "group", "skipped"):
            if s.get(k) is not None and s.get(k) != "":
                row[k] = s[k]
        sources.append(row)

    out: dict[str, Any] = {"data_dir": data_dir, "kind": kind, "unit": unit, "sources": sources,
                           "splits": _splits(meta, kind), "flags": [], "notes": []}
    if kind == "text":
        out["cleaning"] = _cleaning(cleaning)
        if meta.get("mixture"):
            out["mixture"] = [{k: m.get(k) for k in ("input", "weight", "share", "sources", "tokens")}
                              for m in meta["mixture"]]
        if sources and any(r["tokens"] is None for r in sources):
            out["notes"].append(f"tokens per source: {OLDER}; the split totals are exact")
        if "settings" not in cleaning:
            out["notes"].append(f"cleaning settings: {OLDER}; what each step removed is recorded")
    elif kind == "images":
        skipped = meta.get("skipped") or []
        out["cleaning"] = {"skipped_unreadable": len(skipped),
                           "examples": [x.get("path") for x in skipped[:3] if isinstance(x, dict)]}
        if skipped:
            out["flags"].append({"flag": "images_skipped", "count": len(skipped),
                                 "message": f"{len(skipped):,} unreadable images were skipped"})
    else:
        rep = meta.get("interactions") or {}
        out["cleaning"] = {k: rep.get(k) for k in ("users", "items", "interactions", "min_rating",
                                                    "min_item_count", "min_user_items", "dropped")}
    unknown = [r["source"] for r in sources if not r["licence_recorded"]]
    if unknown:
        out["flags"].append({"flag": "licence_unknown", "sources": unknown,
                             "message": f"{len(unknown)} of {len(sources)} sources have no recorded licence "
                                        f"(unknown): {_listed(unknown)}; check their terms before using or "
                                        "sharing the model, and record it with `pretrain prepare --licence`"})
    bad = [r["source"] for r in sources if r.get("skipped")]
    if bad:
        out["flags"].append({"flag": "source_skipped", "sources": bad,
                             "message": f"{len(bad)} sources were skipped as unreadable: {_listed(bad)}"})
    if not sources:
        out["flags"].append({"flag": "no_sources", "message": "meta.json lists no sources"})
    out["totals"] = _totals(sources, kind, out["splits"])
    return out


def _listed(names: list[str], most: int = 10) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _key(s: dict[str, Any]) -> str:
    """The source's name in the cleaning report (its path, or ``hf:NAME[:CONFIG]``)."""
    if s.get("path"):
        return str(s["path"])
    return "hf:" + str(s.get("name", "?")) + (f":{s['config']}" if s.get("config") else "")


def _name(s: dict[str, Any]) -> str:
    return Path(s["path"]).name if s.get("path") else _key(s)


def _splits(meta: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    keys = ("images",) if kind == "images" else ("tokens", "documents", "bytes")
    return {sp: {k: info[k] for k in keys if isinstance(info.get(k), int)}
            for sp, info in (meta.get("splits") or {}).items() if isinstance(info, dict)}


def _cleaning(cleaning: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": cleaning.get("settings"), "kept": cleaning.get("kept"),
                           "removed": {k: {"documents": v.get("documents", 0), "bytes": v.get("bytes", 0)}
                                       for k, v in (cleaning.get("removed") or {}).items()}}
    if isinstance(cleaning.get("pii"), dict):
        p = cleaning["pii"]
        out["pii"] = {"mode": p.get("mode"), "documents": p.get("documents", 0),
                      "matches": p.get("matches") or {}}
    return out


def _totals(sources: list[dict[str, Any]], kind: str, splits: dict[str, Any]) -> dict[str, Any]:
    sizes = [r["bytes"] for r in sources]
    tot: dict[str, Any] = {"sources": len(sources),
                           "bytes": sum(sizes) if sizes and None not in sizes else None,
                           "licences": sorted({r["licence"] for r in sources})}
    if kind == "text":
        tot["documents"] = sum(r["documents"] for r in sources)
        tot["tokens"] = {sp: v.get("tokens", 0) for sp, v in splits.items()}
    elif kind == "images":
        tot["images"] = {sp: v.get("images", 0) for sp, v in splits.items()}
    else:
        tot["rows"] = sum(r["rows"] for r in sources if r["content"] == "interactions")
    return tot


# ------------------------------------------------------------------------------------------------ rendering


def table(rep: dict[str, Any], limit: int | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-source table, cells as text; ``limit``: at most that many sources (a last
    row says how many more)."""
    kind = rep["kind"]
    head = ["source", "licence", "sha256", "bytes"]
    if kind == "text":
        splits = list(rep["splits"]) or ["train", "val"]
        head += ["documents", "tokens (" + " / ".join(splits) + ")", "kept", "removed"]
        if rep.get("cleaning", {}).get("pii") is not None:
            head.append("personal data")
    elif kind == "images":
        head += ["content", "images"]
    else:
        head += ["content", "rows"]
    rows = []
    shown = rep["sources"] if limit is None else rep["sources"][:limit]
    for r in shown:
        licence = r["licence"] + ("" if r["licence_recorded"] else " (!)")
        cells = [r["source"], licence, _short(r), _n(r["bytes"])]
        if kind == "text":
            tok = r["tokens"]
            cells += [_n(r["documents"]),
                      " / ".join(_n(tok.get(sp, 0)) for sp in splits) if tok is not None else "not recorded",
                      _n(r["kept"]) if "kept" in r else "—",
                      ", ".join(f"{k} {v:,}" for k, v in r["removed"].items()) if r.get("removed") else
                      ("none" if "kept" in r else "—")]
            if "personal data" in head:
                p = r.get("pii") or {"documents": 0, "matches": {}}
                cells.append(_docs(p["documents"])
                             + (" (" + ", ".join(f"{k} {v:,}" for k, v in p["matches"].items()) + ")"
                                if p["matches"] else ""))
        elif kind == "images":
            cells += [r["content"], _n(r["images"])]
        else:
            cells += [r["content"], _n(r["rows"])]
        rows.append(cells)
    if limit is not None and len(rep["sources"]) > limit:
        rows.append([f"… {len(rep['sources']) - limit} more"] + [""] * (len(head) - 1))
    return head, rows


def summary(rep: dict[str, Any]) -> list[str]:
    """The lines under the table: splits, cleaning settings and totals, personal data, flags, notes."""
    kind, lines = rep["kind"], []
    unit = rep["unit"]
    parts = []
    for sp, v in rep["splits"].items():
        if kind == "images":
            parts.append(f"{sp} {v.get('images', 0):,} images")
        else:
            parts.append(f"{sp} {v.get('tokens', 0):,} tokens, "
                         + (f"{v.get('documents', 0):,} users" if kind == "interactions"
                            else _docs(v.get("documents", 0))))
    if parts:
        lines.append("splits: " + "; ".join(parts))
    c = rep.get("cleaning") or {}
    if kind == "text":
        lines.append("cleaning settings: " + (_settings(c["settings"]) if c.get("settings") else OLDER))
        kept = c.get("kept") or {}
        removed = c.get("removed") or {}
        lines.append(f"kept {_docs(kept.get('documents', 0))} ({kept.get('bytes', 0):,} bytes); removed: "
                     + (", ".join(f"{k} {v['documents']:,} ({v['bytes']:,} bytes)"
                                  for k, v in removed.items()) or "none"))
        if c.get("pii"):
            p = c["pii"]
            what = {"report": "found in kept documents (kept as they are)", "redact": "redacted",
                    "drop": "found (those documents dropped)"}.get(p["mode"], p["mode"])
            lines.append(f"personal data ({p['mode']}): {_docs(p['documents'])} {what}"
                         + "".join(f", {k} {v:,}" for k, v in p["matches"].items() if v))
        if rep.get("mixture"):
            lines.append("mixture: " + ", ".join(f"{m['input']} weight {m['weight']:g} ({m['share']:.0%})"
                                                  for m in rep["mixture"]))
    elif kind == "images":
        lines.append(f"cleaning: none (images are decoded as they are); {c.get('skipped_unreadable', 0):,} "
                     "unreadable images skipped")
    else:
        d = c.get("dropped") or {}
        lines.append(f"filters: min_rating {c.get('min_rating')}, min_item_count {c.get('min_item_count')}, "
                     f"min_user_items {c.get('min_user_items')}; dropped: "
                     + ", ".join(f"{k} {v:,}" for k, v in d.items() if k != "rows")
                     + f" (of {d.get('rows', 0):,} rows)")
    lines.append(f"unit per source: {unit}" + {
        "tokens": " per split (the end-of-document separator before a document counts for it)",
        "images": " (after skipping unreadable ones)",
        "rows": " read (interactions; an item metadata file: its items); tokens are per split only"}[unit])
    lines += ["warning: " + f["message"] for f in rep["flags"]]
    for n in rep["notes"]:
        lines.append("note: " + n)
    return lines


def render(rep: dict[str, Any]) -> str:
    """The audit as text: a header line, the table, then :func:`summary`."""
    t = rep["totals"]
    head, rows = table(rep)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    numeric = {i for i, h in enumerate(head) if h in ("bytes", "documents", "kept", "images", "rows")
               or h.startswith("tokens")}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    size = f", {t['bytes']:,} bytes" if t.get("bytes") is not None else ""
    out = [f"{rep['data_dir']}: {rep['kind']} data, {t['sources']} source{'s' * (t['sources'] != 1)}{size}, "
           f"licences: {', '.join(t['licences']) or '—'}", "", line(head), line(["-" * w for w in widths]),
           *map(line, rows), "", *summary(rep)]
    return "\n".join(out)


def markdown(rep: dict[str, Any], limit: int = 50) -> list[str]:
    """The audit as markdown lines (a table, then the summary as a list) for the model card."""
    head, rows = table(rep, limit)
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in esc), "", *(f"- {x}" for x in summary(rep))]


def _short(r: dict[str, Any]) -> str:
    sha = r.get("sha256")
    shas = sha if isinstance(sha, list) else [sha] if sha else []
    if shas:
        return ", ".join(h[:12] for h in shas[:3]) + (" …" if len(shas) > 3 else "")
    if r.get("revision"):
        return f"rev {str(r['revision'])[:12]}"
    if r.get("fingerprint"):
        return f"fingerprint {str(r['fingerprint'])[:12]}"
    return "—"


def _docs(n: int) -> str:
    return f"{n:,} document" + "s" * (n != 1)


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else "—"


def _settings(s: dict[str, Any]) -> str:
    """The cleaning settings in words: only the steps that were on."""
    on = [f"Unicode {s['normalize']}" if s.get("normalize") else "no Unicode normalisation"]
    if s.get("strip_control"):
        on.append("control characters stripped")
    for k, what in (("min_chars", "min_chars"), ("max_chars", "max_chars"),
                    ("max_symbol_ratio", "max symbol ratio"), ("min_alpha_ratio", "min alpha ratio"),
                    ("max_repeated_line_ratio", "max repeated-line ratio")):
        if s.get(k):
            on.append(f"{what} {s[k]:g}")
    on.append("exact dedup " + ("on" if s.get("dedup_exact") else "off"))
    near = s.get("near_dup_threshold")
    on.append(f"near-dup threshold {near:g}" if near else "near-dup off")
    if s.get("decontaminate"):
        on.append(f"decontaminated against {', '.join(map(str, s['decontaminate']))} "
                  f"({s.get('ngram')}-grams of {', '.join(s.get('decontaminate_fields') or [])})")
    else:
        on.append("no decontamination")
    on.append(f"personal data {s['pii']}" if s.get("pii") else "personal data not checked")
    return ", ".join(on)
