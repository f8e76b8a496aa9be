"""`python -m evaluation.run_bon_pipeline` on tiny reward models: outputs, ensemble gold ordering, caching, resumption, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation import run_bon_pipeline
from evaluation.bon import bon_curve
from evaluation.gold_gens import load_gold_gens
from evaluation.rm_text import rm_text
from reward_plugins.ensemble import combine
from reward_plugins.io import DataError, write_jsonl
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer

WORDS = "the quick brown fox jumps over lazy dog story dragon paint map storm ship harbour".split()




def make_rows(seed=0, sizes=(7, 9, 8)):
    rng = np.random.default_rng(seed)
    rows = []
    for p, size in enumerate(sizes):
        answers = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) + f" {p}.{a}" for a in range(size)]
        rows.append({"instruction": f"Write about item {p}.", "input": "with care" if p % 2 else "",
                     "answers": answers, "gold_scores": rng.normal(size=size).round(3).tolist()})
    return rows


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "gens.jsonl"
    write_jsonl(path, make_rows())
    return path


def args_for(tiny_dir, data, out, *extra):
    return [str(tiny_dir / "rm_seed{seed}"), "--seeds", "1,2,3", "--gold-gens", str(data), "-o", str(out),
            "--sample-ns", "1,2,4,16", "--big-n", "8", "--batch-size", "4", *extra]


def assert_curves_close(got, want, rel=1e-5):
    assert [c["n"] for c in got] == [c["n"] for c in want]
    for g, w in zip(got, want):
        for key in ("proxy_score", "gold_score", "kl_bon"):
            assert g[key] == pytest.approx(w[key], rel=rel, abs=1e-9), key


def direct_scores(rm_dir, rows, big_n):
    scorer = RewardModelScorer(RewardModelConfig(path=str(rm_dir), max_length=776, batch_size=4))
    return [scorer.score_texts([rm_text(r["instruction"], r["input"], a) for a in r["answers"][:big_n]])[0] for r in rows]


def test_pipeline_writes_single_and_ensemble_curves(tmp_path, tiny_dir, rm_dirs, data_file):
    out = tmp_path / "run"
    curves = run_bon_pipeline.main(args_for(tiny_dir, data_file, out, "--ensembles", "--uwo-weights", "0,0.5", "--save-sorted"))
    names = {"seed1", "seed2", "seed3", "ensemble_mean", "ensemble_WCO", "ensemble_UWO-0.0", "ensemble_UWO-0.5"}
    assert set(curves) == names
    rows = make_rows()
    gold = [np.array(r["gold_scores"][:8]) for r in rows]
    scores = {s: direct_scores(rm_dirs[s], rows, 8) for s in (1, 2, 3)}
    for name in names:
        written = json.loads((out / name / "bon_sampled_results.json").read_text())
        assert [c["n"] for c in written] == [1, 2, 4]  # 16 > the 7 answers of the shortest prompt
        meta = json.loads((out / name / "bon_meta.json").read_text())
        assert meta["ns_skipped"] == [16] and meta["answers_max"] == 8 and meta["answers_min"] == 7
    expected = bon_curve(scores[1], gold, [1, 2, 4])
    assert_curves_close(curves["seed1"], expected, rel=1e-5)
    # Ensemble gold follows the ensemble's own order, not seed 1's.
    uwo = [combine(np.stack([scores[s][r] for s in (1, 2, 3)]), "uwo", 0.5) for r in range(3)]
    assert_curves_close(curves["ensemble_UWO-0.5"], bon_curve(uwo, gold, [1, 2, 4]), rel=1e-5)
    mean = [np.stack([scores[s][r] for s in (1, 2, 3)]).mean(0) for r in range(3)]
    assert_curves_close(curves["ensemble_UWO-0.0"], bon_curve(mean, gold, [1, 2, 4]), rel=1e-5)
    assert_curves_close(curves["ensemble_UWO-0.0"], curves["ensemble_mean"], rel=1e-9)  # lambda 0 is 0, not 1
    sorted_rows = json.loads((out / "ensemble_WCO" / "proxy_labelled_sorted.json").read_text())
    truth = {a: g for r in rows for a, g in zip(r["answers"], r["gold_scores"])}
    for row in sorted_rows:
        assert row["proxy_scores"] == sorted(row["proxy_scores"]) and len(row["answers"]) <= 8
        assert row["gold_scores"] == [truth[a] for a in row["answers"]]


def test_big_n_truncates_before_scoring(tmp_path, tiny_dir, rm_dirs, data_file):
    out = tmp_path / "run"
    run_bon_pipeline.main(args_for(tiny_dir, data_file, out, "--big-n", "3", "--seeds", "1"))
    (cache,) = (out / "scores").glob("seed1-*")
    assert np.load(cache / "scores.npy").shape == (9,)
    assert json.loads((out / "seed1" / "bon_meta.json").read_text())["answers_max"] == 3


def test_rerun_skips_scoring_and_interrupted_run_resumes(tmp_path, tiny_dir, rm_dirs, data_file, monkeypatch):
    out = tmp_path / "run"
    calls = []
    original = RewardModelScorer.score_texts

    def flaky(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return original(self, texts)

    monkeypatch.setattr(RewardModelScorer, "score_texts", flaky)
    argv = args_for(tiny_dir, data_file, out, "--seeds", "1", "--block-answers", "7")
    with pytest.raises(RuntimeError, match="killed"):
        run_bon_pipeline.main(argv)
    (cache,) = (out / "scores").glob("seed1-*")
    assert [p.name for p in cache.glob("part_*.npy")] == ["part_0000000.npy"]
    first = run_bon_pipeline.main(argv)
    assert calls == [7, 8, 8, 8]  # block 0 scored once; block 1 retried; block 2 scored
    assert not list(cache.glob("part_*.npy")) and (cache / "scores.npy").exists()

    def refuse(self, config):
        raise AssertionError("a rerun must not load the RM")

    monkeypatch.setattr(RewardModelScorer, "__init__", refuse)
    assert run_bon_pipeline.main(argv) == first


def test_parquet_and_saved_dataset_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = make_rows(sizes=(3, 4))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gens.parquet")
    DatasetDict({"validation": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    for source in (tmp_path / "gens.parquet", tmp_path / "hf"):
        gens = load_gold_gens(source, big_n=3)
        assert gens.answers == [r["answers"][:3] for r in rows]
        assert [g.tolist() for g in gens.gold] == [r["gold_scores"][:3] for r in rows]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[1].pop("gold_scores"), r"gens.jsonl:2: missing column\(s\) \['gold_scores'\]"),
        (lambda rows: rows[2]["gold_scores"].__setitem__(1, None), r"gens.jsonl:3: gold score of answer 1 is missing"),
        (lambda rows: rows[0]["gold_scores"].__setitem__(0, math.nan), r"gens.jsonl:1: gold score of answer 0"),
        (lambda rows: rows[1]["gold_scores"].pop(), r"gens.jsonl:2: 8 gold scores for 9 answers"),
        (lambda rows: rows.clear(), r"gens.jsonl: no rows"),
        (lambda rows: rows[0].update(answers=[], gold_scores=[]), r"gens.jsonl:1: no answers"),
    ],
)
def test_bad_data_names_the_row(tmp_path, mutate, message):
    rows = make_rows()
    mutate(rows)
    path = tmp_path / "gens.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=message):
        load_gold_gens(path)


def test_unknown_objective_is_rejected(tmp_path, tiny_dir, data_file, capsys):
    with pytest.raises(SystemExit):
        run_bon_pipeline.main(args_for(tiny_dir, data_file, tmp_path, "--ensembles", "--objectives", "mean,median"))
    assert "unknown ensemble objective(s) ['median']" in capsys.readouterr().err
