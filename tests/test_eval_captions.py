"""Caption metrics against hand-worked values and against pycocoevalcap's scorers called directly.

The hand-worked tests use ``pretokenized=True`` so they run without Java; the rest need `java`
(PTB tokenizer, METEOR) and skip with that reason when it is missing. METEOR's JVM takes several
seconds to load its paraphrase table, so one is started per module and shared.
"""
import math
import shutil
import subprocess
import threading

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor

from blip2_ds.eval import caption_metrics
from blip2_ds.eval.caption_metrics import caption_scores, ptb_tokenize

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="no `java` on PATH: pycocoevalcap's tokenizer and METEOR are Java")


def _approx(value):
    return pytest.approx(value, abs=1e-6)


# ---------------------------------------------------------------------------------------- BLEU

CAT_CANDIDATE = "the cat sat on the mat"
CAT_REFERENCES = ["the cat sat on a mat", "a cat is on the mat"]
# Clipped matches of the candidate against the two references (max count over references):
#   1-grams: the(2 in cand, max 1 in a ref) cat sat on mat            -> 5 of 6
#   2-grams: the cat, cat sat, sat on (ref 1); on the, the mat (ref 2) -> 5 of 5
#   3-grams: the cat sat, cat sat on (ref 1); on the mat (ref 2); not "sat on the" -> 3 of 4
#   4-grams: the cat sat on (ref 1); not "cat sat on the", "sat on the mat" -> 1 of 3
# Lengths 6 vs references 6 and 6: no brevity penalty.


def test_bleu_by_hand_single_image():
    scores = caption_scores({0: CAT_CANDIDATE}, {0: CAT_REFERENCES}, metrics=["BLEU"],
                            pretokenized=True)
    p1, p2, p3, p4 = 5 / 6, 5 / 5, 3 / 4, 1 / 3
    assert scores["Bleu_1"] == _approx(p1)
    assert scores["Bleu_2"] == _approx((p1 * p2) ** (1 / 2))
    assert scores["Bleu_3"] == _approx((p1 * p2 * p3) ** (1 / 3))
    assert scores["Bleu_4"] == _approx((p1 * p2 * p3 * p4) ** (1 / 4))
    assert scores["unavailable"] == {}


def test_bleu_brevity_penalty_uses_the_closest_reference_and_tiny_smoothing():
    # "the cat sat": 1..3-grams all match (3/3, 2/2, 1/1); it has no 4-gram at all, which
    # coco-caption scores as (0 + 1e-15) / (0 + 1e-9) = 1e-6 rather than 0 or 1.
    # Reference lengths 6 and 8: the closest to 3 is 6, so BP = exp(1 - 6/3) = e^-1.
    scores = caption_scores({0: "the cat sat"},
                            {0: ["the cat sat on the mat", "the cat sat on a red mat"]},
                            metrics=["BLEU"], pretokenized=True)
    bp = math.exp(-1)
    assert [scores[f"Bleu_{n}"] for n in (1, 2, 3)] == [_approx(bp)] * 3
    assert scores["Bleu_4"] == _approx(1e-6 ** (1 / 4) * bp)
    # A candidate between two reference lengths takes the shorter on a tie (|4-3| == |4-5|):
    # reflen 3 < 4 means no penalty, and all 1-grams match.
    tie = caption_scores({0: "a b c d"}, {0: ["a b c", "a b c d e"]}, metrics=["BLEU"],
                         pretokenized=True)
    assert tie["Bleu_1"] == _approx(1.0)


def test_bleu_corpus_score_pools_counts_over_images():
    # Image 0 as above (5/6, 5/5, 3/4, 1/3; lengths 6 vs 6) and image 1 "the cat sat" against
    # one 6-word reference (3/3, 2/2, 1/1, 0/0; lengths 3 vs 6). Pooled: 8/9, 7/7, 4/5, 1/3;
    # candidate length 9 vs reference length 12, BP = exp(1 - 12/9) = exp(-1/3).
    scores = caption_scores({0: CAT_CANDIDATE, 1: "the cat sat"},
                            {0: CAT_REFERENCES, 1: ["the cat sat on the mat"]},
                            metrics=["BLEU"], pretokenized=True)
    bp = math.exp(-1 / 3)
    p = [8 / 9, 7 / 7, 4 / 5, 1 / 3]
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == _approx(math.prod(p[:n]) ** (1 / n) * bp)


# ------------------------------------------------------------------------------------- ROUGE-L

def test_rouge_l_by_hand():
    # "a dog runs" vs "a big dog runs home": LCS "a dog runs" = 3, P = 3/3, R = 3/5.
    # F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.6 / (0.6 + 1.44) = 1.464 / 2.04.
    single = caption_scores({0: "a dog runs"}, {0: ["a big dog runs home"]}, metrics=["ROUGE_L"],
                            pretokenized=True)
    assert single["ROUGE_L"] == _approx(1.464 / 2.04)
    # coco-caption takes the best precision and the best recall over references separately:
    # "a dog" gives R = 2/2 and the reference above P = 3/3, so F = 1 though neither is exact.
    # The corpus score is the mean over images: (1 + 1.464/2.04) / 2.
    pair = caption_scores({0: "a dog runs", 1: "a dog runs"},
                          {0: ["a dog", "a big dog runs home"], 1: ["a big dog runs home"]},
                          metrics=["ROUGE_L"], pretokenized=True)
    assert pair["ROUGE_L"] == _approx((1.0 + 1.464 / 2.04) / 2)


