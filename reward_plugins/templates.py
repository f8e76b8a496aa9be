"""One name for the scored answer in every text template: `{response}` (reward models, RM training, best-of-n and
gold evaluation). `{answer}`, the evaluation tools' old name, is still read, with a one-line deprecation warning."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

RENAMED = {"answer": "response"}


def current_names(template: str, where: str) -> str:
    """`template` with every renamed field under its current name; warns once per use, naming `where`."""
    for old, new in RENAMED.items():
        if "{" + old + "}" in template:
            logger.warning("%s: the template field {%s} is deprecated; write {%s}", where, old, new)
            template = template.replace("{" + old + "}", "{" + new + "}")
    return template
