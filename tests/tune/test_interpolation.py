"""The interpolation curves of several runs summarised over seeds (raysys.tune.interpolation):
means and ranges per weight, the weight each run chose, one figure."""

import json

import pytest

from raysys.errors import RaysysError
from raysys.tune.interpolation import write_curves_over_seeds


def record(chosen: float, mono: list[float], shift: float = 0.0) -> dict:
    rows = [{"weight": w, "mono_map": m, "cross_map": 0.6 + w / 10 + shift, "multi_map": 0.3 + w / 5 + shift,
             "mean_map": 0.0, "rank_distance": 300.0 - 150 * w, "model": f"weight-{w:g}"}
            for w, m in zip((0.0, 0.5, 1.0), mono)]
    return {"rule": "keep_mono", "curve": rows, "best": next(r for r in rows if r["weight"] == chosen)}


def test_curves_over_seeds_are_averaged_with_their_range(tmp_path):
    curves = {"hybrid": [record(0.5, [0.80, 0.81, 0.78]), record(0.5, [0.80, 0.80, 0.76], shift=0.02)],
              "X-Y": [record(0.0, [0.80, 0.79, 0.75])]}
    out = write_curves_over_seeds(curves, str(tmp_path))
    saved = json.loads((tmp_path / "interpolation_curves.json").read_text())["curves"]
    hybrid = saved["hybrid"]
    assert hybrid["weights"] == [0.0, 0.5, 1.0] and hybrid["chosen"] == [0.5, 0.5] and hybrid["seeds"] == 2
    assert hybrid["mono_map"]["mean"] == pytest.approx([0.80, 0.805, 0.77])
    assert hybrid["cross_map"]["min"] == pytest.approx([0.6, 0.65, 0.7])
    assert hybrid["cross_map"]["max"] == pytest.approx([0.62, 0.67, 0.72])
    assert saved["X-Y"]["chosen"] == [0.0]
    assert (tmp_path / "interpolation_curves.png").stat().st_size > 0
    assert "| hybrid | 0.5 | 0.8050 |" in out["markdown"] and "chosen w per seed 0.5, 0.5" in out["markdown"]


def test_curves_with_other_weights_are_refused(tmp_path):
    other = record(1.0, [0.8, 0.8, 0.8])
    other["curve"] = other["curve"][1:]
    with pytest.raises(RaysysError, match="different weights"):
        write_curves_over_seeds({"hybrid": [record(0.5, [0.8, 0.8, 0.8]), other]}, str(tmp_path))
