"""README.md and docs/*.md are rendered from docs/templates/ and benchmarks/results/*.json, and say true things
about the Python version."""

import copy
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_docs = load_renderer()


@pytest.fixture(scope="module")
def results():
    return render_docs.load_results()


def test_committed_pages_are_what_the_templates_and_results_render(results):
    stale = [render_docs.shown(page) for page in render_docs.differing_pages(results)]
    assert not stale, f"{stale} differ from their rendering: run python scripts/render_docs.py"


def test_every_page_has_a_template_and_readme_is_one_of_them():
    pages = render_docs.pages()
    assert ROOT / "README.md" in pages
    assert {ROOT / "docs" / name for name in ("rag.md", "editing.md", "influence.md")} <= set(pages)


@pytest.mark.parametrize("template", sorted(path.name for path in render_docs.TEMPLATES.glob("*.md")))
def test_templates_write_numbers_only_through_placeholders(template):
    """A number typed into a template goes stale when the results change: it must come from a JSON file, or be
    marked `{{ spec ... }}` (a target or a setting)."""
    assert render_docs.stray_numbers((render_docs.TEMPLATES / template).read_text()) == []


def test_check_names_the_page_that_differs(results, monkeypatch, capsys):
    changed = copy.deepcopy(results)
    changed["index_build"]["docs"] += 1
    monkeypatch.setattr(render_docs, "load_results", lambda folder=None: changed)
    assert render_docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md differs" in err and "docs/rag.md differs" in err and "docs/editing.md" not in err


def test_the_rag_table_has_a_row_per_condition_and_drops_missing_columns(results):
    summary = copy.deepcopy(results["rag_eval_dev"])
    for condition in summary["conditions"]:
        summary[condition].update(p50_ms=100.0, p95_ms=200.0)
    table = render_docs.table_rag(summary).splitlines()
    assert table[0] == "| condition | EM | F1 | contains | tokens in | × full RAG | p50 ms | p95 ms |"
    assert len(table) == 2 + len(summary["conditions"]) and table[2].startswith("| no retrieval | ")
    del summary["rag"]["p95_ms"]
    assert "p95 ms" not in render_docs.table_rag(summary).splitlines()[0]


def test_the_compression_table_has_a_row_per_condition_of_the_part(results):
    report = copy.deepcopy(results["compression_eval"])
    picked = [row for row in report["rows"] if row["split"] == "tune"]
    table = render_docs.table_compression(report, "tune", "clean").splitlines()
    assert len(table) == 2 + len(picked)
    assert "| contains % [95% CI] | − rag@1, points [95% CI] |" in table[0] and "p50 ms" not in table[0]
    top1 = next(line for line in table if line.startswith("| uncompressed | 1 |"))
    assert "| reference |" in top1
    for row in picked:
        row.update(p50_ms=1.0, p95_ms=2.0)
    assert render_docs.table_compression(report, "tune", "clean").splitlines()[0].endswith("| p50 ms | p95 ms |")


def test_paths_select_compute_and_format():
    results = {"r": {"rows": [{"name": "a", "n": 1, "x": 0.5}, {"name": "b", "n": 16, "x": 0.25},
                              {"name": "a", "n": 16, "x": 0.125}], "big": 251542141.6}}
    value = lambda expression: render_docs.evaluate(expression, results, {"A": "r.rows[name=a]"})  # noqa: E731
    assert value("r.rows[name=b].x") == 0.25
    assert value("A.n") == [1, 16]
    assert value("A[-1].x") == 0.125
    assert value("r.rows[name!=a].n") == 16
    assert value("r.rows[n=2..16,name=a|b].x") == [0.25, 0.125]
    assert value("max(A.x * A.n)") == 2.0
    assert render_docs.fmt(value("span(r.rows[:].x)"), "f2") == "0.12–0.50"
    assert render_docs.fmt(value("A.x"), "pct1") == "50.0 / 12.5"
    assert render_docs.fmt(results["r"]["big"], "ratio") == "2.5·10⁸"
    assert render_docs.fmt(1024, None) == "1,024"
    with pytest.raises(KeyError, match="no item matches"):
        value("r.rows[name=c].x")
    with pytest.raises(ValueError, match="needs a FORMAT"):
        render_docs.fmt(0.5, None)


def test_a_bad_placeholder_names_its_template(tmp_path, results):
    template = tmp_path / "bad.md"
    template.write_text("ok {{ index_build.docs }}, bad {{ index_build.no_such_key | f2 }}\n")
    with pytest.raises(render_docs.RenderError, match=r"bad\.md: \{\{ index_build\.no_such_key \| f2 \}\}"):
        render_docs.render(template, results)


def stated_pythons() -> set[str]:
    return set(re.findall(r"Python (3\.\d+)", (ROOT / "README.md").read_text()))


def test_readme_states_the_python_versions_pyproject_allows():
    allowed = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    stated = stated_pythons()
    assert stated, "README.md names no Python version"
    assert {f"3.{minor}" for minor in range(8, 20) if f"3.{minor}.0" in allowed} == stated


def test_this_interpreter_satisfies_requires_python():
    allowed = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    running = ".".join(map(str, sys.version_info[:3]))
    assert running in allowed, f"Python {running} is outside requires-python {allowed}"


def test_ruff_targets_the_oldest_allowed_python():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    allowed = SpecifierSet(pyproject["project"]["requires-python"])
    oldest = min(minor for minor in range(8, 20) if f"3.{minor}.0" in allowed)
    assert pyproject["tool"]["ruff"]["target-version"] == f"py3{oldest}"


def test_the_edit_targets_table_says_met_or_short_by_how_much():
    def row(editor, n, es, ls, **more):
        return {"editor": editor, "n_edits": n, "es": es, "ls": ls, "gs": 0.7, "offtemplate_agreement": 0.8,
                "ls_gold_drawdown": 0.01, "ppl_ratio": 1.2, "known_tokens_kept": None, **more}

    report = {"rows": [row("malmen", 1024, 0.9, 0.7), row("ft_kl", 1024, 0.5, 0.6), row("malmen", 128, 0.9, 0.9),
                       row("ft_kl", 128, 0.6, 0.6), row("memit", 128, 0.8, 0.8)]}
    lines = {line.split(" | ")[0].lstrip("| "): line for line in
             render_docs.table_edit_targets(report, "1024").splitlines()[2:]}
    assert lines["ES (teacher-forced) ≥ 0.85"] == "| ES (teacher-forced) ≥ 0.85 | 0.90 (met) | 0.50 (short by 0.350) |"
    assert "1.20 (short by 0.100)" in lines["perplexity ratio ≤ 1.10"] and "–" in lines["known tokens kept ≥ 0.70"]
    # N = 128: malmen's 0.81 against memit's 0.64; ft_kl's 0.36 against memit's alone.
    assert lines["ES × strict LS > ft_kl's and memit's at N = 128"].endswith("| 0.81 (met) | 0.36 (short by 0.280) |")
    # N = 1,024 has no memit row: no verdict yet.
    assert lines["ES × strict LS > ft_kl's and memit's at N = 1,024"].count("no rival row yet") == 2
