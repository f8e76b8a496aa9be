"""The one YAML loader (reward_plugins/config_loader.py): env expansion, typed whole-value references, key lines,
overrides and located errors. Expected values are written out by hand."""

import copy
import textwrap
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from reward_plugins import load_pipeline_config
from reward_plugins.config_loader import (
    ConfigError,
    Located,
    apply_overrides,
    expand_env,
    expand_path,
    expand_tree,
    key_lines,
    load_model,
    nearest_line,
    parse_override,
    read_yaml,
)


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "run"
    steps: int = 1
    rate: float = 0.5
    flag: bool = False
    note: str | None = None
    trl: dict[str, Any] = Field(default_factory=dict)


def write(tmp_path, text: str, name: str = "preset.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_expand_env_set_default_and_unset(monkeypatch):
    monkeypatch.setenv("RP_A", "alpha")
    monkeypatch.delenv("RP_UNSET", raising=False)
    assert expand_env("x-${RP_A}-y") == "x-alpha-y"
    assert expand_env("${RP_UNSET:-fallback}") == "fallback"
    assert expand_env("${RP_UNSET:-}") == ""
    assert expand_env("${RP_A:-ignored}") == "alpha"
    assert expand_env("$RP_A stays") == "$RP_A stays"  # bare $VAR is not a reference in YAML values
    with pytest.raises(ValueError) as info:
        expand_env("a/${RP_UNSET}/b")
    assert str(info.value) == ("environment variable RP_UNSET is not set (in 'a/${RP_UNSET}/b'); "
                               "set it or write ${RP_UNSET:-default}")


def test_expand_path_also_takes_bare_vars_and_home(monkeypatch):
    monkeypatch.setenv("RP_A", "alpha")
    monkeypatch.setenv("HOME", "/home/me")
    monkeypatch.delenv("RP_UNSET", raising=False)
    assert expand_path("$RP_A/${RP_UNSET:-d}/x") == "alpha/d/x"
    assert expand_path("~/m") == "/home/me/m"
    with pytest.raises(ValueError, match="environment variable RP_UNSET is not set"):
        expand_path("$RP_UNSET/x")


@pytest.mark.parametrize("text, expected", [
    ("300", 300), ("-3", -3), ("+4", 4), ("0.1", 0.1), ("1e-5", 1e-5), ("2E3", 2000.0), (".5", 0.5), ("7.", 7.0),
    ("true", True), ("false", False), ("007", 7),
])
def test_whole_reference_to_a_free_form_field_is_typed(monkeypatch, tmp_path, text, expected):
    """`${VAR}` alone is read as a YAML scalar: the README promises `${STEPS:-300}` is a number, even in `trl:`."""
    monkeypatch.setenv("RP_VALUE", text)
    cfg = load_model(Preset, write(tmp_path, "trl:\n  value: ${RP_VALUE}\n  default: ${RP_NOT_SET_X:-300}\n"),
                     kind="train")
    assert cfg.trl["value"] == expected and type(cfg.trl["value"]) is type(expected)
    assert cfg.trl["default"] == 300 and type(cfg.trl["default"]) is int


@pytest.mark.parametrize("text", ["abc", "1.2.3", "12ab", "[1, 2]", "null", "{a: 1}", "  "])
def test_whole_reference_that_is_not_a_scalar_stays_text(monkeypatch, tmp_path, text):
    monkeypatch.setenv("RP_VALUE", text)
    cfg = load_model(Preset, write(tmp_path, "trl:\n  value: ${RP_VALUE}\n"), kind="train")
    assert cfg.trl["value"] == text


def test_whole_reference_takes_the_type_of_its_field(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_NAME", "007")
    monkeypatch.setenv("RP_NOTE", "true")
    monkeypatch.setenv("RP_STEPS", "12")
    path = write(tmp_path, """\
        name: ${RP_NAME}
        note: ${RP_NOTE}
        steps: ${RP_STEPS}
        rate: ${RP_NOT_SET_X:-2}
        flag: ${RP_NOT_SET_X:-true}
        """)
    cfg = load_model(Preset, path, kind="train")
    assert (cfg.name, cfg.note, cfg.steps, cfg.rate, cfg.flag) == ("007", "true", 12, 2.0, True)
    assert type(cfg.steps) is int and type(cfg.rate) is float


def test_partial_reference_is_always_text(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_N", "5")
    cfg = load_model(Preset, write(tmp_path, "name: run${RP_N}\ntrl:\n  x: ${RP_N}0\n  y: ' ${RP_N} '\n"), kind="train")
    assert cfg.name == "run5" and cfg.trl == {"x": "50", "y": 5}


def test_typed_reference_in_a_reward_config_string_field(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_PATTERN", "42")
    path = write(tmp_path, "reward:\n  type: format_check\n  pattern: ${RP_PATTERN}\n  name: ${RP_NOT_SET_X:-fmt}\n")
    spec = load_pipeline_config(path).reward
    assert spec.config.pattern == "42" and spec.name == "fmt"


def test_key_lines_and_nearest_line():
    text = "a: 1\nb:\n  c: 2\n  d:\n    - x\n    - e: 3\n"
    lines = key_lines(yaml.compose(text))
    assert lines[("a",)] == 1 and lines[("b",)] == 2 and lines[("b", "c")] == 3 and lines[("b", "d")] == 4
    assert lines[("b", "d", 0)] == 5 and lines[("b", "d", 1)] == 6 and lines[("b", "d", 1, "e")] == 6
    assert lines[()] == 1
    assert key_lines(None) == {}
    assert nearest_line(lines, ("b", "d", 1, "e", "deeper")) == 6
    assert nearest_line(lines, ("b", "zz")) == 2
    assert nearest_line({}, ("q",)) is None
    assert nearest_line({("q",): 4}, ("r",)) is None


def test_located_formats_file_line_key_and_overrides():
    located = Located("f.yaml", {("a",): 3, ("a", "b"): 4}, overridden=[("x", "y")])
    located.problem(("a", "b", 0), "bad")
    located.problem(("x", "y", "z"), "from the command line")
    located.problem(("x",), "only the parent")
    located.problem((), "top")
    located.problem(("q",), "nowhere")
    assert located.problems == ["f.yaml:4: a.b.0: bad", "--set: x.y.z: from the command line",
                                "f.yaml: x: only the parent", "f.yaml: <top>: top", "f.yaml: q: nowhere"]


def test_expand_tree_reports_every_unset_variable_with_its_key(monkeypatch):
    monkeypatch.delenv("RP_U1", raising=False)
    monkeypatch.delenv("RP_U2", raising=False)
    located = Located("f.yaml", {("a",): 1, ("b", 0): 2})
    out = expand_tree({"a": "${RP_U1}", "b": ["${RP_U2}/x", 3], "c": None}, located)
    assert out == {"a": "${RP_U1}", "b": ["${RP_U2}/x", 3], "c": None}
    assert [p.split(": ")[:2] for p in located.problems] == [["f.yaml:1", "a"], ["f.yaml:2", "b.0"]]


def test_read_yaml_errors_carry_the_kind_of_file(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"a: \xe9\n")
    cases = [(tmp_path / "none.yaml", "no such file"), (write(tmp_path, "a: [1, 2\n"), "not valid YAML"),
             (latin, "cannot read"), (write(tmp_path, "a: ${RP_NOT_SET_X}\n", "env.yaml"),
                                      "environment variable RP_NOT_SET_X is not set")]
    for path, message in cases:
        for reader in (lambda: read_yaml(path, "SFT"), lambda: load_model(Preset, path, kind="SFT")):
            with pytest.raises(ConfigError) as info:
                reader()
            assert info.value.kind == "SFT" and message in str(info.value)
            assert str(info.value).startswith(f"invalid SFT configuration:\n  {path}")
    with pytest.raises(ConfigError) as info:
        read_yaml(tmp_path / "none.yaml", "train")
    assert info.value.problems == [f"{tmp_path / 'none.yaml'}: no such file"]


def test_utf8_is_read_as_utf8(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_bytes("name: caf\u00e9 \u2013 \u6f22\n".encode())
    assert load_model(Preset, path, kind="train").name == "caf\u00e9 \u2013 \u6f22"


def test_parse_override_types_and_errors(monkeypatch):
    monkeypatch.setenv("RP_A", "alpha")
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override(" a =x=y") == (["a"], "x=y")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=") == (["a"], "")
    assert parse_override("a=${RP_A}") == (["a"], "alpha")
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ConfigError) as info:
        parse_override("novalue")
    assert info.value.kind == "train"
    for text, message in (("novalue", "expected key.path=value"), ("=3", "empty key"), ("a=[1", "not valid YAML"),
                          ("a=${RP_NOT_SET_X}", "RP_NOT_SET_X is not set")):
        with pytest.raises(ConfigError) as info:
            parse_override(text, "SFT")
        assert message in str(info.value) and info.value.kind == "SFT" and repr(text) in str(info.value)


def test_apply_overrides_copies_and_creates_mappings():
    data = {"a": {"b": 1}, "keep": [1]}
    out, keys = apply_overrides(data, ["a.b=2", "new.deep.key=x", "top=5"])
    assert out == {"a": {"b": 2}, "keep": [1], "new": {"deep": {"key": "x"}}, "top": 5}
    assert keys == [("a", "b"), ("new", "deep", "key"), ("top",)]
    assert data == {"a": {"b": 1}, "keep": [1]}  # the input is not modified
    for kind, args in (("train", ()), ("RM", ("RM",))):
        for bad in ("keep.x=1", "novalue"):
            with pytest.raises(ConfigError) as info:
                apply_overrides(data, [bad], *args)
            assert info.value.kind == kind
    with pytest.raises(ConfigError, match="keep is not a mapping"):
        apply_overrides(data, ["keep.x=1"])
    assert apply_overrides({}, []) == ({}, [])


def test_load_model_locates_problems_in_file_and_overrides(tmp_path):
    path = write(tmp_path, "name: a\nsteps: lots\nrate: 0.1\nextra: 1\n")
    with pytest.raises(ConfigError) as info:
        load_model(Preset, path, ["rate=fast"], kind="train")
    assert info.value.problems == [f"{path}:2: steps: Input should be a valid integer, unable to parse string as an integer",
                                   "--set: rate: Input should be a valid number, unable to parse string as a number",
                                   f"{path}:4: extra: unknown key"]
    assert info.value.kind == "train"
    cfg = load_model(Preset, None, ["steps=4"], kind="train")
    assert cfg.steps == 4 and cfg.name == "run"
    for bad in ("rate=fast", "novalue", "trl=1", "trl.x.y=2"):
        with pytest.raises(ConfigError) as info:
            load_model(Preset, None, ["trl.x=1", bad] if bad == "trl.x.y=2" else [bad], kind="RM")
        assert info.value.kind == "RM"
    empty = write(tmp_path, "", "empty.yaml")
    assert load_model(Preset, empty, kind="train").steps == 1
    with pytest.raises(ConfigError, match="expected a mapping at the top level") as info:
        load_model(Preset, write(tmp_path, "- 1\n", "list.yaml"), kind="RM")
    assert info.value.kind == "RM"


class Required(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str
    steps: int = 1


def test_load_model_without_a_file_names_the_command_line():
    with pytest.raises(ConfigError) as info:
        load_model(Required, None, ["steps=2"], kind="train")
    assert info.value.problems == ["<command line>: policy: Field required"]


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str
    size: int = 0


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inner: Inner
    items: list[Inner] = []


class NeedsContext(BaseModel):
    name: str

    @field_validator("name")
    @classmethod
    def _seen(cls, value, info):
        if not (info.context or {}).get("allowed"):
            raise ValueError("no context")
        return value


def test_typed_reference_nested_and_with_context(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_NUM", "12")
    path = write(tmp_path, "inner: {label: '${RP_NUM}', size: '${RP_NUM}'}\nitems:\n  - label: ${RP_NUM}\n")
    cfg = load_model(Outer, path, kind="train")
    assert cfg.inner == Inner(label="12", size=12) and cfg.items == [Inner(label="12")]
    path = write(tmp_path, "name: ${RP_NUM}\n", "ctx.yaml")
    assert load_model(NeedsContext, path, kind="train", context={"allowed": True}).name == "12"
    with pytest.raises(ConfigError, match="no context"):
        load_model(NeedsContext, path, kind="train")


def test_validate_leaves_its_input_alone_and_reports_other_string_errors():
    located = Located("f.yaml")
    located.typed[("inner", "label")] = "12"
    data = {"inner": {"label": 12}}
    assert located.validate(Outer, data).inner.label == "12"
    assert data == {"inner": {"label": 12}}
    with pytest.raises(ValidationError):  # a number written as a number, not through ${VAR}: still refused
        located.validate(Outer, {"inner": {"label": 12}, "items": [{"label": 5}]})
    with pytest.raises(ValidationError):
        Located("g.yaml").validate(Outer, {"inner": {"label": 12}})


def test_typed_reference_in_a_reward_config_keeps_check_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_PATTERN", "42")
    path = write(tmp_path, "reward:\n  type: reward_model\n  path: /no/such/rm\n  template: '{prompt}${RP_PATTERN}'\n"
                           "  label_index: 0\n  device: ${RP_PATTERN}\n")
    assert load_pipeline_config(path, check_paths=False).reward.config.device == "42"


class Checked(Preset):
    def config_problems(self):
        return [(("trl", "bogus"), "unknown field")] if "bogus" in self.trl else []


def test_load_model_reports_config_problems_with_lines(tmp_path):
    path = write(tmp_path, "name: a\ntrl:\n  bogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_model(Checked, path, kind="RM")
    assert info.value.problems == [f"{path}:3: trl.bogus: unknown field"]
    assert str(info.value).startswith("invalid RM configuration:")
    assert load_model(Checked, write(tmp_path, "trl:\n  fine: 1\n", "ok.yaml"), kind="RM").trl == {"fine": 1}


def test_config_error_survives_pickling():
    error = ConfigError(["f:1: a: bad", "f:2: b: worse"], "SFT")
    again = copy.deepcopy(error)  # through __reduce__, as pickling across a process boundary (Ray) does
    assert again.problems == error.problems and again.kind == "SFT" and str(again) == str(error)
    assert str(ConfigError(["x"])) == "invalid reward configuration:\n  x"
    assert str(ConfigError(["x", "y"], "train")) == "invalid train configuration:\n  x\n  y"
