"""The evaluation driver end to end with the tiny model: LAReQA and MIRACL-style datasets through
Ray Data encoding and FAISS, and `raysys eval` comparing two models."""

import json
from pathlib import Path

import pytest

from raysys.cli import main
from raysys.config import Config
from raysys.eval.miracl import read_qrels, score_run
from raysys.eval.run import evaluate
from tests.eval.lareqa_fixture import write_synthetic_lareqa
from tests.eval.miracl_fixture import write_miracl
from tests.tiny_model import build_tiny_model


def test_lareqa_and_miracl_datasets(ray_local, tmp_path, tiny_model_dir):
    lareqa = write_synthetic_lareqa(tmp_path / "lareqa")
    miracl = write_miracl(tmp_path / "miracl")
    config = Config.from_yaml(None, ["eval.split=all", "eval.max_length=32"])
    results = evaluate(str(tiny_model_dir), [str(lareqa), f"miracl:{miracl}"], config, tmp_path / "work",
                       progress=False)
    summary = results[str(lareqa)]["summary"]
    assert summary["monolingual"]["num_pairs"] == 3 and summary["cross_lingual"]["num_pairs"] == 6
    assert 0 < summary["multilingual"]["map"] <= 1
    miracl_result = results[f"miracl:{miracl}"]
    assert set(miracl_result["per_language"]) == {"de", "en"}
    for metric in ("ndcg@10", "recall@100", "mrr@10"):
        assert 0 <= miracl_result["summary"][metric] <= 1
    assert miracl_result["summary"]["recall@100"] == 1.0  # 12 documents: all retrieved
    # a second evaluation reuses the embedding shards instead of encoding again
    shards = sorted((tmp_path / "work" / "embeddings").rglob("*.npz"))
    mtimes = [p.stat().st_mtime_ns for p in shards]
    again = evaluate(str(tiny_model_dir), [str(lareqa)], config, tmp_path / "work", progress=False)
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    # a topics file edited in place (same topic ids, other words) is encoded again, not answered from the cache
    topics = miracl / "de" / "topics.tsv"
    topics.write_text(topics.read_text(encoding="utf-8").replace("topic", "subject"), encoding="utf-8")
    evaluate(str(tiny_model_dir), [f"miracl:{miracl}"], config, tmp_path / "work", progress=False)
    assert len(list((tmp_path / "work" / "embeddings").glob("miracl-de-topics-*"))) == 2
    assert len(list((tmp_path / "work" / "embeddings").glob("miracl-en-topics-*"))) == 1
    # fp16 index storage: the same cached embeddings (encoding is unchanged), the storage recorded
    half = evaluate(str(tiny_model_dir), [str(lareqa), f"miracl:{miracl}"],
                    Config.from_yaml(None, ["eval.split=all", "eval.max_length=32", "eval.index_dtype=fp16"]),
                    tmp_path / "work", progress=False)
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    assert half[str(lareqa)]["index_dtype"] == half[f"miracl:{miracl}"]["index_dtype"] == "fp16"
    assert "index_dtype" not in again[str(lareqa)]
    assert half[str(lareqa)]["summary"]["multilingual"]["map"] == pytest.approx(
        again[str(lareqa)]["summary"]["multilingual"]["map"], abs=0.05)
    # determinism: encoding from scratch in another work dir gives the same metrics
    fresh = evaluate(str(tiny_model_dir), [str(lareqa)], config, tmp_path / "work2", progress=False)
    for setting in ("monolingual", "cross_lingual", "multilingual"):
        for metric, value in again[str(lareqa)]["summary"][setting].items():
            assert fresh[str(lareqa)]["summary"][setting][metric] == pytest.approx(value, abs=1e-9), (setting, metric)


def test_cli_eval_compares_two_models(ray_local, tmp_path, tiny_model_dir, capsys):
    other = build_tiny_model(tmp_path / "other", seed=1)
    lareqa = write_synthetic_lareqa(tmp_path / "lareqa")
    miracl = f"miracl:{write_miracl(tmp_path / 'miracl')}"
    out = tmp_path / "report"
    code = main(["eval", "--model", f"first={tiny_model_dir}", "--model", f"second={other}",
                 "--datasets", str(lareqa), miracl, "--out", str(out), "eval.split=all", "eval.max_length=32"])
    assert code == 0
    table = (out / "comparison" / "comparison.md").read_text()
    assert "first" in table and "second" in table
    assert f"{miracl} ndcg@10" in table  # MIRACL-style columns next to the LAReQA ones
    assert "Paired bootstrap" in table and "second vs first" in table
    for label in ("first", "second"):
        metrics = json.loads((out / label / "metrics.json").read_text())
        assert 0 < metrics[str(lareqa)]["summary"]["monolingual"]["map"] <= 1
        assert set(metrics[miracl]["per_language"]) == {"de", "en"}
        assert 0 <= metrics[miracl]["summary"]["ndcg@10"] <= 1
        assert "recall@100" in (out / label / "summary.md").read_text()
        assert list((out / label).glob("heatmap_*.png"))
        # TREC run files beside the report: scoring them again gives the reported metrics
        for lang in ("de", "en"):
            trec = [line.split() for line in next((out / label).glob(f"run_*_{lang}.trec")).read_text().splitlines()]
            assert {row[5] for row in trec} == {"other" if label == "second" else tiny_model_dir.name}
            run: dict[str, list[str]] = {}
            for qid, q0, docid, rank, score, _ in trec:
                assert q0 == "Q0" and int(rank) == len(run.setdefault(qid, [])) + 1
                run[qid].append(docid)
            scores = [float(row[4]) for row in trec if row[0] == "q0"]
            assert scores == sorted(scores, reverse=True) and len(run["q0"]) == 12
            qrels = read_qrels(Path(miracl.split(":", 1)[1]) / lang / "qrels.tsv")
            assert score_run(run, qrels)["mean"] == pytest.approx(metrics[miracl]["per_language"][lang], abs=1e-12)
    printed = capsys.readouterr().out  # the closing summary: both runs' headline rows and the comparison's path
    lines = printed.splitlines()
    assert any(line.startswith("[eval] done in") for line in lines)
    assert any(line.startswith("comparison:") and line.endswith(f" {out / 'comparison' / 'comparison.md'}")
               for line in lines)
    assert f"| first | {lareqa} |" in printed and f"| second | {miracl} |" in printed


