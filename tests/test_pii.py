"""Personal data (prepare --pii): every planted address and number found, in varied formats; ordinary numbers
(dates, prices, versions, years, times, ids, scores, Luhn-failing numbers, ISBNs) never; report, redact and
drop through `pretrain prepare`, the same in worker processes and through the long-document slicing path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _corpus import sentences
from conftest import _bins, quiet, read_split

from pretrain.cli import main
from pretrain.data import pii
from pretrain.data.clean import CleanConfig, Cleaner
from pretrain.data.prepare import prepare
from pretrain.data.sources import DataError
from pretrain.data.tokenizer import Tokenizer

PLANTED = {
    "email": ["john.doe@example.com", "j.smith+news@mail.example.co.uk", "ADMIN@Example.ORG",
              "first_last-99@sub-domain.example.io", "x@y.museum", "o.neil@example.com"],
    "phone": ["+1 (555) 123-4567", "+44 20 7946 0958", "+14155552671", "+33 1 42 68 53 00",
              "+49 (0)30 1234567", "+91-98765-43210", "(555) 123-4567", "(555)123-4567", "555-123-4567",
              "555.123.4567", "555 123 4567", "020 7946 0958", "(020) 7946 0958", "0161-496-0000"],
    "ip_address": ["192.168.1.1", "10.0.0.255", "8.8.8.8", "172.16.254.3", "255.255.255.0",
                   "2001:db8::1", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "fe80::1ff:fe23:4567:890a",
                   "::ffff:192.0.2.128", "2606:4700:4700::1111"],
    "card": ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "5555555555554444",
             "5105-1051-0510-5100", "378282246310005", "3782 822463 10005", "6011111111111117",
             "30569309025904", "4222222222222", "2223003122003222", "6011 0009 9013 9424"],
}
# (the card list holds a 13-digit Visa test number and a Discover number in 4-4-4-4 groups)

ORDINARY = [
    "2019-03-04", "04/03/2019", "03.04.2019", "1999", "in 2021 and 1987", "the 1990s", "$1,299.99", "€ 12.50",
    "USD 1,000,000", "1,234,567", "1 234 567", "12.345.678", "version 1.2.3", "v1.2.3.4", "Python 3.11.7",
    "1.2.3.4.5", "12:30", "12:30:45", "08:00-17:00", "3-1", "score 21-14", "a 2-0 win", "pages 123-456",
    "100-1000 people", "555-1234", "ISBN 978-0-306-40615-7", "9780306406157", "ISBN 0-306-40615-2",
    "4111111111111112", "1234567812345678", "1234 5678 1234 5678", "12345678901234567890", "1546300800000",
    "3.14159265358979", "256.1.1.1", "10.00.0.1", "1.2.3", "std::vector", "a::b", "dead::beef", "::",
    "2001:2002", "+1.5%", "+12.5 million", "+100,000", "-1234567", "123 456 789", "No. 12345",
    "id 987654321", "ZIP 90210", "call me at noon", "user at example dot com", "@handle", "a @-@ b",
    "1 @,@ 000", "3 @.@ 5", "x = 3.0e-10", "ratio 16:9", "John 3:16", "0.0.0.0.0", "section 2.1.3",
    "tel 2019.03.04", "mm/dd/yyyy", "#1234-5678", "(2019)", "(1990) 123 456", "Windows 10.0.19041.1",
]


def _isbn13_passing_luhn() -> str:
    """An ISBN-13 (valid check digit) that also passes Luhn: the two checksums differ, so about one in ten
    does; it starts 978, never a card's major industry identifier."""
    for n in range(978_000_000_000, 978_000_001_000):
        s = str(n)
        check = (10 - sum(int(c) * (1 if i % 2 == 0 else 3) for i, c in enumerate(s)) % 10) % 10
        if pii.luhn(s + str(check)):
            return s + str(check)
    raise AssertionError("none found")


