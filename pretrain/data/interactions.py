"""User–item interaction logs → one item sequence per user, as token shards: items for words.

``pretrain prepare LOG --interactions`` reads a log (CSV / TSV / JSONL / JSON / Parquet; one row per
interaction: a user, an item, a time, optionally a rating), keeps what the filters allow, orders each user's
interactions by time (ties keep the order of the file), and writes a prepared directory the text trainer
reads as it is — a causal LM learns the next item (SASRec's task), a masked LM the masked ones (BERT4Rec's)::

    DATA_DIR/
      meta.json          "kind": "interactions"; tokenizer, dtype, splits (train / val / test), the
                         "interactions" report (users, items, filters and what they dropped), sources
      tokenizer.json     a WordLevel vocabulary: [PAD] [UNK] [MASK] <|endoftext|>, then every item id
                         (most interacted with first)
      train_000000.bin   each user's items but the last two, <|endoftext|> after each user
      val_000000.bin     each user's items but the last (its last item: the validation target)
      test_000000.bin    each user's items (the last: the test target)
      users.json         the user ids, in the order of the sequences in every split
      items.json         item metadata (title, genres, ...) from ``--items FILE``, when given

The split is leave-one-out, as SASRec (Kang & McAuley 2018) and BERT4Rec (Sun et al. 2019) evaluate: a
user's last item is the test target, the one before it the validation target, the rest train. Document k
of every split is user k. Filters apply in this order: ``min_rating`` (rows rated lower are dropped),
``min_item_count`` (items with fewer interactions left are dropped), ``min_user_items`` (users with fewer
interactions left are dropped; at least 3, so each keeps a training item). Written like every prepared
directory (data/manifest.py): inside ``.NAME.partial``, meta.json last, swapped into place, under a lock.
"""

from __future__ import annotations

import json
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.manifest import (
    FORMAT_VERSION,
    META,
    ShardWriter,
    check_prepared_out,
    load_meta,
    token_dtype,
    writing_prepared,
)
from pretrain.data.sources import DataError, column_error, expand_inputs, iter_records
from pretrain.data.tokenizer import EOT, Tokenizer
from pretrain.io import write_json_atomic

KIND = "interactions"
SPECIALS = ["[PAD]", "[UNK]", "[MASK]", EOT]
SPLITS = ("train", "val", "test")
HELD_OUT = {"train": 2, "val": 1, "test": 0}
"""Items at the end of each user's sequence that a split leaves out (leave-one-out)."""
MIN_USER_ITEMS = 3
USERS_FILE, ITEMS_FILE = "users.json", "items.json"


@dataclass
class Log:
    """The rows read from an interaction log, as parallel arrays (row order = file order)."""

    users: np.ndarray  # int64 codes into user_ids
    items: np.ndarray  # int64 codes into item_ids
    times: np.ndarray  # float64
    ratings: np.ndarray | None  # float64
    user_ids: list[str]
    item_ids: list[str]