def test_auto_split_holds_out_only_the_training_dataset(tmp_path, xquad_r_dir):
    from raysys.eval.run import resolve_split

    other = write_synthetic_lareqa(tmp_path / "other-set")
    config = Config.from_yaml(None, [f"data.train={xquad_r_dir}"])
    assert config.eval.split == "auto"
    assert resolve_split(xquad_r_dir, config) == "test"  # trained on: held-out articles only
    assert resolve_split(other, config) == "all"  # zero-shot: every article
    copy = tmp_path / "cache" / "xquad-r"  # a cached copy of the training set counts as the same
    copy.mkdir(parents=True)
    assert resolve_split(copy, config) == "test"
    explicit = Config.from_yaml(None, [f"data.train={xquad_r_dir}", "eval.split=all"])
    assert resolve_split(xquad_r_dir, explicit) == "all"


def test_evaluates_the_test_split_of_a_pairs_file(ray_local, tmp_path, tiny_model_dir):
    """A JSONL training file's held-out rows are evaluated like a LAReQA set (eval.split=auto)."""
    from raysys.eval.pairs_corpus import pairs_eval_corpus, read_pairs_table
    from tests.eval.test_pairs_corpus import write_pairs

    path = write_pairs(tmp_path / "pairs.jsonl", langs=("en", "de", "fr"))
    config = Config.from_yaml(None, [f"data.train={path}", "data.test_fraction=0.2", "eval.max_length=32"])
    results = evaluate(str(tiny_model_dir), [str(path)], config, tmp_path / "work", progress=False)
    held_out = pairs_eval_corpus(read_pairs_table(str(path), "hash"), str(path), "test", "hash",
                                 config.data.validation_fraction, 0.2)
    queries_per_language = len(held_out.questions) // 3
    result = results[str(path)]
    assert result["summary"]["monolingual"]["num_pairs"] == 3 and result["summary"]["cross_lingual"]["num_pairs"] == 6
    assert {v["num_queries"] for v in result["pairs"].values()} == {queries_per_language}
    assert 0 < result["summary"]["multilingual"]["map"] <= 1


@pytest.mark.parametrize("rule", ["order", "hash"])
def test_evaluation_holds_out_what_training_left_out_under_either_rule(tmp_path, rule):
    from raysys.eval.run import load_eval_corpus
    from raysys.train.datasets import lareqa_split_tables

    lareqa = write_synthetic_lareqa(tmp_path / "lareqa", articles=12)
    config = Config.from_yaml(None, [f"data.train={lareqa}", "data.validation_fraction=0.2", "data.test_fraction=0.2",
                                     f"data.split_rule={rule}"])
    test_groups = set(load_eval_corpus(str(lareqa), config).questions.column("group").to_pylist())
    trained = lareqa_split_tables(config, str(lareqa))
    seen = {g for table in trained.values() for g in table.column("group").to_pylist()}
    assert test_groups and not test_groups & seen
    assert test_groups | seen == {f"article-{i:03d}" for i in range(12)}


@pytest.mark.slow  # two MIRACL-style evaluations: `make test-slow`
def test_miracl_with_an_approximate_index_reports_its_recall(ray_local, tmp_path, tiny_model_dir):
    """eval.ann_index: MIRACL-style top-k from IVF shards; visiting every list equals exact search,
    and the recall against exact search is in the result and in the report beside the metrics."""
    from raysys.eval.report import write_report

    miracl = f"miracl:{write_miracl(tmp_path / 'miracl')}"
    exact = evaluate(str(tiny_model_dir), [miracl], Config.from_yaml(None, ["eval.max_length=32"]), tmp_path / "work",
                     progress=False)[miracl]
    config = Config.from_yaml(None, ["eval.max_length=32", "eval.ann_index=IVF2,Flat", "eval.ann_params=nprobe=2",
                                     "eval.ann_recall_queries=2"])
    approximate = evaluate(str(tiny_model_dir), [miracl], config, tmp_path / "work", progress=False)[miracl]
    assert approximate["summary"] == exact["summary"] and "approximate_search" not in exact
    for lang in ("de", "en"):
        assert approximate["approximate_search"][lang] == {"index": "IVF2,Flat", "params": "nprobe=2",
                                                           "sampled_queries": 2, "recall@10": 1.0, "recall@12": 1.0}
    write_report({miracl: approximate}, tmp_path / "report")
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**Approximate search**" in summary and "`IVF2,Flat` (nprobe=2)" in summary and "recall@12 1" in summary