def _contexts(s: str) -> list[str]:
    return [s, f"Contact: {s}.", f"({s})", f"write to {s}, or", f"<{s}>", f"line one\n{s}\nline three",
            f"said \"{s}\"", f"{s};"]


@pytest.mark.parametrize("kind", list(PLANTED))
def test_every_planted_item_is_found_whole(kind):
    for s in PLANTED[kind]:
        for text in _contexts(s):
            found = pii.find_pii(text)
            start = text.index(s)
            assert found == [(kind, start, start + len(s))], (kind, text, found)


def test_ordinary_numbers_are_not_personal_data():
    isbn = _isbn13_passing_luhn()
    assert pii.luhn(isbn)
    flagged = {s: pii.find_pii(t) for s in ORDINARY + [isbn, f"ISBN {isbn}"] for t in _contexts(s)
               if pii.find_pii(t)}
    assert not flagged
    prose = " ".join(sentences(200, seed=3)) + " In 2019 it cost $1,299.99 (about 1,100 euros) at 12:30."
    assert pii.find_pii(prose) == []


def test_luhn():
    assert pii.luhn("4111111111111111") and pii.luhn("79927398713") and pii.luhn("0")
    assert not pii.luhn("4111111111111112") and not pii.luhn("79927398710")
    for good in ["378282246310005", "6011111111111117", "5555555555554444"]:
        bad = good[:-1] + str((int(good[-1]) + 1) % 10)
        assert pii.find_pii(bad) == [] and pii.find_pii(good)[0][0] == "card"


def _dense_text() -> str:
    """Prose with every planted item and ordinary number, in lines and runs of spaces and digits."""
    parts = []
    items = [s for v in PLANTED.values() for s in v] + ORDINARY
    for i, s in enumerate(items):
        parts.append(" ".join(sentences(1, seed=i)) + (" " if i % 3 else "\n") + s + (" " if i % 2 else "  "))
    return "".join(parts) + " 12 34 56 (555) 123 4567, 7 8 9"


def test_redaction_of_pieces_cut_at_safe_places_is_the_whole_redaction():
    text = _dense_text()
    whole, counts = pii.redact(text)
    assert counts == {k: len(v) for k, v in PLANTED.items()} | {"phone": len(PLANTED["phone"]) + 1}
    cuts = [p for p in range(1, len(text)) if pii.safe_cut(text, p, p + 1) == p]
    assert len(cuts) > 500
    for p in cuts:
        assert pii.redact(text[:p])[0] + pii.redact(text[p:])[0] == whole, (p, text[p - 20:p + 20])
    assert pii.safe_cut(text, 1, len(text)) == cuts[-1]
    assert pii.safe_cut("555 123 4567", 0, 12) == -1  # no safe place inside a phone number
    assert pii.safe_cut("12345678", 0, 8) == -1


def test_placeholders_and_counts():
    text = "Mail a.b@example.com or call +1 555 123 4567 from 10.0.0.1 with 4111 1111 1111 1111."
    red, counts = pii.redact(text)
    assert red == "Mail <EMAIL> or call <PHONE> from <IP_ADDRESS> with <CARD>."
    assert counts == {"email": 1, "phone": 1, "ip_address": 1, "card": 1} == pii.count(text)
    assert pii.count_placeholders(red) == counts
    assert pii.redact("nothing here")[0] == "nothing here"
    assert pii.examples(text * 5, 2)["email"] == ["a.b@example.com", "a.b@example.com"]


def test_config_is_validated(tmp_path, capsys):
    with pytest.raises(DataError, match="personal-data mode"):
        CleanConfig(pii="mask")
    assert CleanConfig(pii="report").active() and not CleanConfig().active()
    (tmp_path / "x.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    assert main(["prepare", str(tmp_path / "x.csv"), "--interactions", "--pii", "report", "--out",
                 str(tmp_path / "o")]) != 0
    assert "--pii applies to text inputs only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- through prepare


