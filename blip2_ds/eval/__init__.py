"""Evaluation (``python -m blip2_ds.eval``): retrieval, captioning metrics, VQA accuracy; see the README."""
from collections.abc import Collection


def _preview(ids: list, limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"


def require_same_ids(predicted: Collection, expected: Collection, expected_name: str, what: str) -> None:
    """ValueError naming the ids (the first ten) that only one side has: scores never silently skip a sample."""
    missing = [i for i in expected if i not in predicted]
    unexpected = [i for i in predicted if i not in expected]
    if missing or unexpected:
        raise ValueError(f"predictions and {expected_name} must cover the same {what}: "
                         f"{len(missing)} without a prediction {_preview(missing)}, "
                         f"{len(unexpected)} not in the {expected_name} {_preview(unexpected)}")
