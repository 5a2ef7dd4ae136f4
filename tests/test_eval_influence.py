"""`trustray eval influence` end to end on a tiny Llama with Ray: reports, plots, reuse, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trustray.artifacts import ArtifactMismatchError
from trustray.config import load_config
from trustray.core.influence.comparison import ReductionSpec
from trustray.core.influence.scoring import fraction_count
from trustray.pipelines import eval_influence
from trustray.pipelines.eval_influence import EvalInfluenceConfig
from trustray.pipelines.eval_influence_report import format_table

TINY = Path(__file__).resolve().parents[1] / "configs" / "eval_influence" / "tiny.yaml"


def _config(model: str, tmp_path: Path, *overrides: str) -> EvalInfluenceConfig:
    config = load_config(EvalInfluenceConfig, TINY, [f"model={model}", f"output_dir={tmp_path / 'out'}",
                                                     f"results_dir={tmp_path / 'results'}", *overrides])
    # `none` scored like a reduction must reproduce the exact scores: a check of the whole scoring path.
    config.features.reductions.append(ReductionSpec(key="none", name="none"))
    return config


@pytest.fixture(scope="module")
def evaluated(tiny_llama_dir, tmp_path_factory, ray_local):
    tmp_path = tmp_path_factory.mktemp("eval-influence")
    config = _config(tiny_llama_dir, tmp_path)
    return config, eval_influence.run(config), tmp_path


def test_reports_have_the_promised_shape(evaluated):
    config, summary, tmp_path = evaluated
    results = tmp_path / "results"
    fidelity = json.loads((results / "influence_fidelity.json").read_text())
    assert fidelity["machine"]["cpu_count"] >= 1 and fidelity["frozen_layers_cached"] == 1
    lora_size = fidelity["lora"]["size"]
    for name in ("gaussian", "rademacher", "sjlt", "pca", "kron-random", "kron-pca", "none"):
        rows = fidelity["results"][name]
        assert rows and all({"dim", "spearman", "top5_overlap", "features"} <= row.keys() for row in rows)
    assert {row["features"] for row in fidelity["results"]["kron-pca"]} == {"sgd"}
    assert {row["dim"] for row in fidelity["results"]["sjlt"]} == {8, 32, lora_size}
    assert any("dense_max_dim" in item["reason"] for item in fidelity["skipped"])
    for row in fidelity["results"]["none"]:
        assert row["dim"] == lora_size and row["spearman"] == pytest.approx(1.0) and row["top5_overlap"] == 1.0

    lds = json.loads((results / "influence_lds.json").read_text())
    assert lds["n_subsets"] == config.lds.n_subsets
    rows = {(r["features"], r["metric"], r["reduction"], r["dim"]): r for r in lds["rows"]}
    assert all({"reduction", "dim", "lds"} <= row.keys() for row in lds["rows"])
    for kind in ("sgd", "adam"):
        exact, none = rows[(kind, "inner_product", "exact", lora_size)], rows[(kind, "inner_product", "none", lora_size)]
        assert none["lds"] == pytest.approx(exact["lds"]) and -1 <= exact["lds"] <= 1

    selection = json.loads((results / "influence_selection.json").read_text())
    by_method = {row["method"]: row for row in selection["rows"]}
    pool = fidelity["pool"]
    assert by_method["full"]["examples"] == pool
    assert by_method["exact"]["examples"] == fraction_count(pool, config.selection.top_fraction)
    assert {"random-0", "random-1", "base (no fine-tune)"} <= by_method.keys()
    assert by_method["full"]["target_loss"] < by_method["base (no fine-tune)"]["target_loss"]
    for name in ("fidelity", "lds", "selection"):
        assert (results / f"influence_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "LDS" in format_table(summary)


def test_a_rerun_reuses_every_finished_step(evaluated):
    config, summary, _ = evaluated
    out = Path(config.output_dir)
    stamps = {path: path.stat().st_mtime_ns for path in out.glob("*/*.json") if path.parent.name != "report"}
    again = eval_influence.run(config)
    assert again["lds"]["rows"] == summary["lds"]["rows"]
    assert again["selection"]["rows"] == summary["selection"]["rows"]
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps and len(stamps) > 10


def test_an_output_made_with_other_settings_is_refused(evaluated, tiny_llama_dir):
    config, _, tmp_path = evaluated
    other = _config(tiny_llama_dir, tmp_path, "features.dims=[4,16]")
    with pytest.raises(ArtifactMismatchError, match="settings"):
        eval_influence.run(other)
