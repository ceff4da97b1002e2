"""Report files from real LAReQA results on the synthetic fixture corpus."""

import copy
import json
import math

import matplotlib.image
import numpy as np
import pytest

from raysys.data.lareqa import read_lareqa_dir
from raysys.eval.lareqa import evaluate_lareqa
from raysys.eval.report import format_summary_table, pair_matrix, write_comparison, write_report
from tests.eval.lareqa_fixture import LANGS, write_synthetic_lareqa
from tests.eval.test_lareqa_eval import slot_embeddings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    corpus = read_lareqa_dir(write_synthetic_lareqa(tmp_path_factory.mktemp("lareqa")))
    rng = np.random.default_rng(0)
    out = {}
    for label, weight in (("unbiased", 0.0), ("biased", 2.0)):
        q, c = slot_embeddings(corpus, language_weight=weight)
        out[label] = {"synth": evaluate_lareqa(corpus, q, c)}
    q = rng.normal(size=(corpus.questions.num_rows, 8)).astype(np.float32)
    c = rng.normal(size=(corpus.candidates.num_rows, 8)).astype(np.float32)
    out["random"] = {"synth": evaluate_lareqa(corpus, q, c), "other": evaluate_lareqa(corpus, q, c)}
    return out


def assert_png(path, min_width=100):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[1] > min_width and image.shape[0] > 50


def test_write_report_files_and_values(runs, tmp_path):
    results = runs["random"]
    paths = write_report(results, tmp_path, title="synthetic")
    expected = {"metrics.json", "summary.md"} | {f"{kind}_{d}.{ext}" for d in ("synth", "other")
                                                 for kind, ext in (("pairs", "csv"), ("heatmap", "png"),
                                                                   ("rank_distance", "png"))}
    assert set(paths) == expected
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temp leftovers

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["synth"]) == {"summary", "pairs", "multilingual_per_language"}
    assert metrics["synth"]["summary"] == results["synth"]["summary"]
    assert metrics["synth"]["pairs"] == results["synth"]["pairs"]

    md = (tmp_path / "summary.md").read_text()
    s = results["synth"]["summary"]
    assert md.startswith("# synthetic")
    row = next(line for line in md.splitlines() if line.startswith("| synth |"))
    for setting in ("monolingual", "cross_lingual", "multilingual"):
        assert f"{s[setting]['map']:.3f}" in row
    assert f"{s['multilingual']['rank_distance']:.1f}" in row
    assert f"{s['cross_lingual']['recall@10']:.3f}" in md
    assert format_summary_table(results) in md

    lines = (tmp_path / "pairs_synth.csv").read_text().splitlines()
    assert lines[0] == "query\\candidate," + ",".join(sorted(LANGS))
    de_en = float(lines[1].split(",")[2])
    assert de_en == pytest.approx(results["synth"]["pairs"]["de-en"]["map"], abs=1e-6)
    for name in ("heatmap_synth.png", "rank_distance_synth.png"):
        assert_png(tmp_path / name)


def test_write_comparison_tables_json_and_bootstrap(runs, tmp_path):
    bootstrap = {"biased vs unbiased": {"synth": {"multilingual": {
        "mean_diff": -0.1234, "low": -0.2, "high": -0.05, "p_value": 0.0002}}}}
    paths = write_comparison(runs, tmp_path, baseline="unbiased", bootstrap=bootstrap)
    assert set(paths) == {"comparison.md", "comparison.json", "comparison_synth.png", "comparison_other.png"}
    md = (tmp_path / "comparison.md").read_text()
    table = md.split("\n\n## ")[0]
    for label in runs:
        assert sum(line.startswith(f"| {label} |") for line in table.splitlines()) == 1
    unbiased = next(line for line in table.splitlines() if line.startswith("| unbiased |"))
    biased = next(line for line in table.splitlines() if line.startswith("| biased |"))
    # unbiased is perfect on multilingual mAP and has the lowest rank distance (2.0 vs 13.0)
    assert "**1.000**" in unbiased and "**2.0**" in unbiased and "13.0" in biased
    assert "**13.0**" not in biased
    assert "| random |" in table and "n/a" in table  # biased/unbiased have no "other" dataset
    assert "-0.123" in md and "[-0.200, -0.050]" in md and "<0.001" in md
    assert "Difference from baseline `unbiased`" in md

    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["runs"]["biased"]["synth"] == runs["biased"]["synth"]["summary"]
    assert data["baseline"] == "unbiased" and data["bootstrap"] == bootstrap
    assert data["delta_vs_baseline"]["unbiased"]["synth Multi mAP"] == 0.0
    for d in ("synth", "other"):
        assert_png(tmp_path / f"comparison_{d}.png")
    with pytest.raises(ValueError):
        write_comparison(runs, tmp_path, baseline="missing")


def test_nan_values_become_null_and_na(runs, tmp_path):
    result = copy.deepcopy(runs["biased"]["synth"])
    result["summary"]["cross_lingual"]["map"] = float("nan")
    result["pairs"]["de-fr"]["map"] = float("nan")
    del result["pairs"]["fr-de"]  # a pair with no queries (partial parallelism)
    result["multilingual_per_language"]["en"]["rank_distance"] = np.float64("nan")
    write_report({"synth": result}, tmp_path)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text
    metrics = json.loads(text)
    assert metrics["synth"]["summary"]["cross_lingual"]["map"] is None
    assert metrics["synth"]["pairs"]["de-fr"]["map"] is None
    assert metrics["synth"]["multilingual_per_language"]["en"]["rank_distance"] is None
    assert "n/a" in format_summary_table({"synth": result})
    q, c, matrix = pair_matrix(result["pairs"])
    assert math.isnan(matrix[q.index("fr"), c.index("de")])
    assert (tmp_path / "pairs_synth.csv").read_text().splitlines()[1].split(",")[3] == ""  # de-fr
    assert_png(tmp_path / "heatmap_synth.png")
    assert_png(tmp_path / "rank_distance_synth.png")
    write_comparison({"a": {"synth": result}, "b": runs["biased"]}, tmp_path)
    assert "n/a" in (tmp_path / "comparison.md").read_text()


def test_fp16_index_storage_is_said_under_the_table(runs, tmp_path):
    results = {name: dict(result) for name, result in runs["random"].items()}
    results["synth"]["index_dtype"] = "fp16"
    write_report(results, tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["synth"]["index_dtype"] == "fp16"
    assert "index_dtype" not in json.loads((tmp_path / "metrics.json").read_text())["other"]
    md = (tmp_path / "summary.md").read_text()
    assert "**Index storage** (synth): candidates kept in fp16" in md and "(other)" not in md
