"""VQAv2 accuracy exactly as the official evaluation tool computes it (GT-Vision-Lab/VQA, vqaEval.py).

Published VQAv2 numbers (BLIP-2's included) come from that script, so every rule below follows it,
quirks included, rather than a "cleaner" normalisation that would shift scores:

* the prediction is cleaned (newline/tab -> space, strip), then punctuation is processed, then
  lower-cased with number words -> digits, articles dropped and apostrophe-less contractions restored;
* the human answers get **only** the punctuation step, and only when they are not all identical
  (VQAv2 annotation answers are already normalised, which is why the tool gets away with this);
* a prediction's accuracy is the mean, over the leave-one-out subsets of the annotators, of
  min(#annotators in the subset giving that answer / 3, 1).

One deliberate difference: the tool forms a leave-one-out subset by removing every answer *dict*
equal to the left-out one. VQAv2 answer dicts carry a unique ``answer_id``, so that removes exactly
one annotator; here the subsets are formed by position, which is the same on VQAv2 data and stays
right for annotations whose answer dicts carry nothing but ``answer``.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blip2_ds.eval import require_same_ids

# The official tables, kept verbatim (entries that can never match, such as the capitalised keys
# looked up after lower-casing, or the reversed "somebody'd", are the tool's and stay for parity).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Neither the apostrophe (it must survive for the contractions) nor ':' nor '.' is in the list.
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                                "-", ">", "<", "@", "`", ",", "?", "!")

_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The tool's pattern opens with "(?!<=\d)", a mistyped look-behind that is really a look-ahead and
# never fires (the next character is the period itself), so in effect: a period not followed by a
# digit. Written here as what it does.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The tool passes re.UNICODE (== 32) where re.sub takes ``count``, so at most 32 periods go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The tool's ``processPunctuation``.

    A punctuation mark touching a space somewhere in the text (or any mark at all, once the text
    holds a digit,digit comma such as "1,000") is deleted; otherwise it is replaced by a space, so
    "hot-dog" -> "hot dog" but "red, white" -> "red white" and "1,000" -> "1000". The test for
    each mark looks at the original text, not at the partly processed one, as the tool does.
    Then every period not followed by a digit is dropped ("u.s." -> "us", "3.5" stays).
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The tool's ``processDigitArticle``: lower-case, split on whitespace, number words -> digits,
    drop a/an/the, restore contractions written without their apostrophe ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_prediction(answer: str) -> str:
    """Everything the tool does to a predicted answer before comparing it with the human ones."""
    cleaned = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(cleaned))


def prepare_human_answers(answers: Sequence[str]) -> list[str]:
    """The tool's treatment of the human answers: punctuation only, and only if they disagree."""
    if len(set(answers)) > 1:
        return [process_punctuation(answer) for answer in answers]
    return list(answers)


def leave_one_out_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of min(matches / 3, 1), in [0, 1]; no normalisation."""
    if not human_answers:
        raise ValueError("VQA accuracy needs at least one human answer")
    matches = sum(answer == prediction for answer in human_answers)
    total = 0.0
    for answer in human_answers:
        matches_without_this_one = matches - (answer == prediction)
        total += min(matches_without_this_one / 3.0, 1.0)
    return total / len(human_answers)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one raw predicted answer against raw human answers (usually 10)."""
    return leave_one_out_accuracy(normalize_prediction(prediction),
                                  prepare_human_answers(human_answers))


@dataclass(frozen=True)
class VQAScores:
    """Accuracies in percent, like the tool, but unrounded (it rounds to 2 decimals for display).

    ``per_question_type`` only covers annotations that carry ``question_type`` and
    ``per_answer_type`` those that carry ``answer_type`` ("yes/no", "number", "other" on VQAv2).
    """

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[Any, float]


def evaluate_vqa(predictions: Mapping[Any, str] | Iterable[Mapping[str, Any]],
                 annotations: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> VQAScores:
    """Score predictions against VQAv2-style annotations.

    ``predictions``: question_id -> answer, or the tool's results format (a list of
    ``{"question_id": ..., "answer": ...}``). ``annotations``: the ``annotations`` list of a VQAv2
    annotation file (or the whole file's dict), each with ``question_id`` and ``answers`` (a list of
    ``{"answer": ...}``). The question ids must be the same on both sides, as the tool requires:
    a missing prediction is an error here, not a silent zero.
    """
    answers_by_id = _index_predictions(predictions)
    records = _index_annotations(annotations)
    require_same_ids(answers_by_id, records, "annotations", "question ids")

    per_question: dict[Any, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for question_id, record in records.items():
        human = [_answer_text(entry, question_id) for entry in record["answers"]]
        if not human:
            raise ValueError(f"question {question_id!r} has no human answers")
        accuracy = 100.0 * vqa_accuracy(answers_by_id[question_id], human)
        per_question[question_id] = accuracy
        if "answer_type" in record:
            by_answer_type[record["answer_type"]].append(accuracy)
        if "question_type" in record:
            by_question_type[record["question_type"]].append(accuracy)
    return VQAScores(overall=_mean(per_question.values()),
                     per_answer_type={kind: _mean(v) for kind, v in by_answer_type.items()},
                     per_question_type={kind: _mean(v) for kind, v in by_question_type.items()},
                     per_question=per_question)


def _index_predictions(predictions) -> dict[Any, str]:
    if isinstance(predictions, Mapping):
        indexed = dict(predictions)
    else:
        indexed = {}
        for result in predictions:
            question_id = result["question_id"]
            if question_id in indexed:
                raise ValueError(f"question {question_id!r} is predicted more than once")
            indexed[question_id] = result["answer"]
    for question_id, answer in indexed.items():
        if not isinstance(answer, str):
            raise TypeError(f"prediction for question {question_id!r} must be a str, "
                            f"got {type(answer).__name__}")
    return indexed


def _index_annotations(annotations) -> dict[Any, Mapping[str, Any]]:
    if isinstance(annotations, Mapping):
        if "annotations" not in annotations:
            raise ValueError("annotations: expected a list of annotation dicts or a VQAv2 "
                             "annotation file's dict with an 'annotations' key")
        annotations = annotations["annotations"]
    records: dict[Any, Mapping[str, Any]] = {}
    for record in annotations:
        question_id = record["question_id"]
        if question_id in records:
            raise ValueError(f"question {question_id!r} is annotated more than once")
        records[question_id] = record
    if not records:
        raise ValueError("no annotations to score against")
    return records


def _answer_text(entry: Any, question_id: Any) -> str:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("answer"), str):
        raise ValueError(f"question {question_id!r}: each human answer must be a dict with a str "
                         f"'answer', got {entry!r}")
    return entry["answer"]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)
