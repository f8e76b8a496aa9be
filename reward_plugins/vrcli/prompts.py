"""The VR-CLI scored input: templates, layouts and the token ids of (context, gold) for one datapoint.

`VRCLIPrompt.scored_input` builds the scored input for both the reward and the baseline precomputation
(`setup_data/compute_baseline_perplexity.py`): the story context is cut identically with and without the
plan, the gold never.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from ..registry import PluginConfig
from ..types import LabelError

PLAN_HEADING = "### Detailed Plan for the Next Chapter ###"
APPEND_TEMPLATES = ("{context}", "{context}\n\n" + PLAN_HEADING + "\n{plan}")
# The paper's layout (prompt_utils.py): the plan block sits before the instruction block, whose text changes;
# the label carries the story part (`context`, no instruction) and both instructions.
PAPER_TEMPLATES = (
    "{context}\n### Instructions: ###\n{instruction}",
    "{context}\n\n" + PLAN_HEADING + "\n{plan}\n\n### Instructions: ###\n{plan_instruction}",
)
LAYOUTS = {"append": APPEND_TEMPLATES, "paper": PAPER_TEMPLATES}
_STORY, _PLAN = "\x00story\x00", "\x00plan\x00"


@dataclass(frozen=True)
class ScoredInput:
    """The scored token ids of one datapoint and whether the story context or the plan was cut to fit."""

    context: list[int]
    gold: list[int]
    story_cut: bool = False
    plan_cut: bool = False

    @property
    def truncated(self) -> bool:
        return self.story_cut or self.plan_cut


class VRCLIPrompt(PluginConfig):
    """How the scored input is built from the label (and the plan).

    Templates are `str.format` strings over the label's keys plus `{plan}`, each holding `{context}` (the
    story part, `context_key`) exactly once; `layout` picks the preset pair (`append`: the plan after the
    context; `paper`: the plan block before the instruction block, instructions from the label) unless the
    templates are given. The rendered text is the user turn (after an optional system turn) through the
    scorer tokenizer's chat template, or plain text with `chat_template: false`. The gold continuation
    follows as its own tokens and is never cut. When the input would exceed the scorer's `max_length`, the
    story context loses its oldest tokens, by an amount that does not depend on the plan (room for
    `plan_token_reserve` plan tokens is kept), so the baseline and the with-plan input see the same story
    tokens; a plan longer than the room left is cut at its end.
    """

    layout: Literal["append", "paper"] = "append"
    system: str | None = "You are a helpful and expert writing assistant."
    baseline_template: str = APPEND_TEMPLATES[0]
    plan_template: str = APPEND_TEMPLATES[1]
    chat_template: bool = True
    system_role: bool = True
    gold_key: str = "gold"
    context_key: str = "context"
    plan_token_reserve: int = Field(default=256, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _layout_templates(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            layout = data.get("layout", "append")
            if layout in LAYOUTS:
                baseline, plan = LAYOUTS[layout]
                given = {k: v for k, v in data.items() if v is not None or k not in ("baseline_template", "plan_template")}
                data = {"baseline_template": baseline, "plan_template": plan, **given}
        return data

    @model_validator(mode="after")
    def _templates(self) -> VRCLIPrompt:
        if "{plan}" not in self.plan_template:
            raise ValueError("plan_template must contain {plan}")
        story = "{" + self.context_key + "}"
        for name, template in (("baseline_template", self.baseline_template), ("plan_template", self.plan_template)):
            if template.count(story) != 1:
                raise ValueError(f"{name} must contain {story} exactly once (the story part that may be cut)")
        return self

    def settings_hash(self) -> str:
        """A short hash of every setting that shapes the scored input (part of the baseline fingerprint)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def render(self, label: Mapping[str, Any], plan: str | None) -> str | list[dict[str, str]]:
        """The scored input as text or messages, before tokenization (the gold is not part of it)."""
        template = self.baseline_template if plan is None else self.plan_template
        try:
            text = template.format_map({**label, "plan": plan})
        except KeyError as exc:
            raise LabelError(f"prompt template needs label key {exc}") from None
        if not self.chat_template:
            return text if self.system is None else f"{self.system}\n\n{text}"
        if self.system is None:
            return [{"role": "user", "content": text}]
        if not self.system_role:
            return [{"role": "user", "content": f"{self.system}\n\n{text}"}]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": text}]

    def _pieces(self, tokenizer, label: Mapping[str, Any], plan: bool) -> list[list[int] | str]:
        """Token ids of the fixed text around the placeholders `_STORY` and `_PLAN` (kept as markers)."""
        rendered = self.render({**label, self.context_key: _STORY}, _PLAN if plan else None)
        if isinstance(rendered, list):
            text = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
            lead: list[int] = []
        else:
            text = rendered
            lead = list(tokenizer("", add_special_tokens=True)["input_ids"])
        pieces: list[list[int] | str] = [lead] if lead else []
        for part in re.split(f"({_STORY}|{_PLAN})", text):
            if part in (_STORY, _PLAN):
                pieces.append(part)
            elif part:
                pieces.append(list(tokenizer(part, add_special_tokens=False)["input_ids"]))
        return pieces

    def scored_input(self, tokenizer, label: Any, plan: str | None, max_length: int | None = None) -> ScoredInput:
        """The (context, gold) ids of one datapoint, fitted to `max_length`; `plan=None` gives the baseline input.

        Fixed text, the story context and the plan are tokenized separately and concatenated, so the story
        tokens are the same with and without the plan.
        """
        if not isinstance(label, Mapping):
            raise LabelError(f"label must be an object, got {type(label).__name__}")
        gold = label.get(self.gold_key)
        if not isinstance(gold, str) or not gold.strip():
            raise LabelError(f"label has no non-empty {self.gold_key!r}")
        story = label.get(self.context_key)
        if not isinstance(story, str) or not story.strip():
            raise LabelError(f"label has no non-empty {self.context_key!r}")
        gold_ids = list(tokenizer(gold, add_special_tokens=False)["input_ids"])
        if not gold_ids:
            raise LabelError("gold continuation tokenizes to nothing")
        story_ids = list(tokenizer(story, add_special_tokens=False)["input_ids"])
        pieces = {False: self._pieces(tokenizer, label, False), True: self._pieces(tokenizer, label, True)}
        story_cut = plan_cut = False
        plan_ids = list(tokenizer(plan, add_special_tokens=False)["input_ids"]) if plan is not None else []
        if max_length is not None:
            fixed = max(sum(len(p) for p in ps if isinstance(p, list)) for ps in pieces.values())
            budget = max_length - len(gold_ids) - fixed - self.plan_token_reserve
            if budget < 1:
                raise LabelError(
                    f"gold ({len(gold_ids)} tokens), fixed prompt text ({fixed}) and plan_token_reserve "
                    f"({self.plan_token_reserve}) leave no room for the story within max_length {max_length}"
                )
            if len(story_ids) > budget:
                story_ids, story_cut = story_ids[-budget:], True
            if plan is not None:
                fixed_plan = sum(len(p) for p in pieces[True] if isinstance(p, list))
                room = max_length - len(gold_ids) - fixed_plan - len(story_ids)
                if len(plan_ids) > room:
                    plan_ids, plan_cut = plan_ids[:room], True
        if plan is not None and not plan_ids:
            raise ValueError("the plan tokenizes to nothing")
        context: list[int] = []
        for piece in pieces[plan is not None]:
            context.extend(story_ids if piece == _STORY else plan_ids if piece == _PLAN else piece)
        return ScoredInput(context, gold_ids, story_cut, plan_cut)

    def token_ids(self, tokenizer, label: Any, plan: str | None, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(context ids, gold ids) for one datapoint; `plan=None` gives the baseline input."""
        scored = self.scored_input(tokenizer, label, plan, max_length)
        return scored.context, scored.gold
