"""The VR-CLI scored input: templates, layouts and the token ids of (context, gold) for one datapoint.

`VRCLIPrompt.scored_input` builds the scored input for both the reward and the baseline precomputation
(`setup_data/compute_baseline_perplexity.py`). As in the original (ReasoningNCP `rl_training/`), the whole
conversation with the gold chapter as the assistant turn is rendered by the chat template and tokenized
once; the scored tokens run from the first token of the gold to the end of the string (so they include the
template's end-of-turn tokens, e.g. Qwen's `<|im_end|>` and newline). Tokenizing pieces separately would
join differently (`"\n", "\n"` where Qwen2's pre-tokenizer has `"\n\n"`) and move the perplexity.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from collections import OrderedDict
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
_CUT_CACHE_SIZE = 4096
_CUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(settings, max_length, label): cut}


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


@dataclass(frozen=True)
class Tokenized:
    """One whole-string tokenization: ids, and the token ranges of the story, the plan and the gold."""

    ids: list[int]
    story: tuple[int, int]
    plan: tuple[int, int] | None
    gold_start: int


def _token_range(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The tokens lying inside characters [start, end): a token that straddles an edge belongs to the text around."""
    first = next((i for i, (a, b) in enumerate(offsets) if b > a and a >= start), len(offsets))
    last = next((i for i in range(first, len(offsets)) if offsets[i][1] > end), len(offsets))
    return first, last


def _locate(rendered: str, text: str) -> tuple[int, int]:
    """Where `text` starts in `rendered` (its last occurrence), and how many leading characters the template
    trimmed from it (templates such as Llama 3's strip message content); ValueError if it is not there."""
    position = rendered.rfind(text)
    if position >= 0:
        return position, 0
    stripped = text.strip()
    position = rendered.rfind(stripped) if stripped else -1
    if position < 0:
        raise ValueError("the scorer's chat template changes the user message text; the story cannot be located in it")
    return position, len(text) - len(text.lstrip())