def _corpus(folder) -> tuple[list[str], list[str], list[str]]:
    """One document per planted item (in varied places of the text) and as many clean ones with ordinary
    numbers. Returns (the planted items, the PII documents, the clean documents)."""
    folder.mkdir()
    items = [s for v in PLANTED.values() for s in v]
    dirty, clean = [], []
    for i, s in enumerate(items):
        prose = " ".join(sentences(4, seed=100 + i))
        where = i % 3
        doc = (f"{s} {prose}" if where == 0 else f"{prose} {s}" if where == 1
               else f"{prose[:40]} ({s}), {prose[40:]}")
        dirty.append(doc)
        clean.append(" ".join(sentences(4, seed=500 + i)) + " " + ORDINARY[i % len(ORDINARY)] + ".")
    for i, doc in enumerate(dirty + clean):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return items, dirty, clean


def _documents(d) -> list[str]:
    tok = Tokenizer.load(d)
    out = []
    for sp in ("train", "val"):
        ids = read_split(d, sp).tolist()
        doc: list[int] = []
        for t in ids + [tok.eot_id]:
            if t == tok.eot_id:
                out.append(tok.decode(doc)) if doc else None
                doc = []
            else:
                doc.append(t)
    return sorted(out)


def _prepare(tmp_path, corpus, name: str, mode: str, capsys, workers: int = 0) -> dict:
    assert main(["prepare", str(corpus), "--out", str(tmp_path / name), "--tokenizer", "byte", "--pii", mode,
                 "--workers", str(workers), "--json"]) == 0
    capsys.readouterr()
    return json.loads((tmp_path / name / "meta.json").read_text())


def test_report_redact_and_drop_through_prepare(tmp_path, capsys):
    items, dirty, clean = _corpus(tmp_path / "c")
    want = {k: len(v) for k, v in PLANTED.items()}

    meta = _prepare(tmp_path, tmp_path / "c", "report", "report", capsys)
    rep = meta["cleaning"]["pii"]
    assert rep["mode"] == "report" and rep["matches"] == want and rep["documents"] == len(dirty)
    assert sum(v["documents"] for v in rep["per_source"].values()) == len(dirty)
    assert all(1 <= len(rep["examples"][k]) <= 3 for k in PLANTED)
    assert all(e in items for v in rep["examples"].values() for e in v)
    assert _documents(tmp_path / "report") == sorted(dirty + clean)  # unchanged

    meta = _prepare(tmp_path, tmp_path / "c", "redact", "redact", capsys)
    rep = meta["cleaning"]["pii"]
    assert rep["matches"] == want and rep["documents"] == len(dirty)
    assert all(e in items for v in rep["examples"].values() for e in v)  # the originals, not placeholders
    docs = _documents(tmp_path / "redact")
    text = "\n".join(docs)
    assert not [s for s in items if s in text]
    assert {k: text.count(p) for k, p in pii.PLACEHOLDERS.items()} == want
    assert sorted(docs) == sorted([pii.redact(d)[0] for d in dirty] + clean)
    assert meta["cleaning"]["kept"]["documents"] == len(dirty) + len(clean)

    meta = _prepare(tmp_path, tmp_path / "c", "drop", "drop", capsys)
    rep = meta["cleaning"]
    assert rep["removed"]["pii"]["documents"] == len(dirty)
    assert rep["removed"]["pii"]["bytes"] == sum(len(d.encode()) for d in dirty)
    assert rep["pii"]["matches"] == want and rep["kept"]["documents"] == len(clean)
    assert sum(v["pii"] for v in rep["per_source"].values()) == len(dirty)
    assert _documents(tmp_path / "drop") == sorted(clean)

    for mode in ("report", "redact", "drop"):  # worker processes: the same shards and report
        meta2 = _prepare(tmp_path, tmp_path / "c", mode + "_pool", mode, capsys, workers=2)
        assert _bins(tmp_path / (mode + "_pool")) == _bins(tmp_path / mode), mode
        assert meta2["cleaning"] == json.loads((tmp_path / mode / "meta.json").read_text())["cleaning"]


