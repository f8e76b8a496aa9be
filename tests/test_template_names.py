"""`{response}` is the one name for the scored answer in every template; `{answer}` still reads, with one warning line."""

from __future__ import annotations

import logging

import pytest

from evaluation.rm_text import OA_TEMPLATE, alpacafarm_text, check_template, rm_text
from reward_plugins.reward_model import RewardModelConfig
from trl_ext.config import load_config
from trl_ext.train_rm import RMRunConfig


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_evaluation_templates_use_response_and_accept_answer_with_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        assert check_template("{prompt}{response}") == "{prompt}{response}"
        assert warnings_of(caplog) == []
        assert check_template("Q: {prompt} A: {answer}") == "Q: {prompt} A: {response}"
    assert warnings_of(caplog) == ["--template: the template field {answer} is deprecated; write {response}"]
    assert rm_text("Say hi", "", "hello", "Q: {prompt} A: {response}") == "Q: Say hi A: hello"
    assert rm_text("Say hi", "loud", "HELLO") == "<|prompter|>Say hi\nloud<|endoftext|><|assistant|>HELLO<|endoftext|>"
    assert OA_TEMPLATE.endswith("{response}<|endoftext|>")
    assert alpacafarm_text("Do it", "", "done").endswith("### Response:\ndone")
    with pytest.raises(ValueError, match=r"template must contain \{response\}"):
        check_template("{prompt} only")
    with pytest.raises(ValueError, match=r"template field \{reply\} is not one of"):
        check_template("{prompt}{reply}{response}")


def test_reward_model_and_rm_training_read_the_old_name_as_the_new(caplog, rm_dirs, tmp_path, lm_dir):
    with caplog.at_level(logging.WARNING):
        config = RewardModelConfig.model_validate({"path": str(rm_dirs[1]), "template": "{prompt} => {answer}"})
    assert config.template == "{prompt} => {response}"
    assert warnings_of(caplog) == ["template: the template field {answer} is deprecated; write {response}"]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "Q", "chosen": "a", "rejected": "b"}\n')
    rm = load_config(RMRunConfig, None, [f"base={lm_dir}", f"train_data={prefs}", "template='{prompt}|{answer}'"])
    assert rm.template == "{prompt}|{response}"
