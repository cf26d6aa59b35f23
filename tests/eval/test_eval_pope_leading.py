"""POPE's leading-query variant: the leading forms suggest the chosen answer, and the LQCD neutraliser maps them
back to the standard question exactly."""

from __future__ import annotations

import pytest

from attnzoo.eval.pope import PopeQuestion, build_questions, leading_questions, question_text
from attnzoo.mitigation import neutralize_query

IMAGES = {"a.jpg": ["apple", "dog", "umbrella"], "b.jpg": ["cat", "orange", "bus"], "c.jpg": ["kite", "elephant",
                                                                                                 "car"]}


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_leading_questions_round_trip_through_the_neutraliser(split):
    questions = build_questions(IMAGES, split, num_per_image=2)
    for toward in ("wrong", "right", "yes", "no"):
        leading = leading_questions(questions, toward)
        assert [(q.question_id, q.image, q.label, q.object) for q in leading] == \
               [(q.question_id, q.image, q.label, q.object) for q in questions]
        for q, lq in zip(questions, leading):
            assert lq.text != q.text
            assert neutralize_query(lq.text) == q.text


def test_leading_direction_and_article():
    yes = PopeQuestion(1, "a.jpg", question_text("apple"), "yes", object="apple")
    no = PopeQuestion(2, "a.jpg", question_text("dog"), "no")  # object parsed from the text
    wrong = leading_questions([yes, no])
    assert [q.text for q in wrong] == ["There isn't an apple in the image, is there?",
                                       "There is a dog in the image, isn't there?"]
    right = leading_questions([yes, no], toward="right")
    assert [q.text for q in right] == ["There is an apple in the image, isn't there?",
                                       "There isn't a dog in the image, is there?"]
    assert leading_questions([yes, no], toward="yes")[1].text == "There is a dog in the image, isn't there?"


def test_leading_refuses_unknown_forms():
    with pytest.raises(ValueError, match="toward = 'maybe' is not one of"):
        leading_questions([], toward="maybe")
    odd = PopeQuestion(3, "a.jpg", "What color is the car?", "yes")
    with pytest.raises(ValueError, match="question 3 .* is not of the form"):
        leading_questions([odd])
