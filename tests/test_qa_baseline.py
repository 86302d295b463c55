"""The sliding-window QA baseline (pretrain.finetune.qa_baseline): the sentence of highest overlap wins, the
window breaks ties, answers are exact slices of the context (Unicode, odd whitespace), runs are
deterministic, and the degenerate inputs answer instead of failing."""

from __future__ import annotations

import random

import pytest

from pretrain.finetune.qa_baseline import STOPWORDS, sliding_window_answer, sliding_window_predict


def check_slice(context: str, answer: tuple[str, int]) -> None:
    text, start = answer
    assert context[start:start + len(text)] == text


def test_the_sentence_of_highest_overlap_is_chosen():
    # the first sentence shares 2 question words + 1 bigram, the second 4 + 4 bigrams; the sliding window
    # alone would pick "1901": its window runs on into "The Eiffel Tower in Paris"
    context = ("A smaller tower in Lyon was completed 1901. The Eiffel Tower in Paris, designed over many "
               "long months by a team of engineers and builders, was completed only in 1889.")
    question = "When was the Eiffel Tower in Paris completed?"
    text, start = sliding_window_answer(question, context)
    check_slice(context, (text, start))
    assert start > context.index("The Eiffel") and text != "1901"
    # one overlapping sentence each: the question decides which
    context = ("The tower in Lyon was completed in 1901 by Gaston Ferrand. "
               "The Eiffel Tower in Paris was completed in 1889 by engineers.")
    assert sliding_window_answer(question, context) == ("1889", context.index("1889"))
    swapped = ("The Eiffel Tower in Paris was completed in 1889 by engineers. "
               "The tower in Lyon was completed in 1901 by Gaston Ferrand.")
    assert sliding_window_answer(question, swapped) == ("1889", swapped.index("1889"))
    text, _ = sliding_window_answer("Who completed the tower in Lyon?", context)
    assert text in ("1901", "Gaston Ferrand")


def test_the_window_breaks_ties_within_a_sentence():
    # one sentence, so one overlap for every candidate; only "Amelia Earhart" has question words on both
    # sides within its window (flying solo ... crossed the Atlantic): 4 of them, 3 for "1932" and "Ocean"
    context = "Flying solo in 1932, Amelia Earhart crossed the Atlantic Ocean and landed at Culmore."
    text, start = sliding_window_answer("Who crossed the Atlantic flying solo?", context)
    assert (text, start) == ("Amelia Earhart", context.index("Amelia"))


def test_answers_never_repeat_question_words_nor_edge_on_stopwords_or_punctuation():
    context = ("Denver Broncos defeated the Carolina Panthers 24–10 to earn their third Super Bowl title. "
               "The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California.")
    for q in ("Who did the Denver Broncos defeat?", "Where was the game played?",
              "What was the score of the game?", "When was the game played?"):
        text, start = sliding_window_answer(q, context)
        check_slice(context, (text, start))
        words = [w.lower() for w in text.replace(",", " ").split()]
        q_content = {w.strip("?").lower() for w in q.split()} - STOPWORDS
        assert not set(words) & q_content
        assert words[0] not in STOPWORDS and words[-1] not in STOPWORDS
        assert text == text.strip() and text[0].isalnum() and text[-1].isalnum()
    assert sliding_window_answer("What was the score of the game?", context)[0] != "2016"


def test_offsets_are_exact_in_unicode_and_whitespace_heavy_contexts():
    # NBSP, tabs, blank lines, a decomposed ü (u + U+0308), non-Latin letters, emoji
    context = "The caffè   Mu\u0308ller\u00a0was founded\n\n by Ænid Ōta-Smith.\tIt  serves 🥐 crêpes."
    text, start = sliding_window_answer("Who founded caffè Müller?", context)  # precomposed ü
    assert (text, start) == ("Ænid Ōta-Smith", context.index("Ænid"))
    check_slice(context, (text, start))
    rng = random.Random(0)
    pool = ["Zürich", "naïve", "Ōta", "e\u0301te\u0301", "δέλτα", "Москва", "東京", "1,000", "23–16", "the",
            "of", "river", "built", "O’Neil", "well-known", "🥐", ",", ".", "(", ")", "\"", "$5"]
    seps = [" ", "  ", "\t", "\n", "\n\n", "\u00a0", "\u2009", "\r\n"]
    for _ in range(300):
        n = rng.randint(0, 40)
        ctx = rng.choice(["", " ", "\n"]) + "".join(rng.choice(pool) + rng.choice(seps) for _ in range(n))
        q = " ".join(rng.choice(pool) for _ in range(rng.randint(0, 8))) + "?"
        text, start = sliding_window_answer(q, ctx, max_words=rng.randint(1, 6))
        check_slice(ctx, (text, start))
        assert text == text.strip()
        assert 0 <= start <= len(ctx)


def test_max_words_bounds_the_answer():
    context = "Members included Alpha Beta Gamma Delta Epsilon Zeta Eta Theta Iota Kappa Lambda Mu Nu."
    for k in (1, 3, 10):
        text, start = sliding_window_answer("Who were the members?", context, max_words=k)
        check_slice(context, (text, start))
        assert 1 <= len(text.split()) <= k
    with pytest.raises(ValueError, match="max_words"):
        sliding_window_answer("Who?", context, max_words=0)


def test_degenerate_contexts_still_answer():
    assert sliding_window_answer("Who?", "") == ("", 0)
    assert sliding_window_answer("Who?", " \n\t.,;!? ") == ("", 0)
    # every word is a question word or a stopword: the relaxed rule still gives a word of the context
    context = "The river of the river."
    text, start = sliding_window_answer("Which river?", context)
    check_slice(context, (text, start))
    assert text in ("The", "river", "of", "the")


def test_deterministic_and_batch_equals_one_by_one():
    context = ("Oxygen is a chemical element with symbol O and atomic number 8. It is a member of the "
               "chalcogen group on the periodic table and is a highly reactive nonmetal. Oxygen was "
               "discovered by Carl Wilhelm Scheele in Uppsala in 1773 and independently by Joseph Priestley "
               "in 1774.")
    questions = ["What is the atomic number of oxygen?", "Who discovered oxygen in Uppsala?",
                 "In what year did Priestley discover oxygen?", "What group is oxygen in?"]
    contexts = [context] * len(questions)
    first = sliding_window_predict(questions, contexts)
    assert first == sliding_window_predict(questions, contexts)
    assert first == [sliding_window_answer(q, c) for q, c in zip(questions, contexts)]
    assert sliding_window_predict(questions[::-1], contexts) == first[::-1]  # no state between questions
    for ans in first:
        check_slice(context, ans)
    with pytest.raises(ValueError, match="contexts"):
        sliding_window_predict(questions, contexts[:1])
    assert sliding_window_predict([], []) == []
