"""The train/eval split of a span: a stable hash of ``decision_id`` (DESIGN.md, "Join outputs").

The split depends on the id alone, so it is the same across runs, machines and runners, and a
decision re-joined tomorrow lands in the split it landed in today.

    >>> split_of("d-123", 0.2)
    'train'
"""

from __future__ import annotations

import hashlib

TRAIN = "train"
EVAL = "eval"
SPLITS = (TRAIN, EVAL)


def is_eval(decision_id: str, eval_fraction: float) -> bool:
    """Whether a decision belongs to the eval split.

    The first 8 bytes of SHA-256 of the id, as a fraction of 2**64, below ``eval_fraction``.

    >>> is_eval("d-123", 0.0), is_eval("d-123", 0.999999)
    (False, True)
    """
    digest = hashlib.sha256(decision_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def split_of(decision_id: str, eval_fraction: float) -> str:
    """``EVAL`` or ``TRAIN`` for one decision (see ``is_eval``)."""
    return EVAL if is_eval(decision_id, eval_fraction) else TRAIN