def _number(value: Any, what: str, where: str) -> float:
    """A timestamp or rating as a float: numbers, numeric strings, datetimes (Parquet timestamps) only."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, date):
        return float(datetime(value.year, value.month, value.day).timestamp())
    if isinstance(value, bool):
        value = None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise DataError(f"{where}: {what} {value!r} is not a number (timestamps and ratings must be numeric: "
                        "Unix seconds, or any number that orders the interactions)")
    return x


def _key(value: Any, what: str, where: str) -> str:
    """A user or item id as text (ints stay ints: 31, not 31.0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = "" if value is None else str(value).strip()
    if not s:
        raise DataError(f"{where}: empty {what} id")
    return s


def read_log(inputs: list, user_column: str, item_column: str, time_column: str | None,
             rating_column: str | None) -> tuple[Log, list]:
    """Every row of the input files (in order) → a :class:`Log`, and the sources (their sha256 filled in).
    A missing column lists the present ones; a non-numeric time or rating names its row."""
    sources = expand_inputs(inputs)
    need = {user_column: "--user-column", item_column: "--item-column"}
    if time_column:
        need[time_column] = "--time-column"
    if rating_column:
        need[rating_column] = "--rating-column"
    # typed arrays, 8 bytes a value: a log of tens of millions of rows fits in a few hundred MB
    users, items, times, ratings = array("q"), array("q"), array("d"), array("d")
    user_code: dict[str, int] = {}
    item_code: dict[str, int] = {}
    for src in sources:
        if not hasattr(src, "path"):
            raise DataError("interaction logs are read from files (CSV, TSV, JSONL, JSON or Parquet), not "
                            "from the hub")
        if src.kind == "text":
            raise DataError(f"{src.path}: an interaction log must be a table (CSV, TSV, JSONL, JSON or "
                            "Parquet), not a text file")
        n = 0
        for n, row in enumerate(iter_records(src.path, src.kind, src=src), 1):
            where = f"{src.path}: row {n}"
            for col, flag in need.items():
                if col not in row:
                    raise column_error(src.path, col, list(row), flag)
            users.append(user_code.setdefault(_key(row[user_column], "user", where), len(user_code)))
            items.append(item_code.setdefault(_key(row[item_column], "item", where), len(item_code)))
            times.append(_number(row[time_column], f"time ({time_column})", where) if time_column
                         else float(len(times)))
            if rating_column:
                ratings.append(_number(row[rating_column], f"rating ({rating_column})", where))
        if n == 0:
            raise DataError(f"{src.path} has no rows")
        src.documents = n
    log = Log(np.array(users, np.int64), np.array(items, np.int64), np.array(times, np.float64),
              np.array(ratings, np.float64) if rating_column else None, list(user_code), list(item_code))
    return log, sources


def sequences_of(log: Log, min_rating: float | None, min_item_count: int, min_user_items: int,
                 ) -> tuple[list[np.ndarray], list[int], np.ndarray, dict[str, int]]:
    """Filter the log and order it: (per kept user, its item codes in time order; the kept users' codes in
    order of first appearance; the item codes of the vocabulary, most frequent first (ties: first seen
    first); counts of what each filter dropped)."""
    n = len(log.users)
    keep = np.ones(n, bool)
    dropped = {"rows": n}
    if min_rating is not None:
        keep &= log.ratings >= min_rating  # type: ignore[operator]
        dropped["below_min_rating"] = int(n - keep.sum())
    counts = np.bincount(log.items[keep], minlength=len(log.item_ids))
    rare = counts < min_item_count
    before = int(keep.sum())
    keep &= ~rare[log.items]
    dropped["rare_item_rows"] = before - int(keep.sum())
    dropped["rare_items"] = int(((counts > 0) & rare).sum())
    idx = np.flatnonzero(keep)
    per_user = np.bincount(log.users[idx], minlength=len(log.user_ids))
    short = (per_user > 0) & (per_user < min_user_items)
    dropped["short_users"] = int(short.sum())
    dropped["short_user_rows"] = int(per_user[short].sum())
    idx = idx[~short[log.users[idx]]]
    # users in order of first appearance; each user's rows by time, ties in file order
    first = np.full(len(log.user_ids), n, np.int64)
    np.minimum.at(first, log.users[idx], idx)
    order = idx[np.lexsort((idx, log.times[idx], first[log.users[idx]]))]
    users_sorted = log.users[order]
    cuts = np.flatnonzero(np.diff(users_sorted)) + 1
    seqs = np.split(log.items[order], cuts) if len(order) else []
    kept_users = [int(users_sorted[0])] + [int(users_sorted[c]) for c in cuts] if len(order) else []
    freq = np.bincount(log.items[order], minlength=len(log.item_ids))
    item_first = np.full(len(log.item_ids), n, np.int64)
    np.minimum.at(item_first, log.items[order], order)
    present = np.flatnonzero(freq)
    vocab = present[np.lexsort((item_first[present], -freq[present]))]
    return seqs, kept_users, vocab, dropped


def item_tokenizer(item_ids: list[str]) -> Tokenizer:
    """A WordLevel vocabulary: the special tokens, then ``item_ids`` (ids 4, 5, ...). Pre-tokenized on
    whitespace, so ``tok.encode("1 29 32")`` gives the ids of items 1, 29 and 32."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for it in item_ids:
        vocab[it] = len(vocab)
    tk = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(SPECIALS)
    return Tokenizer(tk, kind="items")


def read_item_metadata(path: str | Path, item_column: str, known: set[str]) -> tuple[dict[str, dict], list]:
    """``{item id: {column: value}}`` for the items in ``known``, from a table keyed by ``item_column``;
    the other columns kept as they are (text, numbers)."""
    (src,) = expand_inputs([str(path)])
    if src.kind == "text":
        raise DataError(f"{src.path}: item metadata must be a table (CSV, TSV, JSONL, JSON or Parquet)")
    out: dict[str, dict] = {}
    columns: list[str] = []
    for n, row in enumerate(iter_records(src.path, src.kind, src=src), 1):
        if item_column not in row:
            raise column_error(src.path, item_column, list(row), "--item-column (the id column both files "
                                                                 "share)")
        if n == 1:
            columns = [c for c in row if c != item_column]
        key = _key(row[item_column], "item", f"{src.path}: row {n}")
        if key in known and key not in out:
            out[key] = {c: row.get(c) for c in columns}
    src.documents = len(out)
    return {"id_column": item_column, "columns": columns, "items": out}, [src]


def prepare_interactions(inputs: list, out: str | Path, *, user_column: str = "user_id",
                         item_column: str = "item_id", time_column: str | None = "timestamp",
                         rating_column: str | None = None, min_rating: float | None = None,
                         min_item_count: int = 1, min_user_items: int = MIN_USER_ITEMS,
                         items: str | Path | None = None, licence: str = "", overwrite: bool = False,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Prepare an interaction log (see the module docstring); returns meta.json. ``time_column`` None (or
    empty): the rows are in time order already. ``rating_column`` is read only with ``min_rating`` (default
    column 'rating'). ``items``: a table of item metadata keyed by ``item_column``."""
    t0 = time.time()
    out = Path(out)
    if min_user_items < MIN_USER_ITEMS:
        raise DataError(f"--min-user-items must be at least {MIN_USER_ITEMS} (a training, a validation and "
                        f"a test item), not {min_user_items}")
    if min_item_count < 1:
        raise DataError(f"--min-item-count must be at least 1, not {min_item_count}")
    if min_rating is not None and not rating_column:
        rating_column = "rating"
    check_prepared_out(out, overwrite)  # (before reading: a refusal costs nothing)
    data, sources = read_log(inputs, user_column, item_column, time_column or None,
                             rating_column if min_rating is not None else None)
    seqs, kept_users, vocab, dropped = sequences_of(data, min_rating, min_item_count, min_user_items)
    if not seqs:
        raise DataError(
            f"no user left after filtering: {dropped['rows']:,} rows read"
            + (f", {dropped['below_min_rating']:,} rated below {min_rating}" if min_rating is not None
               else "")
            + (f", {dropped['rare_item_rows']:,} of items with fewer than {min_item_count} interactions"
               if min_item_count > 1 else "")
            + f", and {dropped['short_users']:,} users had fewer than {min_user_items} interactions left "
            "(loosen the filters)")
    item_ids = [data.item_ids[i] for i in vocab]
    tok = item_tokenizer(item_ids)
    token_of = np.zeros(len(data.item_ids), np.int64)
    token_of[vocab] = np.arange(len(SPECIALS), len(SPECIALS) + len(vocab))
    dtype = token_dtype(tok.vocab_size)
    meta_items = None
    n_logs = len(sources)  # the log files; after them, the item metadata file
    if items:
        meta_items, item_sources = read_item_metadata(items, item_column, set(item_ids))
        sources += item_sources
        missing = len(item_ids) - len(meta_items["items"])
        if missing:
            log(f"warning: {missing:,} of {len(item_ids):,} items have no row in {items}")
    with writing_prepared(out, overwrite, log) as partial:
        writers = {sp: ShardWriter(partial, sp, dtype, 100_000_000) for sp in SPLITS}
        eot = np.array([tok.eot_id], np.int64)
        for seq in seqs:
            ids = token_of[seq]
            for sp, w in writers.items():
                cut = len(ids) - HELD_OUT[sp]
                w.write(np.concatenate([ids[:cut], eot]))
                w.documents += 1
        splits = {sp: w.close() for sp, w in writers.items()}
        tok.save(partial / "tokenizer.json")
        write_json_atomic(partial / USERS_FILE, [data.user_ids[u] for u in kept_users])
        if meta_items is not None:
            write_json_atomic(partial / ITEMS_FILE, meta_items)
        n_rows = sum(len(s) for s in seqs)
        report = {"users": len(seqs), "items": len(item_ids), "interactions": n_rows,
                  "split": "leave-one-out (last item: test, second-to-last: validation, the rest: train)",
                  "user_column": user_column, "item_column": item_column, "time_column": time_column or None,
                  "rating_column": rating_column if min_rating is not None else None,
                  "min_rating": min_rating, "min_item_count": min_item_count,
                  "min_user_items": min_user_items, "dropped": dropped,
                  "users_file": USERS_FILE, "items_file": ITEMS_FILE if meta_items is not None else None}
        meta = {"format": FORMAT_VERSION, "kind": KIND,
                "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "vocab_size": tok.vocab_size,
                              "eot_id": tok.eot_id, "mask_id": tok.mask_id, "sha256": tok.sha256()},
                "dtype": dtype.name, "splits": splits, "interactions": report,
                "sources": [{**s.manifest(), "content": "interactions" if i < n_logs else "item metadata",
                             **({"licence": licence} if licence else {})} for i, s in enumerate(sources)],
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0, 3)}
        write_json_atomic(partial / META, meta)
    return meta