class VRCLIPrompt(PluginConfig):
    """How the scored input is built from the label (and the plan).

    Templates are `str.format` strings over the label's keys plus `{plan}`, each holding `{context}` (the
    story part, `context_key`) exactly once and the plan template `{plan}` exactly once; `layout` picks the
    preset pair (`append`: the plan after the context; `paper`: the plan block before the instruction block,
    instructions from the label) unless the templates are given. The rendered text is the user turn (after an
    optional system turn) through the scorer tokenizer's chat template with the gold as the assistant turn,
    or plain text followed by the gold with `chat_template: false`; that whole string is tokenized once and
    the scored tokens are those from the gold's first token to the end. When the input would exceed the
    scorer's `max_length`, the story context loses its oldest tokens, by a number that does not depend on the
    plan (room for `plan_token_reserve` plan tokens is kept), so the baseline and the with-plan input keep
    the same newest story tokens; a plan longer than the room left is cut at its end. The gold is never cut.
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
        if self.plan_template.count("{plan}") != 1:
            raise ValueError("plan_template must contain {plan} exactly once")
        story = "{" + self.context_key + "}"
        for name, template in (("baseline_template", self.baseline_template), ("plan_template", self.plan_template)):
            if template.count(story) != 1:
                raise ValueError(f"{name} must contain {story} exactly once (the story part that may be cut)")
        return self

    def settings_hash(self) -> str:
        """A short hash of every setting that shapes the scored input (part of the baseline fingerprint)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _user_text(self, label: Mapping[str, Any], plan: str | None) -> tuple[str, tuple[int, int], tuple[int, int] | None]:
        """The user turn, and the character spans of the story and the plan in it."""
        template = self.baseline_template if plan is None else self.plan_template
        try:
            marked = template.format_map({**label, self.context_key: _STORY, "plan": _PLAN})
        except KeyError as exc:
            raise LabelError(f"prompt template needs label key {exc}") from None
        text, spans = "", {}
        for part in re.split(f"({_STORY}|{_PLAN})", marked):
            value = {_STORY: label[self.context_key], _PLAN: plan}.get(part, part)
            if part in (_STORY, _PLAN):
                spans[part] = (len(text), len(text) + len(value))
            text += value
        return text, spans[_STORY], spans.get(_PLAN)

    def _messages(self, text: str) -> str | list[dict[str, str]]:
        if not self.chat_template:
            return text if self.system is None else f"{self.system}\n\n{text}"
        if self.system is None:
            return [{"role": "user", "content": text}]
        if not self.system_role:
            return [{"role": "user", "content": f"{self.system}\n\n{text}"}]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": text}]

    def render(self, label: Mapping[str, Any], plan: str | None) -> str | list[dict[str, str]]:
        """The scored input as text or messages, before tokenization (the gold is not part of it)."""
        return self._messages(self._user_text(label, plan)[0])

    def tokenize(self, tokenizer, label: Mapping[str, Any], plan: str | None) -> Tokenized:
        """The whole scored string (prompt with the gold as the assistant turn), tokenized once, and the token
        ranges of its story, plan and gold."""
        gold = label[self.gold_key]
        user, story, plan_span = self._user_text(label, plan)
        rendered = self._messages(user)
        if isinstance(rendered, list):
            prefix = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
            text = tokenizer.apply_chat_template([*rendered, {"role": "assistant", "content": gold}], tokenize=False)
            if not text.startswith(prefix):
                raise ValueError("the scorer's chat template renders the prompt differently once the gold turn follows; "
                                 "the gold cannot be located")
            at, trimmed = _locate(prefix, user)
            special = False
        else:
            prefix, text = rendered, rendered + gold
            at, trimmed, special = len(rendered) - len(user), 0, True
        try:
            enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        except NotImplementedError:
            raise ValueError("VR-CLI scoring needs a fast tokenizer (character offsets); load the scorer's with "
                             "use_fast=True") from None
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        shift = at - trimmed
        story_range = _token_range(offsets, max(story[0] + shift, at), story[1] + shift)
        plan_range = _token_range(offsets, plan_span[0] + shift, plan_span[1] + shift) if plan_span else None
        gold_start = _token_range(offsets, len(prefix), len(text))[0]
        if gold_start >= len(offsets):
            raise LabelError("gold continuation tokenizes to nothing")
        return Tokenized(list(enc["input_ids"]), story_range, plan_range, gold_start)

    def _story_cut(self, tokenizer, label: Mapping[str, Any], max_length: int) -> int:
        """How many of the oldest story tokens every input of this label loses to fit `max_length`.

        From the baseline and the plan template with an empty plan, so the same for every plan: the room
        left once the gold, the larger fixed text and `plan_token_reserve` are counted goes to the newest
        story tokens. Cached per tokenizer and label.
        """
        label_text = json.dumps(label, sort_keys=True, default=str)
        key = (self.settings_hash(), max_length, hashlib.sha256(label_text.encode()).digest())
        try:
            cache = _CUTS.setdefault(tokenizer, OrderedDict())
        except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
            cache = OrderedDict()
        if key in cache:
            return cache[key]
        base, empty = self.tokenize(tokenizer, label, None), self.tokenize(tokenizer, label, "")
        story, gold = base.story[1] - base.story[0], len(base.ids) - base.gold_start
        fixed = max(len(t.ids) - (t.story[1] - t.story[0]) - (len(t.ids) - t.gold_start) for t in (base, empty))
        budget = max_length - gold - fixed - self.plan_token_reserve
        if budget < 1:
            raise LabelError(
                f"gold ({gold} tokens), fixed prompt text ({fixed}) and plan_token_reserve "
                f"({self.plan_token_reserve}) leave no room for the story within max_length {max_length}"
            )
        cache[key] = cut = max(0, story - budget)
        while len(cache) > _CUT_CACHE_SIZE:
            cache.popitem(last=False)
        return cut

    def scored_input(self, tokenizer, label: Any, plan: str | None, max_length: int | None = None) -> ScoredInput:
        """The (context, gold) ids of one datapoint, fitted to `max_length`; `plan=None` gives the baseline input."""
        if not isinstance(label, Mapping):
            raise LabelError(f"label must be an object, got {type(label).__name__}")
        for key in (self.gold_key, self.context_key):
            value = label.get(key)
            if not isinstance(value, str) or not value.strip():
                raise LabelError(f"label has no non-empty {key!r}")
        tokens = self.tokenize(tokenizer, label, plan)
        ids, (story_start, _), gold_start = tokens.ids, tokens.story, tokens.gold_start
        if tokens.plan is not None and tokens.plan[0] == tokens.plan[1]:
            raise ValueError("the plan tokenizes to nothing")
        cut = self._story_cut(tokenizer, label, max_length) if max_length is not None else 0
        ids = ids[:story_start] + ids[story_start + cut :]
        gold_start -= cut
        plan_cut = 0
        if max_length is not None and len(ids) > max_length:
            plan_start, plan_end = (p - cut if p > story_start else p for p in tokens.plan)  # only a plan input is over
            plan_cut = len(ids) - max_length
            if plan_end - plan_start - plan_cut < 1:
                raise LabelError(f"no room for the plan within max_length {max_length}")
            ids = ids[: plan_end - plan_cut] + ids[plan_end:]
            gold_start -= plan_cut
        return ScoredInput(ids[:gold_start], ids[gold_start:], cut > 0, plan_cut > 0)

    def token_ids(self, tokenizer, label: Any, plan: str | None, max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(context ids, gold ids) for one datapoint; `plan=None` gives the baseline input."""
        scored = self.scored_input(tokenizer, label, plan, max_length)
        return scored.context, scored.gold
