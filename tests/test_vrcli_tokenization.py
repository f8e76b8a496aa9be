"""VR-CLI scores exactly the tokens the original scores, with a Qwen2-style tokenizer built offline.

Qwen2's pre-tokenizer keeps runs of newlines together (`\\s*[\\r\\n]+`), so tokenizing the prompt in pieces
joins differently from tokenizing the chat string once (`"\\n", "\\n"` where the whole string has `"\\n\\n"`).
The expected perplexities come from `vrcli_reference.whole_string_ppl` (transformers' `apply_chat_template`
and the model's own loss), and the gold's first token is also found with the original's rule (five tokens
after the last `<|im_end|>` of the prompt).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from reward_plugins import Sample, Status
from reward_plugins.logprobs import HFLogProbScorer
from reward_plugins.vrcli import VRCLIConfig, VRCLIPlugin, VRCLIPrompt, baseline_perplexities
from vrcli_reference import messages_for, whole_string_ppl

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = [
    "### Previous Chapter: ###\nThe fox walked to the river.\n\n### Next Chapter Synopsis: ###\nThe fox swims.\n",
    "### Next Chapter Header: ###\nChapter 3: The River\n\n\n### Detailed Plan for the Next Chapter ###\n",
    "In summary: the fox crosses the river at night and finds the lost map.\n\n",
    "Chapter 3: The River\n\nThe water was cold. The fox swam and swam until the far bank.\n",
    "### Instructions: ###\nInstructions: Use all of the information provided to write the next chapter.\n\n",
] * 4 + ["system\nuser\nassistant\n"] * 40  # role names as single tokens, as in Qwen's vocabulary
STORY = ("Instructions: You will be given the most recent chapter of the story.\n\n### Previous Chapter: ###\n"
         "The fox walked to the river. It was night.\n\n\n### Next Chapter Synopsis: ###\nThe fox swims.\n\n\n"
         "### Next Chapter Header: ###\nChapter 3: The River\n")
GOLD = "Chapter 3: The River\n\nThe water was cold. The fox swam until the far bank."
LABEL = {"id": "x", "context": STORY, "gold": GOLD, "prompt_layout": "paper",
         "instruction": "Instructions: Use all of the information provided to write the next chapter.",
         "plan_instruction": "Instructions: Use all of the preliminary thoughts and information provided to write the next chapter."}


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A Qwen2-style byte-level BPE (its pre-tokenizer regex, ChatML specials and template) and a tiny LM."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    fast.chat_template = QWEN_TEMPLATE
    out = tmp_path_factory.mktemp("qwen_like")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_pieces_join_differently_from_the_whole_string(qwen_like):
    """The premise: this tokenizer is one where piecewise tokenization changes the scored ids."""
    tok = PreTrainedTokenizerFast.from_pretrained(qwen_like)
    whole = tok(STORY + "\n### Instructions: ###", add_special_tokens=False)["input_ids"]
    pieces = tok(STORY, add_special_tokens=False)["input_ids"] + tok("\n### Instructions: ###", add_special_tokens=False)["input_ids"]
    assert whole != pieces
    assert "\u010a\u010a" in tok.convert_ids_to_tokens(whole)  # "\n\n" as one token (byte-level spelling)


def original_gold_start(ids: list[int], im_end: int) -> int:
    """ReasoningNCP's rule: the last <|im_end|> before the final ten tokens, plus five (newline, <|im_start|>,
    'assistant', newline)."""
    for i in range(len(ids) - 10 - 1, 0, -1):
        if ids[i] == im_end:
            return i + 5
    raise AssertionError("no <|im_end|>")


@pytest.mark.parametrize("plan", [None, "The fox swims across.\n\nIt finds the map."])
def test_scored_tokens_are_the_originals(qwen_like, plan):
    tok = PreTrainedTokenizerFast.from_pretrained(qwen_like)
    prompt = VRCLIPrompt(layout="paper")
    scored = prompt.scored_input(tok, LABEL, plan)
    user = (f"{STORY}\n### Instructions: ###\n{LABEL['instruction']}" if plan is None else
            f"{STORY}\n\n### Detailed Plan for the Next Chapter ###\n{plan}\n\n### Instructions: ###\n{LABEL['plan_instruction']}")
    messages = [*messages_for(prompt.system, user), {"role": "assistant", "content": GOLD}]
    ids = list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    start = original_gold_start(ids, tok.convert_tokens_to_ids("<|im_end|>"))
    assert scored.context == ids[:start] and scored.gold == ids[start:]
    assert tok.decode(scored.gold) == GOLD + "<|im_end|>\n"  # the closing tokens are scored, as in the original


def test_perplexity_equals_the_whole_string_computation(qwen_like):
    config = VRCLIConfig.model_validate({"scorer": {"model": str(qwen_like), "batch_size": 2},
                                         "prompt": {"layout": "paper"}, "shaping": {"scheme": "raw"}})
    plugin = VRCLIPlugin(config, "vrcli")
    model = LlamaForCausalLM.from_pretrained(qwen_like).eval()
    tok = plugin.scorer.tokenizer
    system = config.prompt.system
    baseline_user = f"{STORY}\n### Instructions: ###\n{LABEL['instruction']}"
    baseline = whole_string_ppl(model, tok, messages_for(system, baseline_user), GOLD)
    assert baseline_perplexities(plugin.scorer, config.prompt, [LABEL])[0] == pytest.approx(baseline, rel=1e-5)
    plan = "The fox swims across.\n\nIt finds the map."
    response = f"<citation>x</citation>, therefore <reasoning>y</reasoning>\nIn summary: {plan}<|im_end|>"
    result = plugin.score([Sample(prompt="p", response=response, label={**LABEL, "baseline_ppl": baseline})])[0]
    assert result.status is Status.OK
    plan_user = f"{STORY}\n\n### Detailed Plan for the Next Chapter ###\n{plan}\n\n### Instructions: ###\n{LABEL['plan_instruction']}"
    ppl = whole_string_ppl(model, tok, messages_for(system, plan_user), GOLD)
    assert result.components["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert result.components["improvement"] == pytest.approx(100 * (baseline - ppl) / baseline, abs=1e-3)


def test_scorer_in_memory_matches(qwen_like):
    """The same ids through an in-memory scorer (OpenRLHF's reference model takes the same ids)."""
    tok = PreTrainedTokenizerFast.from_pretrained(qwen_like)
    model = LlamaForCausalLM.from_pretrained(qwen_like).eval()
    scorer = HFLogProbScorer.from_model(model, tok)
    context, gold = VRCLIPrompt(layout="paper").token_ids(tok, LABEL, None)
    logprobs = scorer.continuation_logprobs([context], [gold])[0]
    baseline_user = f"{STORY}\n### Instructions: ###\n{LABEL['instruction']}"
    expected = whole_string_ppl(model, tok, messages_for(VRCLIPrompt().system, baseline_user), GOLD)
    assert float(torch.tensor(-logprobs).mean().exp()) == pytest.approx(expected, rel=1e-5)