# ----------------------------------------------------------------------------------------------------------
# reading a prepared interactions directory


class Interactions:
    """A prepared interactions directory: its vocabulary, users, item metadata and per-split sequences."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.meta = load_meta(self.data_dir)
        if self.meta.get("kind") != KIND:
            raise DataError(f"{self.data_dir} holds no interactions (prepare a log with `pretrain prepare "
                            "LOG --interactions`)")
        self.tokenizer = Tokenizer.load(self.data_dir / self.meta["tokenizer"]["file"])
        self.users: list[str] = json.loads((self.data_dir / USERS_FILE).read_text(encoding="utf-8"))
        p = self.data_dir / ITEMS_FILE
        self.metadata: dict[str, Any] | None = (json.loads(p.read_text(encoding="utf-8")) if p.is_file()
                                                else None)
        self._seqs: dict[str, list[np.ndarray]] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def users_spread(self, max_users: int = 0) -> np.ndarray:
        """Indices of ``max_users`` users evenly spread over all of them (0, or at least as many: all)."""
        n = len(self.users)
        if 0 < max_users < n:
            return np.unique(np.linspace(0, n - 1, max_users).round().astype(np.int64))
        return np.arange(n)

    def held_out(self, split: str, users: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The leave-one-out pairs of ``split`` ('val' or 'test') for ``users`` (default: all): each user's
        history (the split's sequence but its last item) and its target (that last item)."""
        if split not in ("val", "test"):
            raise DataError(f"the held-out items are those of the val or test split, not {split!r}")
        seqs = self.sequences(split)
        users = np.arange(len(seqs)) if users is None else users
        return [seqs[u][:-1] for u in users], np.array([seqs[u][-1] for u in users], np.int64)

    def sequences(self, split: str) -> list[np.ndarray]:
        """Each user's item token ids in ``split`` (user k's at index k), int64, without the end token."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: one of {', '.join(SPLITS)}")
        if split not in self._seqs:
            from pretrain.data.loader import TokenSplit

            ts = TokenSplit(self.data_dir, split)
            ids = (np.concatenate([np.asarray(s) for s in ts.shards]) if ts.shards
                   else np.zeros(0, np.int64)).astype(np.int64)
            ends = np.flatnonzero(ids == self.tokenizer.eot_id)
            starts = np.concatenate([[0], ends[:-1] + 1])
            self._seqs[split] = [ids[a:b] for a, b in zip(starts, ends)]
            if len(self._seqs[split]) != len(self.users):
                raise DataError(f"{self.data_dir}: the {split} split has {len(self._seqs[split]):,} users, "
                                f"{USERS_FILE} {len(self.users):,}: the directory is corrupt")
        return self._seqs[split]
