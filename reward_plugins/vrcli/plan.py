"""VR-CLI plan extraction: the paper's marker chain and the special-token strip before it."""

from __future__ import annotations

import re
from collections.abc import Sequence

PAPER_MARKERS = ("In summary:", "In summary,", "Detailed Plan:")


def find_plan(response: str, markers: Sequence[str] = PAPER_MARKERS) -> tuple[str, bool]:
    """The paper's extraction chain: keep the text after the last occurrence of each marker in turn.

    "In summary: A. Detailed Plan: B" gives "B" (the chain goes on inside what the first marker left).
    Returns (plan, whether any marker occurred); with no marker the plan is the whole response, stripped.
    """
    plan, found = response.strip(), False
    for marker in markers:
        if marker in plan:
            plan, found = plan.rsplit(marker, 1)[1].strip(), True
    return plan, found


def extract_plan(response: str, markers: Sequence[str] = PAPER_MARKERS, whole_response_fallback: bool = True) -> str:
    """`find_plan`, with no marker an error unless `whole_response_fallback` (the paper's behaviour, the default).

    An empty plan is a `ValueError` either way.
    """
    plan, found = find_plan(response, markers)
    if not found and not whole_response_fallback:
        raise ValueError(f"no plan marker ({', '.join(map(repr, markers))}) in the response")
    if not plan:
        raise ValueError("empty plan" + (" after the last marker" if found else ": the response is empty"))
    return plan


def strip_special_tokens(text: str, special_tokens: Sequence[str]) -> str:
    """Remove every special-token string wherever it occurs, then surrounding whitespace, as the original's
    `decode(..., skip_special_tokens=True).strip()` does (an OpenRLHF response keeps its EOS text, e.g.
    `<|im_end|>`, and a policy may emit others mid-response)."""
    tokens = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    if not tokens:
        return text.strip()
    return re.sub("|".join(map(re.escape, tokens)), "", text).strip()
