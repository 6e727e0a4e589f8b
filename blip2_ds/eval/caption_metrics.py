"""Captioning metrics as COCO's evaluation tooling (coco-caption, via ``pycocoevalcap``) reports them.

Published COCO caption numbers are produced by that code, so it is called rather than rewritten:
captions go through its PTB tokenizer (lower-case, punctuation dropped), then BLEU-1..4 ("closest"
reference length, its own tiny smoothing constants), METEOR 1.5, ROUGE-L (beta 1.2), CIDEr (which
in coco-caption is CIDEr-D: clipped, length-penalised, x10) and SPICE. Scores keep coco-caption's
scale (fractions; CIDEr around 1 for good models), not the x100 of paper tables.

The tokenizer, METEOR and SPICE are Java programs. A metric that cannot run is reported as ``None``
with its reason under ``"unavailable"``, never as a 0 that would read as a real score. Nothing here
downloads anything: pycocoevalcap's SPICE fetches Stanford CoreNLP from the web on first use, so
its jars are looked for first and SPICE is reported unavailable without being started when they
are missing.
"""
from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _spice_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from blip2_ds.eval import require_same_ids

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
# coco-caption's own result names, so numbers can be set side by side with its output.
OUTPUT_KEYS: dict[str, tuple[str, ...]] = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
_NEEDS_JAVA = frozenset({"METEOR", "SPICE"})

# Tokenised captions in the form every pycocoevalcap scorer takes: id -> list of strings.
Captions = dict[Hashable, list[str]]


class MetricUnavailable(RuntimeError):
    """A metric cannot run here for a known reason (missing Java, missing jars, degenerate input)."""


def caption_scores(predictions: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]],
                   metrics: Iterable[str] = METRICS, *, pretokenized: bool = False,
                   meteor: Meteor | None = None, meteor_timeout_s: float = 600.0) -> dict[str, Any]:
    """Corpus-level caption metrics, keyed as coco-caption names them, plus ``"unavailable"``.

    ``predictions``: image id -> generated caption; ``references``: image id -> its human
    captions. ``pretokenized=True`` skips the PTB tokenizer (and so Java) for text that is already
    lower-cased and split on spaces; scores are comparable to coco-caption's only without it.
    ``meteor``: a running pycocoevalcap ``Meteor`` to reuse, since starting one costs several
    seconds of JVM and paraphrase-table loading; when none is given one is started and stopped.

    Returns e.g. ``{"Bleu_1": 0.71, ..., "SPICE": None, "unavailable": {"SPICE": "why"}}``.
    """
    requested = _check_metric_names(metrics)
    _check_inputs(predictions, references)
    scores: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    gts = res = None
    preparation_failure: str | None = None
    try:
        gts, res = _prepare(predictions, references, pretokenized)
    except Exception as error:  # noqa: BLE001 - the reason is reported for every metric
        preparation_failure = f"PTB tokenization failed ({_describe(error)})"
    runners: dict[str, Callable[[Captions, Captions], list[float]]] = {
        "BLEU": _bleu, "ROUGE_L": _rouge, "CIDEr": _cider, "SPICE": _spice,
        "METEOR": lambda g, r: _meteor(g, r, meteor, meteor_timeout_s),
    }
    for name in requested:
        try:
            if preparation_failure is not None:
                raise MetricUnavailable(preparation_failure)
            if name in _NEEDS_JAVA:
                _require_java(name)
            values = runners[name](gts, res)
        except Exception as error:  # noqa: BLE001 - any failure becomes an explicit entry
            reason = str(error) if isinstance(error, MetricUnavailable) else _describe(error)
            log.warning("caption metric %s unavailable: %s", name, reason)
            for key in OUTPUT_KEYS[name]:
                scores[key] = None
                unavailable[key] = reason
            continue
        scores.update(zip(OUTPUT_KEYS[name], values))
    scores["unavailable"] = unavailable
    return scores


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> Captions:
    """coco-caption's tokenisation: Stanford PTBTokenizer, lower-cased, punctuation tokens dropped.

    One JVM for everything (coco-caption starts one for references and one for predictions; the
    tokenizer works line by line, so the output is the same).
    """
    _require_java("the PTB tokenizer")
    flat = {key: [{"caption": _one_line(text)} for text in texts] for key, texts in captions.items()}
    tokenized = PTBTokenizer().tokenize(flat)
    for key, texts in captions.items():
        # pycocoevalcap pairs output lines with ids by zip(), which truncates silently.
        if len(tokenized.get(key, ())) != len(texts):
            raise RuntimeError(f"PTB tokenizer returned {len(tokenized.get(key, ()))} lines for "
                               f"id {key!r}, expected {len(texts)}")
    return tokenized


