"""The sliding-window baseline for extractive question answering (Rajpurkar et al. 2016, SQuAD, §5).

No training and no model: lexical overlap between the question and the context picks an answer span. It is
the shallow arm of QA transfer — what a fine-tuned encoder has to beat. SQuAD's paper reports it at 13.2 EM /
20.2 F1 on the SQuAD v1.1 dev set (with a constituency parser's constituents as candidates).

The method, as the paper describes it, with the substitutes this module uses:

1. **Candidate answers.** The paper takes every constituent of the context's constituency parses. There is no
   parser here; the substitute is a shallow chunker: a candidate is a maximal run of consecutive *content
   words* inside one sentence — words that are neither stopwords (:data:`STOPWORDS`) nor content words of
   the question — a run longer than ``max_words`` being cut into pieces of ``max_words``. Stopwords,
   punctuation and the question's own words end a run, so candidates are the noun-phrase-like stretches
   between them ("Pittsburgh Steelers", "23–16", "17 seconds"), and an answer never repeats what the
   question already says. (All spans of up to ``max_words`` words with content words at both ends and no
   question word scored 5.5 EM / 17.5 F1 on the 927 training questions of bench/qa.py's XQuAD split against
   10.9 / 19.9 for these chunks: they tie on overlap and the window score, and their edges are arbitrary.)
   Tokens are words (letters, digits and combining marks, with inner ``' ’ -``; numbers keep inner
   ``. , : / - –``: "1,000", "23–16") and single punctuation characters, each with its character span in
   the context; words match after NFC normalisation and lower-casing; a sentence ends after ``. ! ?``
   when the next token does not start with a lower-case letter (and, for a full stop, does not end an
   initial or a title: "U.S.", "Dr.").
2. **Sentence overlap.** For each candidate, the unigram + bigram overlap between the question and the
   candidate's sentence *with the candidate removed*: the number of distinct question content words in the
   rest of the sentence plus the number of distinct question bigrams there that hold a content word
   (lower-cased, punctuation skipped, no bigram across the removed candidate). Only the candidates with the
   maximal overlap are kept.
3. **Sliding-window tie-break** (Richardson et al. 2013, MCTest): each word *w* of the context weighs
   IC(w) = log(1 + 1 / count of *w* in the context). A candidate's score is the best, over the windows of
   |question words| + |candidate words| consecutive context words that contain the candidate, of the summed
   IC of the window's words outside the candidate that occur in the question (stopwords included, as in
   MCTest; their IC is small). Remaining ties go to the candidate closest (in words) to an occurrence of a
   question content word outside it (the paper's distance extension), then to the shorter one, then to the
   earlier one — so the answer is deterministic.

If no candidate exists (a context made of question words and stopwords), every single word is one; a
context without a word token answers ``("", 0)``.

On bench/qa.py's dev split (12 XQuAD articles, 263 questions) it scores 11.0 EM / 19.7 F1 (SQuAD v1.1
metrics; 10.9 / 19.9 on its 927 training questions), in 0.2 s.

The answer is always a slice of the context: ``context[start:start + len(text)] == text``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what
when where which while who whom whose why will with would you your yours yourself yourselves
""".split())
"""Function words (question words included): never the first or last word of a candidate, never a content
word of the question."""

_WC = r"[\w\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]"
"""A word character: letters, digits, underscore and combining marks (so a decomposed "é" stays whole)."""
_TOKEN = re.compile(rf"\d+(?:[.,:/\-–]\d+)*{_WC}*|{_WC}+(?:['’\-]{_WC}+)*|[^\w\s]")
_SENTENCE_END = frozenset(".!?")
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs etc no gen col lt rev prof".split())
"""Words after which a full stop does not end a sentence (as single letters: "U.S.", "J. R. R. Tolkien")."""


@dataclass(frozen=True)
class _Tok:
    text: str
    low: str
    start: int
    end: int
    word: bool


def _tokens(text: str) -> list[_Tok]:
    """Words and punctuation characters with their character spans; ``low`` (what is matched) is the NFC
    form, lower-cased, so a decomposed and a precomposed "é" are one word."""
    out = []
    for m in _TOKEN.finditer(text):
        t = m.group()
        low = unicodedata.normalize("NFC", t).lower()
        out.append(_Tok(t, low, m.start(), m.end(), re.match(_WC, t) is not None))
    return out


