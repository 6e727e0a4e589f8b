"""VQAv2 accuracy against hand-worked answers of the official tool's rules (vqaEval.py)."""
import pytest

from blip2_ds.eval.vqa_accuracy import (CONTRACTIONS, evaluate_vqa, leave_one_out_accuracy,
                                        normalize_prediction, process_punctuation, vqa_accuracy)


@pytest.mark.parametrize("raw, expected", [
    # whitespace: newline/tab -> space, then strip
    ("  Yes\n", "yes"),
    ("red\tcar", "red car"),
    # articles a/an/the dropped as whole words only
    ("The dog", "dog"),
    ("an apple", "apple"),
    ("a", ""),
    ("theater", "theater"),
    # number words -> digits, only zero..ten and 'none'
    ("Two", "2"),
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),
    ("one dog", "1 dog"),
    # contractions written without apostrophe are restored; with it they pass unchanged
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("don't", "don't"),
    # a digit,digit comma anywhere deletes every punctuation mark
    ("1,000", "1000"),
    ("1,000-2", "10002"),
    # a mark touching a space is deleted; one between letters becomes a space
    ("red, white", "red white"),
    ("red,white", "red white"),
    ("hot-dog", "hot dog"),
    ("what?!", "what"),
    # a period not followed by a digit is dropped; a decimal point stays
    ("yes.", "yes"),
    ("3.5", "3.5"),
    ("U.S.A.", "usa"),
    # ':' and "'" are not in the official list
    ("10:30", "10:30"),
])
def test_prediction_normalisation_follows_the_official_rules(raw, expected):
    assert normalize_prediction(raw) == expected


def test_period_stripping_stops_after_32_like_the_tool():
    # The tool hands re.UNICODE (32) to re.sub's count: 40 periods lose only 32.
    assert process_punctuation("." * 40 + "x") == "." * 8 + "x"


def test_the_full_official_contraction_map_is_present():
    assert len(CONTRACTIONS) == 120  # every entry of the tool's table
    assert CONTRACTIONS["youve"] == "you've" and CONTRACTIONS["y'allll"] == "y'all'll"


@pytest.mark.parametrize("matches, expected", [
    # 10 answers, `matches` of them equal to the prediction. Leaving out a matching annotator
    # leaves matches-1 of 9, leaving out another leaves matches; each subset scores min(k/3, 1).
    (0, 0.0),
    (1, 0.3),   # 1*(0/3) + 9*(1/3) = 3     -> 3/10
    (2, 0.6),   # 2*(1/3) + 8*(2/3) = 6     -> 6/10
    (3, 0.9),   # 3*(2/3) + 7*(3/3) = 9     -> 9/10
    (4, 1.0),   # 4*(3/3) + 6*min(4/3, 1) = 10
    (10, 1.0),
])
def test_partial_credit_over_leave_one_out_subsets(matches, expected):
    human = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", human) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_with_fewer_annotators():
    # 3 answers, 2 matching: out 1st match -> 1/3, out 2nd -> 1/3, out the other -> 2/3; mean 4/9.
    assert leave_one_out_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="at least one human answer"):
        leave_one_out_accuracy("cat", [])


def test_human_answers_get_only_punctuation_and_only_when_they_disagree():
    # Disagreeing answers: "yes." -> "yes", so all 10 match the prediction "yes".
    assert vqa_accuracy("yes", ["yes."] * 5 + ["yes"] * 5) == 1.0
    # Identical answers are left untouched by the tool: "yes." never equals "yes".
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # No number-word mapping on the human side (VQAv2 answers are stored as digits already).
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


ANNOTATIONS = [
    {"question_id": 1, "answer_type": "yes/no", "question_type": "is the",
     "answers": [{"answer": "yes", "answer_id": i + 1} for i in range(10)]},
    {"question_id": 2, "answer_type": "yes/no", "question_type": "is the",
     "answers": [{"answer": "yes"}] * 9 + [{"answer": "no"}]},
    {"question_id": 3, "answer_type": "number", "question_type": "how many",
     "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8},
    {"question_id": 4, "answer_type": "other", "question_type": "what color",
     "answers": [{"answer": "red car"}] * 3 + [{"answer": "car"}] * 7},
]
PREDICTIONS = {1: "Yes", 2: "no", 3: "two", 4: "A red car."}


def test_aggregation_per_question_and_per_answer_type():
    scores = evaluate_vqa(PREDICTIONS, ANNOTATIONS)
    # q1 "yes": 10 matches -> 100; q2 "no": 1 match -> 30; q3 "two"->"2": 2 matches -> 60;
    # q4 "A red car." -> "red car": 3 matches -> 90.
    assert scores.per_question == pytest.approx({1: 100.0, 2: 30.0, 3: 60.0, 4: 90.0})
    assert scores.overall == pytest.approx((100 + 30 + 60 + 90) / 4)  # 70
    assert scores.per_answer_type == pytest.approx(
        {"yes/no": (100 + 30) / 2, "number": 60.0, "other": 90.0})
    assert scores.per_question_type == pytest.approx(
        {"is the": 65.0, "how many": 60.0, "what color": 90.0})


def test_results_list_and_whole_annotation_file_give_the_same_scores():
    results = [{"question_id": qid, "answer": answer} for qid, answer in PREDICTIONS.items()]
    assert evaluate_vqa(results, {"annotations": ANNOTATIONS}) == evaluate_vqa(PREDICTIONS,
                                                                               ANNOTATIONS)


def test_mismatched_or_malformed_inputs_are_errors_not_zeros():
    with pytest.raises(ValueError, match=r"1 without a prediction \[4\].*1 not in the annotations \[99\]"):
        evaluate_vqa({1: "yes", 2: "no", 3: "2", 99: "x"}, ANNOTATIONS)
    with pytest.raises(ValueError, match="predicted more than once"):
        evaluate_vqa([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}],
                     ANNOTATIONS[:1])
    with pytest.raises(ValueError, match="annotated more than once"):
        evaluate_vqa({1: "yes"}, ANNOTATIONS[:1] * 2)
    with pytest.raises(ValueError, match="no human answers"):
        evaluate_vqa({1: "yes"}, [{"question_id": 1, "answers": []}])
    with pytest.raises(ValueError, match="str 'answer'"):
        evaluate_vqa({1: "yes"}, [{"question_id": 1, "answers": ["yes"]}])
    with pytest.raises(TypeError, match="must be a str"):
        evaluate_vqa({1: ["yes"]}, ANNOTATIONS[:1])
    with pytest.raises(ValueError, match="no annotations"):
        evaluate_vqa({}, [])