# --------------------------------------------------------------------------------------- CIDEr

def test_cider_of_captions_equal_to_their_references():
    # Each caption equals all its references and shares no word with the other image, so every
    # n-gram has the same idf (log 2) in candidate and reference: each n-gram order with any
    # n-grams has cosine 1 and no length penalty. CIDEr-D = 10 * mean over n = 1..4:
    # 4 words -> 10 * 4/4 = 10; 3 words have no 4-gram -> 10 * 3/4 = 7.5. Mean 8.75.
    scores = caption_scores({0: "a b c d", 1: "e f g"},
                            {0: ["a b c d", "a b c d"], 1: ["e f g"]}, metrics=["CIDEr"],
                            pretokenized=True)
    assert scores["CIDEr"] == _approx((10.0 + 7.5) / 2)
    # n-grams found in every image's references get idf log(2/2) = 0 and count for nothing.
    shared = caption_scores({0: "x y", 1: "x y"}, {0: ["x y"], 1: ["x y"]}, metrics=["CIDEr"],
                            pretokenized=True)
    assert shared["CIDEr"] == _approx(0.0)


def test_cider_on_one_image_is_reported_unavailable_not_zero():
    scores = caption_scores({0: "a b"}, {0: ["a b"]}, metrics=["CIDEr"], pretokenized=True)
    assert scores["CIDEr"] is None
    assert "at least 2 images" in scores["unavailable"]["CIDEr"]


# ---------------------------------------------------- full pipeline (Java): tokenizer, METEOR

PREDICTIONS = {
    "img1": "A man riding a horse on the beach.",
    "img2": "Two dogs, playing in the grass!",
    "img3": "A red double-decker bus.",
}
REFERENCES = {
    "img1": ["A man rides a horse along the beach.", "A person on a brown horse near the sea."],
    "img2": ["Two dogs play in the grass.", "Dogs running on a green lawn."],
    "img3": ["A red double-decker bus on a street.", "A big red bus."],
}


@pytest.fixture(scope="module")
def meteor():
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: METEOR is a Java program")
    scorer = Meteor()
    yield scorer
    caption_metrics._stop_meteor(scorer)


@pytest.fixture(scope="module")
def full_run(meteor):
    scores = caption_scores(PREDICTIONS, REFERENCES, meteor=meteor)
    tokenized = ptb_tokenize({**REFERENCES, **{f"pred-{i}": [c] for i, c in PREDICTIONS.items()}})
    gts = {i: tokenized[i] for i in REFERENCES}
    res = {i: tokenized[f"pred-{i}"] for i in REFERENCES}
    return scores, gts, res


@needs_java
def test_ptb_tokenization_as_coco_caption_and_line_breaks_cannot_shift_captions():
    tokenized = ptb_tokenize({1: ["A man, riding a horse.", ""], 2: ["x\u2028y", "Don't\vstop"],
                              3: ["last"]})
    # Lower-cased, punctuation tokens gone, empty captions kept in place; U+2028 and \v would
    # otherwise end a line in the Java tokenizer and move every later caption to the wrong id.
    assert tokenized == {1: ["a man riding a horse", ""], 2: ["x y", "do n't stop"], 3: ["last"]}


@pytest.mark.slow
def test_full_pipeline_reports_every_metric_and_tokenizes_before_scoring(full_run):
    scores, gts, res = full_run
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr",
                           "SPICE", "unavailable"}
    assert gts["img3"] == ["a red double-decker bus on a street", "a big red bus"]
    assert res["img2"] == ["two dogs playing in the grass"]
    # The same tokenized text through pycocoevalcap's CIDEr scorer directly.
    assert scores["CIDEr"] == _approx(Cider().compute_score(gts, res)[0])
    assert 0 < scores["Bleu_1"] < 1 and 0 < scores["ROUGE_L"] < 1


@pytest.mark.slow
def test_meteor_matches_pycocoevalcap_called_directly(full_run, meteor):
    scores, gts, res = full_run
    assert scores["METEOR"] == _approx(meteor.compute_score(gts, res)[0])
    assert 0 < scores["METEOR"] < 1


@pytest.mark.slow
def test_meteor_of_a_perfect_match_is_one(meteor):
    refs = {0: ["a man riding a horse"], 1: ["two dogs play in the grass"]}
    scores = caption_scores({i: r[0] for i, r in refs.items()}, refs, metrics=["METEOR"],
                            pretokenized=True, meteor=meteor)
    assert scores["METEOR"] > 0.99


# ----------------------------------------------------------------- unavailability and errors