def spice_missing_jars() -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs that are absent, at the place pycocoevalcap's
    downloader would put them (so that a non-empty answer means running it would download)."""
    lib = Path(_spice_models.SPICEDIR) / _spice_models.SPICELIB
    jars = [lib / f"{_spice_models.JAR}.jar", lib / f"{_spice_models.JAR}-models.jar"]
    return [jar for jar in jars if not jar.is_file()]


def _prepare(predictions, references, pretokenized: bool) -> tuple[Captions, Captions]:
    if pretokenized:
        return ({i: [_one_line(t) for t in refs] for i, refs in references.items()},
                {i: [_one_line(predictions[i])] for i in references})
    # Tuple keys keep predictions and references apart in the single tokenizer call.
    tokenized = ptb_tokenize({**{("ref", i): list(refs) for i, refs in references.items()},
                              **{("pred", i): [predictions[i]] for i in references}})
    return ({i: tokenized[("ref", i)] for i in references},
            {i: tokenized[("pred", i)] for i in references})


def _one_line(text: str) -> str:
    # The tokenizer and the METEOR pipe are line protocols: a caption holding a line break (any
    # that Java honours, e.g. U+2028 or \v, not only \n) would shift every later caption onto the
    # wrong image, or leave METEOR waiting for input.
    return " ".join(text.splitlines())


def _bleu(gts: Captions, res: Captions) -> list[float]:
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return [float(s) for s in score]


def _rouge(gts: Captions, res: Captions) -> list[float]:
    score, _ = Rouge().compute_score(gts, res)
    return [float(score)]


def _cider(gts: Captions, res: Captions) -> list[float]:
    if len(gts) < 2:
        raise MetricUnavailable("CIDEr needs at least 2 images: its idf is log(#images / df), "
                                "so with one image every weight is 0 and so is the score")
    score, _ = Cider().compute_score(gts, res)
    return [float(score)]


def _meteor(gts: Captions, res: Captions, scorer: Meteor | None, timeout_s: float) -> list[float]:
    owned = scorer is None
    if owned:
        scorer = Meteor()
    timed_out = threading.Event()

    def kill_stuck_jvm() -> None:
        timed_out.set()
        scorer.meteor_p.kill()

    # pycocoevalcap reads METEOR's answers with blocking readline()s and no timeout.
    watchdog = threading.Timer(timeout_s, kill_stuck_jvm)
    watchdog.daemon = True
    watchdog.start()
    try:
        # '|||' separates fields in METEOR's protocol; pycocoevalcap strips it only from hypotheses.
        safe_gts = {i: [ref.replace("|||", "") for ref in refs] for i, refs in gts.items()}
        score, _ = scorer.compute_score(safe_gts, res)
        return [float(score)]
    except Exception as error:
        # compute_score holds its lock when it fails midway; Meteor.__del__ would then hang on it.
        if scorer.lock.locked():
            scorer.lock.release()
        exit_code = scorer.meteor_p.poll()
        # Stopped even when shared: after a failure midway its request/answer lines are out of
        # step, and a later call would read another call's answers as its own.
        _stop_meteor(scorer)
        if timed_out.is_set():
            raise MetricUnavailable(f"METEOR did not answer within {timeout_s:g} s; its JVM was "
                                    "stopped") from error
        state = "was stopped" if exit_code is None else f"had exited with code {exit_code}"
        raise MetricUnavailable(f"METEOR failed ({_describe(error)}); its JVM {state}") from error
    finally:
        watchdog.cancel()
        if owned:
            _stop_meteor(scorer)


def _stop_meteor(scorer: Meteor) -> None:
    # Done now rather than whenever the garbage collector runs Meteor.__del__ (a 2 GB JVM);
    # __del__ repeats these steps harmlessly later. Safe to call more than once.
    with scorer.lock:
        try:
            scorer.meteor_p.stdin.close()
        except BrokenPipeError:
            pass  # unsent input of a JVM that is already gone; the pipe is closed all the same
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def _spice(gts: Captions, res: Captions) -> list[float]:
    missing = spice_missing_jars()
    if missing:
        raise MetricUnavailable(
            "SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads from "
            "nlp.stanford.edu on first use; not attempted. Missing: "
            + ", ".join(str(jar) for jar in missing))
    try:
        score, _ = Spice().compute_score(gts, res)
    except Exception as error:
        raise MetricUnavailable(f"SPICE failed ({_describe(error)}); note SPICE 1.0 is known to "
                                "fail on Java 17+ (InaccessibleObjectException), Java 8 or 11 "
                                "works") from error
    return [float(score)]


def _require_java(what: str) -> None:
    if shutil.which("java") is None:
        raise MetricUnavailable(f"{what} needs a `java` executable on PATH and none was found")


def _check_metric_names(metrics: Iterable[str]) -> list[str]:
    requested = list(dict.fromkeys(metrics))
    unknown = [name for name in requested if name not in OUTPUT_KEYS]
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {list(METRICS)}")
    if not requested:
        raise ValueError("no caption metrics requested")
    return requested


def _check_inputs(predictions: Mapping[Hashable, str],
                  references: Mapping[Hashable, Sequence[str]]) -> None:
    if not references:
        raise ValueError("no references to score against")
    require_same_ids(predictions, references, "references", "ids")
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for id {image_id!r} must be a str, "
                            f"got {type(caption).__name__}")
    for image_id, refs in references.items():
        # A bare string is a Sequence too, and would be scored as one reference per character.
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references for id {image_id!r} must be a list of str, got {refs!r}")
        if len(refs) == 0:
            raise ValueError(f"id {image_id!r} has no reference captions")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
