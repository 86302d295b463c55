"""prepare --interactions: one item sequence per user in time order, the leave-one-out split, the item
vocabulary, filters and what they drop, item metadata, and clear errors for bad logs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pretrain.cli import main
from pretrain.data.interactions import SPECIALS, Interactions, prepare_interactions
from pretrain.data.sources import DataError

# three users, rows out of order; u1 has two items at the same time (t=5: b before c in the file)
LOG = """user,item,ts,stars
u1,a,1,5
u2,a,3,4
u1,b,5,4
u1,c,5,3
u2,d,1,2
u3,a,9,5
u1,d,2,5
u2,b,2,5
u3,e,1,1
u3,b,4,4
"""


COLS = {"user_column": "user", "item_column": "item", "time_column": "ts"}


def write(path, text):
    path.write_text(text)
    return path


def items_of(data: Interactions, split: str) -> list[list[str]]:
    return [[data.tokenizer.tk.id_to_token(int(i)) for i in s] for s in data.sequences(split)]


def test_leave_one_out_on_a_hand_made_log(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    meta = prepare_interactions([log], tmp_path / "d", **COLS,
                                log=lambda m: None)
    data = Interactions(tmp_path / "d")
    assert data.users == ["u1", "u2", "u3"]  # order of first appearance
    # by time; u1's tie at t=5 keeps the file's order (b, then c)
    assert items_of(data, "test") == [["a", "d", "b", "c"], ["d", "b", "a"], ["e", "b", "a"]]
    assert items_of(data, "val") == [["a", "d", "b"], ["d", "b"], ["e", "b"]]
    assert items_of(data, "train") == [["a", "d"], ["d"], ["e"]]
    # vocabulary: the specials, then items by frequency (a 3, b 3, d 2, c 1, e 1; ties: first seen first)
    vocab = [data.tokenizer.tk.id_to_token(i) for i in range(data.vocab_size)]
    assert vocab == [*SPECIALS, "a", "b", "d", "c", "e"]
    assert data.tokenizer.encode("a b e") == [4, 5, 8]
    rep = meta["interactions"]
    assert (rep["users"], rep["items"], rep["interactions"]) == (3, 5, 10)
    assert meta["kind"] == "interactions" and set(meta["splits"]) == {"train", "val", "test"}
    assert meta["splits"]["train"]["documents"] == 3 and meta["splits"]["train"]["tokens"] == 4 + 3
    assert meta["sources"][0]["sha256"]


def test_filters_count_what_they_drop(tmp_path):
    log = write(tmp_path / "log.csv", LOG + "u4,a,1,5\nu4,b,2,5\nu4,c,3,5\nu4,f,4,1\n")
    meta = prepare_interactions([log], tmp_path / "d", **COLS,
                                min_rating=3, rating_column="stars", min_item_count=2, log=lambda m: None)
    d = meta["interactions"]["dropped"]
    # rated < 3: u2 d (2), u3 e (1), u4 f (1) → 3 rows; counts left: a 4, b 4, c 2, d 1 (u1) → d's row goes
    assert d["rows"] == 14 and d["below_min_rating"] == 3
    assert (d["rare_items"], d["rare_item_rows"]) == (1, 1)
    # left: u1 a,b,c  u2 b,a  u3 a,b  u4 a,b,c → u2 and u3 have 2 < 3 items
    assert (d["short_users"], d["short_user_rows"]) == (2, 4)
    data = Interactions(tmp_path / "d")
    assert data.users == ["u1", "u4"]
    assert items_of(data, "test") == [["a", "b", "c"], ["a", "b", "c"]]


def test_item_metadata_is_kept_for_the_vocabulary(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    items = write(tmp_path / "items.csv",
                  'item,title,genres\na,Alpha,X|Y\nb,"Beta, the",Y\nz,Zed,Z\nc,Gamma,X\n')
    msgs: list[str] = []
    prepare_interactions([log], tmp_path / "d", **COLS,
                         items=items, log=msgs.append)
    md = json.loads((tmp_path / "d" / "items.json").read_text())
    assert md["columns"] == ["title", "genres"]
    assert md["items"] == {"a": {"title": "Alpha", "genres": "X|Y"},
                           "b": {"title": "Beta, the", "genres": "Y"},
                           "c": {"title": "Gamma", "genres": "X"}}  # z is not in the log
    assert any("2 of 5 items have no row" in m for m in msgs)


def test_jsonl_and_parquet_logs_give_the_same_sequences(tmp_path):
    rows = [dict(zip(["user", "item", "ts", "stars"], line.split(","))) for line in LOG.split()[1:]]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({**r, "ts": int(r["ts"])}) + "\n" for r in rows))
    pq.write_table(pa.table({"user": [r["user"] for r in rows], "item": [r["item"] for r in rows],
                             "ts": [int(r["ts"]) for r in rows]}), tmp_path / "log.parquet")
    write(tmp_path / "log.csv", LOG)
    got = []
    for name in ("log.csv", "log.jsonl", "log.parquet"):
        prepare_interactions([tmp_path / name], tmp_path / name.replace(".", "_"), user_column="user",
                             item_column="item", time_column="ts", log=lambda m: None)
        got.append(items_of(Interactions(tmp_path / name.replace(".", "_")), "test"))
    assert got[0] == got[1] == got[2]


def test_cli_prepare_interactions(tmp_path, capsys):
    log = write(tmp_path / "log.csv", LOG)
    assert main(["prepare", str(log), "--interactions", "--user-column", "user", "--item-column", "item",
                 "--time-column", "ts", "--out", str(tmp_path / "d"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["users"], res["items"], res["interactions"]) == (3, 5, 10)
    # again without --overwrite: refused, the directory kept
    assert main(["prepare", str(log), "--interactions", "--user-column", "user", "--item-column", "item",
                 "--time-column", "ts", "--out", str(tmp_path / "d")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # options of other kinds of input are errors, not ignored
    assert main(["prepare", str(log), "--interactions", "--user-column", "user", "--item-column", "item",
                 "--vocab-size", "100", "--out", str(tmp_path / "e")]) == 2
    assert "--vocab-size applies to text inputs only" in capsys.readouterr().err
    assert main(["prepare", str(log), "--user-column", "user", "--out", str(tmp_path / "e")]) == 2
    assert "--user-column applies to interaction logs" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "no column 'item_id'; columns present: user, item, ts, stars (choose one with "
                "--item-column)"),
    ("timestamp", "row 2: time (ts) 'yesterday' is not a number"),
    ("rating", "row 1: rating (stars) 'five' is not a number"),
    ("nobody", "no user left after filtering: 10 rows read, and 3 users had fewer than 5 interactions"),
    ("text", "must be a table"),
    ("empty", "has no rows"),
])
def test_bad_logs_are_one_clear_error(tmp_path, case, message):
    log = tmp_path / ("log.txt" if case == "text" else "log.csv")
    text = {"timestamp": LOG.replace("u2,a,3,4", "u2,a,yesterday,4"),
            "rating": LOG.replace("u1,a,1,5", "u1,a,1,five"), "empty": "user,item,ts,stars\n"}.get(case, LOG)
    write(log, text)
    kw = dict(user_column="user", item_column="item", time_column="ts", log=lambda m: None)
    if case == "missing":
        kw.pop("item_column")
    if case == "rating":
        kw.update(min_rating=3, rating_column="stars")
    if case == "nobody":
        kw.update(min_user_items=5)
    with pytest.raises(DataError) as e:
        prepare_interactions([log], tmp_path / "d", **kw)
    assert message in str(e.value)
    assert not (tmp_path / "d").exists()


def test_time_column_empty_keeps_file_order(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    prepare_interactions([log], tmp_path / "d", user_column="user", item_column="item", time_column=None,
                         log=lambda m: None)
    assert items_of(Interactions(tmp_path / "d"), "test")[0] == ["a", "b", "c", "d"]


def test_shards_are_the_text_format(tmp_path):
    """The trainer reads an interactions directory as token shards: documents end with <|endoftext|>."""
    from pretrain.data.loader import TokenSplit

    prepare_interactions([write(tmp_path / "log.csv", LOG)], tmp_path / "d", user_column="user",
                         item_column="item", time_column="ts", log=lambda m: None)
    ids = np.asarray(TokenSplit(tmp_path / "d", "val").shards[0])
    assert ids.tolist() == [4, 6, 5, 3, 6, 5, 3, 8, 5, 3]