@pytest.mark.parametrize("slice_chars", [7, 13, 40, 97, 400])
def test_long_document_redaction_is_the_whole_redaction(monkeypatch, slice_chars):
    from pretrain.data import prepare as prep

    monkeypatch.setattr(prep, "SLICE_CHARS", slice_chars)
    text = _dense_text()
    for cfg in (CleanConfig(pii="redact"), CleanConfig(pii="redact", normalize="NFKC")):
        c = Cleaner(cfg)
        for raw in (text, "ﬁ ５５５-１２３-４５６７ \x01" + text, "4111111111111111" * 30,
                    "555 123 4567 " * 20, "a@b.com " + "1 " * 100):
            assert prep._transform_long(c, raw) == c.transform(raw), raw[:40]
        for mode in ("report", "drop"):
            c = Cleaner(CleanConfig(pii=mode))
            assert prep._analyze(c, text) == c.analyze(text)


def test_long_documents_through_prepare_are_redacted_as_whole_ones(tmp_path, monkeypatch):
    """Documents over LONG_DOC_CHARS: normalised and redacted by the main process in slices, tokenized in
    pieces: the same shards and report as the whole-document path, in process and with workers."""
    from pretrain.data import encode
    from pretrain.data import prepare as prep

    corpus = tmp_path / "c"
    corpus.mkdir()
    dense = _dense_text()
    for i in range(4):
        (corpus / f"d{i}.txt").write_text(" ".join(sentences(30, seed=i)) + "\n" + dense[i * 300:],
                                          encoding="utf-8")
    (corpus / "short.txt").write_text("mail me: a@b.com " + " ".join(sentences(5, seed=9)), encoding="utf-8")
    clean = " ".join(sentences(80, seed=11)) + "\n" + " ; ".join(ORDINARY)  # long, with ordinary numbers only
    (corpus / "clean.txt").write_text(clean, encoding="utf-8")
    outs = {}
    for mode in ("redact", "report", "drop"):
        for name, long_chars, workers in (("whole", 1 << 22, 0), ("pieces", 2000, 0), ("pool", 2000, 2)):
            monkeypatch.setattr(prep, "LONG_DOC_CHARS", long_chars)
            monkeypatch.setattr(prep, "SLICE_CHARS", 90)
            monkeypatch.setattr(encode, "PIECE_CHARS", 300)
            d = tmp_path / f"{mode}_{name}"
            outs[name] = prepare([str(corpus)], d, tokenizer="byte", log=quiet, workers=workers,
                                 batch_chars=1000, clean=CleanConfig(pii=mode))
            assert _bins(d) == _bins(tmp_path / f"{mode}_whole"), (mode, name)
            # (the examples of a long document come from its first prepare.EXAMPLE_CHARS characters)
            got, want = outs[name]["cleaning"], outs["whole"]["cleaning"]
            assert ({**got, "pii": {**got["pii"], "examples": 0}}
                    == {**want, "pii": {**want["pii"], "examples": 0}}), (mode, name)
            assert all(set(v) <= set(PLANTED[k]) | {"a@b.com"} for k, v in got["pii"]["examples"].items())
        if mode == "redact":
            text = "\n".join(_documents(tmp_path / "redact_pieces"))
            assert "<EMAIL>" in text and "<CARD>" in text
            assert not [s for v in PLANTED.values() for s in v[1:] if s in text]
            assert outs["whole"]["cleaning"]["pii"]["documents"] == 5
        assert np.sum([v for v in outs["whole"]["cleaning"]["pii"]["matches"].values()]) > 40
        if mode == "drop":
            docs = _documents(tmp_path / "drop_pool")  # the one document left, cut at its text tail
            assert len(docs) == 2 and clean in (docs[0] + docs[1], docs[1] + docs[0])
