"""Every data command refuses to write 0 rows (one line, non-zero exit) and warns in one line when more than
`--max_reject_share` of its rows were rejected, naming the main reason."""

from __future__ import annotations

import json

from setup_data import compute_baseline_perplexity, convert, story_format


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_convert_refuses_an_empty_output_and_warns_on_many_rejects(tmp_path, capsys):
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "p"}, {"prompt": "q", "chosen": "a"}])
    out = tmp_path / "out.jsonl"
    assert convert.main(["--from", "llm_on_ray_rm", "--to", "rm", "--input", str(bad), "--output", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "0 rows to write (2 of 2 rejected, mostly missing_key (2))" in line and not out.exists()
    mixed = write(tmp_path / "mixed.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q"}, "{"])
    assert convert.main(["--from", "llm_on_ray_rm", "--to", "rm", "--input", str(mixed), "--output", str(out)]) == 0
    assert "2 of 3 rows rejected (67%)" in one_error_line(capsys.readouterr().err)


def test_story_format_refuses_an_empty_output(tmp_path, capsys):
    source = write(tmp_path / "stories.jsonl", [{"story_id": "a", "chapter_index": 0}])
    assert story_format.main(["--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "0 rows to write" in one_error_line(capsys.readouterr().err)


def test_baseline_script_refuses_a_split_with_nothing_to_score_before_loading_work(tmp_path, lm_dir, capsys):
    data = tmp_path / "rl"
    data.mkdir()
    write(data / "val.jsonl", [{"prompt": "p", "label": {"id": "a", "gold": "g"}}, {"prompt": "p"}])
    argv = ["--model_name", str(lm_dir), "--nice_model_name", "t", "--data_dir", str(data), "--splits", "val",
            "--reward_config", "configs/rewards/vrcli.yaml", "--quiet"]
    assert compute_baseline_perplexity.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "0 rows to write (2 of 2 rejected" in line and "baseline_rejects_t.jsonl" in line
    assert not (tmp_path / "rl_with_baseline" / "val.jsonl").exists()