def _sentences(toks: list[_Tok]) -> list[tuple[int, int]]:
    """(first, last + 1) token index of each sentence."""
    spans, begin = [], 0
    for i, t in enumerate(toks):
        if t.text in _SENTENCE_END:
            nxt = toks[i + 1].text if i + 1 < len(toks) else ""
            prev = toks[i - 1] if i else None
            abbreviation = (t.text == "." and prev is not None and prev.word and prev.end == t.start
                            and (len(prev.text) == 1 or prev.low in _ABBREVIATIONS))
            if not nxt or (not nxt[0].islower() and not abbreviation):
                spans.append((begin, i + 1))
                begin = i + 1
    if begin < len(toks):
        spans.append((begin, len(toks)))
    return spans


def _bigrams(words: list[str]) -> set[tuple[str, str]]:
    return set(zip(words, words[1:]))


def sliding_window_answer(question: str, context: str, max_words: int = 10) -> tuple[str, int]:
    """(answer text exactly as it appears in ``context``, its character start in ``context``): the span the
    sliding-window baseline picks (see the module docstring); ``max_words``: longest candidate, in words."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    toks = _tokens(context)
    words_at = [i for i, t in enumerate(toks) if t.word]  # token index of each context word
    if not words_at:
        return "", 0
    word_no = {ti: k for k, ti in enumerate(words_at)}  # token index -> word index
    q_words = [t.low for t in _tokens(question) if t.word]
    q_set = set(q_words)
    q_content = {w for w in q_set if w not in STOPWORDS}
    q_bigrams = {g for g in _bigrams(q_words) if g[0] in q_content or g[1] in q_content}

    counts: dict[str, int] = {}
    for ti in words_at:
        counts[toks[ti].low] = counts.get(toks[ti].low, 0) + 1
    # prefix sums over context words of IC(w) where w is a question word, for O(1) window sums
    prefix = [0.0]
    for ti in words_at:
        w = toks[ti].low
        prefix.append(prefix[-1] + (math.log(1.0 + 1.0 / counts[w]) if w in q_set else 0.0))
    content_pos = [k for k, ti in enumerate(words_at) if toks[ti].low in q_content]

    def content(t: _Tok) -> bool:
        return t.word and t.low not in STOPWORDS and t.low not in q_content

    sentences = _sentences(toks)
    cands = []  # (sentence number, first token, last token + 1): runs of content words, cut to max_words
    for s, (b, e) in enumerate(sentences):
        i = b
        while i < e:
            if not content(toks[i]):
                i += 1
                continue
            j = i + 1
            while j < e and j - i < max_words and content(toks[j]):
                j += 1
            cands.append((s, i, j))
            i = j
    if not cands:  # relaxed: every word
        cands = [(s, i, i + 1) for s, (b, e) in enumerate(sentences) for i in range(b, e) if toks[i].word]

    def overlap(s: int, i: int, j: int) -> int:
        b, e = sentences[s]
        left = [t.low for t in toks[b:i] if t.word]
        right = [t.low for t in toks[j:e] if t.word]
        uni = (set(left) | set(right)) & q_content
        return len(uni) + len((_bigrams(left) | _bigrams(right)) & q_bigrams)

    scored = [(overlap(s, i, j), s, i, j) for s, i, j in cands]
    best = max(o for o, *_ in scored)
    finalists = [(s, i, j) for o, s, i, j in scored if o == best]
    width_q = len(q_words)

    def key(c: tuple[int, int, int]) -> tuple[float, int, int, int]:
        _, i, j = c
        a, last = word_no[i], word_no[j - 1]  # a candidate is words only
        n_c = last - a + 1
        width = width_q + n_c
        inside = prefix[last + 1] - prefix[a]
        sw = 0.0
        for ws in range(max(0, last + 1 - width), a + 1):  # windows [ws, ws + width) holding [a, last]
            we = min(len(words_at), ws + width)
            sw = max(sw, prefix[we] - prefix[ws] - inside)
        dist = min((a - p if p < a else p - last for p in content_pos if p < a or p > last),
                   default=len(words_at))
        return (-round(sw, 9), dist, n_c, i)

    _, i, j = min(finalists, key=key)
    start, end = toks[i].start, toks[j - 1].end
    return context[start:end], start


def sliding_window_predict(questions: list[str], contexts: list[str],
                           max_words: int = 10) -> list[tuple[str, int]]:
    """:func:`sliding_window_answer` of each (question, context) pair, in order."""
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    return [sliding_window_answer(q, c, max_words) for q, c in zip(questions, contexts)]
