"""How reward models read (instruction, input, response): the Open-Assistant and AlpacaFarm formats, or a custom template."""

from __future__ import annotations

import string

from reward_plugins.templates import current_names

OA_TEMPLATE = "<|prompter|>{prompt}<|endoftext|><|assistant|>{response}<|endoftext|>"
ALPACAFARM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n{response}"
)
ALPACAFARM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{response}"
)
TEMPLATE_FIELDS = ("prompt", "instruction", "input", "response")


def prompt_text(instruction: str, input: str = "") -> str:
    """The prompt as the published code builds it: the instruction, then a newline and the input if any."""
    return f"{instruction}\n{input}" if input else instruction


def check_template(template: str) -> str:
    """Reject templates with fields other than {prompt} {instruction} {input} {response} ({answer}: deprecated)."""
    template = current_names(template, "--template")
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in TEMPLATE_FIELDS:
            raise ValueError(f"template field {{{name}}} is not one of {TEMPLATE_FIELDS}")
    if "{response}" not in template:
        raise ValueError("template must contain {response}")
    return template


def rm_text(instruction: str, input: str, answer: str, template: str = OA_TEMPLATE) -> str:
    """One RM input; `template` may use {prompt} (instruction[\\ninput]), {instruction}, {input} and {response}."""
    return template.format(prompt=prompt_text(instruction, input), instruction=instruction, input=input,
                           response=answer)


def alpacafarm_text(instruction: str, input: str, answer: str) -> str:
    """AlpacaFarm's reward-model format (the correct one; the published formatter is broken)."""
    template = ALPACAFARM_WITH_INPUT if input else ALPACAFARM_NO_INPUT
    return template.format(instruction=instruction, input=input, response=answer)
