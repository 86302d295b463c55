"""Personal data: e-mail addresses, phone numbers, IP addresses (v4 and v6) and payment-card numbers, found by
regular expressions with checks, for ``prepare --pii report|redact|drop`` (see clean.py).

Precision matters as much as recall: ordinary numbers (dates, years, prices, versions, times, scores,
numbers with thousands separators, ids) must not be flagged, so each type needs a recognisable shape.
Everything is ASCII (``[0-9]`` is the ASCII digits; NFKC, if asked for, maps full-width digits first).
``(?<!X)`` / ``(?!X)`` below mean "not preceded / followed by X"; ``\\w`` is a Unicode word character.

``email``
    ``local@domain.tld``: local part 1-64 of ``[A-Za-z0-9._%+-]``, not preceded by ``\\w``, ``.``, ``%``,
    ``+`` or ``-``; domain
    labels of ``[A-Za-z0-9-]`` (starting and ending alphanumeric, at most 63), dot-separated, then a
    2-24 letter top-level domain; not followed by ``[A-Za-z0-9_-]`` or by ``.`` + alphanumeric.
``ip_address`` (IPv4)
    four dot-separated decimal octets 0-255 without leading zeros (``10.0.0.1``, not ``10.00.0.1``), not
    preceded by ``\\w`` or ``.`` and not followed by ``\\w`` or ``.`` + digit: no part of a longer dotted
    sequence (``1.2.3.4.5``) or number. A four-part version number whose parts are all <= 255
    (``version 1.2.3.4``) has this shape too; ``v1.2.3.4`` does not (preceded by a letter).
``ip_address`` (IPv6)
    2-8 colon-separated groups of 0-4 hex digits (``::`` compression, an IPv4 tail allowed), not preceded
    by ``\\w``, ``:`` or ``.`` nor followed by ``\\w``, ``:`` or ``.`` + digit, that Python's
    ``ipaddress.IPv6Address`` accepts, with at least two non-empty groups, one of them of 3+ characters,
    and at least one digit (so times ``12:30:45``, ``::``, ``a::b`` and ``dead::beef`` are not addresses).
``card``
    13-19 digits starting with 2-6 (the major industry identifiers of payment cards: Mastercard 2/5, Amex,
    Diners and JCB 3, Visa 4, Discover, Maestro and UnionPay 6: ISBN-13s, which start 978/979, and
    millisecond timestamps never do), passing the Luhn check, written either contiguously or in groups
    separated by one space or one dash, the same throughout: 4-4-4-N(-M) (N 1-4, M 1-3) or 4-6-4/5
    (Amex, Diners). Not preceded by ``\\w``, ``.``, ``,``, ``/``, ``-``; not followed by ``\\w`` or by
    ``.``/``,``/``/``/``-`` or the group separator + digit.
``phone``
    one of (7-15 digits in all):

    - international: ``+`` then a country code and digits (``+14155552671``), then up to 7 groups of
      digits each after one separator (space, ``.``, ``-``) or a bracketed area code (``+44 (0)20 7946
      0958``, ``+1 (555) 123-4567``, ``+33 1 42 68 53 00``): 8-15 digits, not preceded by ``\\w`` or
      ``+``;
    - North-American: ``(NNN) NNN-NNNN`` (separators optional, any of space/``.``/``-``) and
      ``NNN-NNN-NNNN`` / ``NNN.NNN.NNNN`` / ``NNN NNN NNNN`` (the same separator twice);
    - national with a trunk 0: ``0NN[N[N]] NNN[N] NNN[N]`` (space or dash, e.g. ``020 7946 0958``) and
      ``(0NN[N[N]]) NNN[N] NNN[N]``;

    not preceded by ``\\w``, ``.``, ``+``, ``-`` (or ``/``, ``,``); not followed by ``\\w`` or ``.``/``-``
    + digit (nor, for the space-separated shapes, space + digit). A bare digit run is never a phone
    number, nor is a 7-digit local ``555-1234`` (ranges such as ``100-1000`` look the same).

Matching is one left-to-right scan of one combined regular expression (the types tried in the order
above at each position); a candidate that fails its check (Luhn, digit count, ipaddress) is skipped whole.

Cutting a text for redaction slice by slice (prepare.py's long documents): no match, rejected candidate or
lookaround contains or inspects a whitespace character other than a plain space, or a space that is not
between ``[0-9)]`` and ``[0-9(]``; every lookaround is negative and sees such a whitespace character as it
sees the end of the text. So the matches of ``text[:p]`` and ``text[p:]`` are those of ``text`` whenever
``text[p]`` is such a character (:func:`safe_cut`), and redacting the two pieces gives the redacted text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

TYPES = ("email", "phone", "ip_address", "card")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "card": "<CARD>"}
EXAMPLE_CHARS = 64  # of a matched string kept as an example

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_EMAIL = (r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@"
          r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
          r"(?![A-Za-z0-9_-]|\.[A-Za-z0-9])")
_IPV6 = rf"(?<![\w:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_IPV4}|[0-9A-Fa-f]{{1,4}})?(?![\w:]|\.[0-9])"
_IPV4_FULL = rf"(?<![\w.]){_IPV4}(?!\w|\.[0-9])"
_CARD = (r"(?<![\w.,/-])(?:"
         r"[2-6][0-9]{12,18}(?!\w|[.,/-][0-9])"
         r"|[2-6][0-9]{3}(?P<cs>[ -])[0-9]{4}(?P=cs)[0-9]{4}(?P=cs)[0-9]{1,4}(?:(?P=cs)[0-9]{1,3})?"
         r"(?!\w|[.,/-][0-9]|(?P=cs)[0-9])"
         r"|[2-6][0-9]{3}(?P<ca>[ -])[0-9]{6}(?P=ca)[0-9]{4,5}(?!\w|[.,/-][0-9]|(?P=ca)[0-9]))")
_PHONE = (r"(?<![\w.+/,-])(?:"
          # international: +CC..., then groups after one separator or a bracketed area code
          r"\+[1-9][0-9]*+(?:(?:[ .-]?\([0-9]{1,4}\)[ .-]?|[ .-])[0-9]++){0,7}(?!\w|[.-][0-9])"
          # (NNN) NNN-NNNN, (0NN) NNNN NNNN
          r"|\((?:[0-9]{3}|0[0-9]{1,4})\)[ .-]?[0-9]{3,4}[ .-]?[0-9]{3,4}(?!\w|[.-][0-9]| [0-9])"
          # NNN-NNN-NNNN, NNN.NNN.NNNN, NNN NNN NNNN
          r"|[0-9]{3}(?P<ps>[ .-])[0-9]{3}(?P=ps)[0-9]{4}(?!\w|[.-][0-9]| [0-9])"
          # 0NN NNNN NNNN (trunk prefix)
          r"|0[0-9]{2,4}(?P<ts>[ -])[0-9]{3,4}(?P=ts)[0-9]{3,4}(?!\w|[.-][0-9]| [0-9]))")

# every type starts after a non-word character: one shared check first (4-5x faster than each alternative's)
_ALL = re.compile(rf"(?<!\w)(?:(?P<email>{_EMAIL})|(?P<ipv6>{_IPV6})|(?P<ipv4>{_IPV4_FULL})|(?P<card>{_CARD})"
                  rf"|(?P<phone>{_PHONE}))")
_NO_EMAIL = re.compile(rf"(?<!\w)(?:(?P<ipv6>{_IPV6})|(?P<ipv4>{_IPV4_FULL})|(?P<card>{_CARD})"
                       rf"|(?P<phone>{_PHONE}))")
_DIGIT = re.compile(r"[0-9]")
_NOT_DIGIT = re.compile(r"[^0-9]")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
_TYPE_OF_PLACEHOLDER = {p: t for t, p in PLACEHOLDERS.items()}
# a whitespace character no match contains or looks across (see the module docstring)
_SAFE = re.compile(r"[^\S ]|(?<![0-9)]) | (?=[^0-9(])")


def luhn(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits (payment cards, IMEIs)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6_ok(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    groups = [g for g in s.split(":") if g]
    return len(groups) >= 2 and max(map(len, groups)) >= 3 and _DIGIT.search(s) is not None


def _iter(text: str) -> Iterator[tuple[str, int, int]]:
    has_at = "@" in text
    if not has_at and _DIGIT.search(text) is None:  # every type but e-mail holds a digit
        return
    for m in (_ALL if has_at else _NO_EMAIL).finditer(text):
        kind = m.lastgroup
        s = m.group()
        if kind == "email":
            yield "email", m.start(), m.end()
        elif kind == "ipv4":
            yield "ip_address", m.start(), m.end()
        elif kind == "ipv6":
            if _ipv6_ok(s):
                yield "ip_address", m.start(), m.end()
        else:
            digits = _NOT_DIGIT.sub("", s)
            if kind == "card":
                if 13 <= len(digits) <= 19 and luhn(digits):
                    yield "card", m.start(), m.end()
            elif (8 if s[0] == "+" else 7) <= len(digits) <= 15:
                yield "phone", m.start(), m.end()


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(type, start, end) of every match in ``text``, in order (types: :data:`TYPES`)."""
    return list(_iter(text))