def test_spice_without_its_jars_is_unavailable_and_nothing_is_downloaded(monkeypatch, tmp_path):
    monkeypatch.setattr(caption_metrics._spice_models, "SPICEDIR", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("SPICE's model download must never be attempted")

    monkeypatch.setattr(caption_metrics._spice_models, "urlretrieve", no_network)
    monkeypatch.setattr(caption_metrics, "Spice", no_network)
    monkeypatch.setattr(caption_metrics, "_require_java", lambda what: None)
    scores = caption_scores({0: "a b"}, {0: ["a b"]}, metrics=["SPICE", "BLEU"], pretokenized=True)
    assert scores["SPICE"] is None and scores["Bleu_1"] == _approx(1.0)
    reason = scores["unavailable"]["SPICE"]
    assert "Stanford CoreNLP" in reason and str(tmp_path) in reason
    assert set(scores["unavailable"]) == {"SPICE"}


def test_without_java_only_the_pure_python_metrics_run(monkeypatch):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    refs = {0: ["a b c d"], 1: ["e f g h"]}
    preds = {0: "a b c d", 1: "e f g h"}
    scores = caption_scores(preds, refs, pretokenized=True)
    assert scores["METEOR"] is None and scores["SPICE"] is None
    assert "java" in scores["unavailable"]["METEOR"] and "java" in scores["unavailable"]["SPICE"]
    assert scores["Bleu_4"] == _approx(1.0) and scores["CIDEr"] == _approx(10.0)
    # Without pretokenized text nothing can be scored as coco-caption does: all say why.
    raw = caption_scores(preds, refs)
    assert all(raw[key] is None for key in raw if key != "unavailable")
    assert len(raw["unavailable"]) == 8
    assert all("PTB tokenization failed" in why for why in raw["unavailable"].values())


def test_a_failing_scorer_becomes_an_explicit_entry(monkeypatch):
    class BrokenRouge:
        def compute_score(self, gts, res):
            raise RuntimeError("boom")

    monkeypatch.setattr(caption_metrics, "Rouge", BrokenRouge)
    scores = caption_scores({0: "a", 1: "b"}, {0: ["a"], 1: ["b"]}, metrics=["ROUGE_L", "BLEU"],
                            pretokenized=True)
    assert scores["ROUGE_L"] is None
    assert scores["unavailable"] == {"ROUGE_L": "RuntimeError: boom"}
    assert scores["Bleu_1"] == _approx(1.0)


def _fake_meteor(command=("sleep", "30")):
    """A pycocoevalcap Meteor talking to ``command`` instead of the METEOR JVM."""
    scorer = Meteor.__new__(Meteor)
    scorer.meteor_p = subprocess.Popen(list(command), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    scorer.lock = threading.Lock()
    return scorer


@pytest.mark.parametrize("command, reason", [
    (("sleep", "30"), "did not answer within 0.3 s"),  # reads its input, never answers
    (("cat",), "METEOR failed (ValueError"),  # answers lines that are not scores
])
def test_a_hung_or_confused_meteor_is_stopped_and_reported(monkeypatch, command, reason):
    monkeypatch.setattr(caption_metrics, "_require_java", lambda what: None)
    scorer = _fake_meteor(command)
    scores = caption_scores({0: "a b"}, {0: ["a b"]}, metrics=["METEOR"], pretokenized=True,
                            meteor=scorer, meteor_timeout_s=0.3)
    assert scores["METEOR"] is None
    assert reason in scores["unavailable"]["METEOR"]
    # Stopped although shared: its protocol is out of step, and its lock is free for __del__.
    assert scorer.meteor_p.poll() is not None and not scorer.lock.locked()


def test_a_meteor_started_for_one_call_is_stopped_after_it(monkeypatch):
    monkeypatch.setattr(caption_metrics, "_require_java", lambda what: None)
    started = []

    def fake_meteor():
        scorer = _fake_meteor()
        scorer.compute_score = lambda gts, res: (0.5, [0.5])
        started.append(scorer)
        return scorer

    monkeypatch.setattr(caption_metrics, "Meteor", fake_meteor)
    scores = caption_scores({0: "a b"}, {0: ["a b"]}, metrics=["METEOR"], pretokenized=True)
    assert scores["METEOR"] == 0.5
    assert started[0].meteor_p.poll() is not None


def test_mismatched_ids_and_bad_references_are_errors():
    with pytest.raises(ValueError, match=r"1 without a prediction \['b'\].*1 not in the references \['z'\]"):
        caption_scores({"a": "x", "z": "y"}, {"a": ["x"], "b": ["y"]}, pretokenized=True)
    with pytest.raises(ValueError, match="id 'a' has no reference captions"):
        caption_scores({"a": "x"}, {"a": []}, pretokenized=True)
    with pytest.raises(ValueError, match="no references"):
        caption_scores({}, {}, pretokenized=True)
    with pytest.raises(TypeError, match="must be a list of str"):
        caption_scores({"a": "x"}, {"a": "x"}, pretokenized=True)
    with pytest.raises(TypeError, match="must be a str"):
        caption_scores({"a": ["x"]}, {"a": ["x"]}, pretokenized=True)
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_scores({"a": "x"}, {"a": ["x"]}, metrics=["BLEU-4"], pretokenized=True)