def count(text: str) -> dict[str, int]:
    """Matches per type in ``text`` (every type present; nothing but the counts is kept)."""
    out = dict.fromkeys(TYPES, 0)
    for kind, _, _ in _iter(text):
        out[kind] += 1
    return out


def redact(text: str) -> tuple[str, dict[str, int]]:
    """``text`` with each match replaced by its placeholder (:data:`PLACEHOLDERS`), and the matches per
    type. ``text`` itself when nothing matches."""
    counts = dict.fromkeys(TYPES, 0)
    parts: list[str] = []
    last = 0
    for kind, a, b in _iter(text):
        parts += [text[last:a], PLACEHOLDERS[kind]]
        counts[kind] += 1
        last = b
    if not parts:
        return text, counts
    parts.append(text[last:])
    return "".join(parts), counts


def count_placeholders(text: str) -> dict[str, int]:
    """Placeholders per type in a redacted text (a placeholder already in the input counts too)."""
    out = dict.fromkeys(TYPES, 0)
    if "<" in text:
        for m in _PLACEHOLDER.finditer(text):
            out[_TYPE_OF_PLACEHOLDER[m.group()]] += 1
    return out


def examples(text: str, limit: int = 3) -> dict[str, list[str]]:
    """Up to ``limit`` matched strings per type (each cut to EXAMPLE_CHARS characters), in text order."""
    out: dict[str, list[str]] = {}
    for kind, a, b in _iter(text):
        got = out.setdefault(kind, [])
        if len(got) < limit:
            got.append(text[a:b][:EXAMPLE_CHARS])
    return out


def safe_cut(text: str, lo: int, hi: int) -> int:
    """The last position ``p`` in [lo, hi), ``p >= 1``, before which ``text`` can be cut for redaction (the
    matches of both sides are those of the whole: see the module docstring), or -1 if there is none. Only
    ``text[p - 1:p + 2]`` is looked at."""
    best = -1
    for m in _SAFE.finditer(text, max(lo, 1), hi):
        best = m.start()
    return best
