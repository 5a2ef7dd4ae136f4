"""edit_apply, eval_edit and edit_train end to end on a tiny Llama with Ray."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from trustray.artifacts import ArtifactMismatchError
from trustray.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_edit_apply_writes_an_edit_set_that_applies_and_reverts(tiny_llama_dir, tmp_path, ray_local):
    from transformers import AutoModelForCausalLM

    from trustray.core.editing.editset import load
    from trustray.models.sources import model_fingerprint
    from trustray.pipelines.edit_apply import EditApplyConfig, run

    config = load_config(EditApplyConfig, CONFIGS / "edit_apply" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'set'}"])
    folder = run(config)
    edit_set = load(folder, {"base_model_fingerprint": model_fingerprint(tiny_llama_dir)})
    metadata = edit_set.metadata
    assert metadata["editor"] == "ft" and metadata["n_edits"] == 4 and len(metadata["edits"]) == 4
    assert metadata["metrics"]["after"]["es"] > metadata["metrics"]["before"]["es"]
    assert list(edit_set.deltas) == ["model.layers.1.mlp.down_proj"]
    # LoRA exports: a larger rank reconstructs the edit better; each reports the edit success it keeps.
    lora = {entry["rank"]: entry for entry in metadata["metrics"]["lora"]}
    assert 0 <= lora[16]["relative_error"] < lora[1]["relative_error"] <= 1
    assert all(0 <= entry["es"] <= 1 for entry in lora.values())

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = model(input_ids=ids).logits
    with edit_set.apply(model):
        assert not torch.allclose(model(input_ids=ids).logits, logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eval_edit_memit_row_from_parts_searched_in_parallel(tiny_llama_dir, tmp_path, ray_local):
    """work_parts = 2: two tasks search MEMIT's targets for halves of the records first; the row then finds all of
    them in the work cache and counts their time."""
    from trustray.pipelines import eval_edit

    memit = {"editor": "memit", "general_texts": 4, "editor_settings": {
        "modules": {"layers": [0]}, "covariance_weight": 1.0, "target_steps": 3, "batch_size": 2}}
    config = load_config(eval_edit.EvalEditConfig, CONFIGS / "eval_edit" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'eval'}", "results_dir=null",
                          "n_edits=[4]", "generation_sample=0", "offtemplate=null", "work_parts=2"])
    row = eval_edit.run(config.model_copy(update={"editors": [eval_edit.EditorRun(**memit)]}))["rows"][0]
    assert row["editor"] == "memit" and row["n_edits"] == 4
    assert 0 < row["reused_seconds"] <= row["seconds"]
    assert len(list((tmp_path / "eval" / "work-cache").glob("*.pt"))) == 4


def test_eval_edit_scaling_rows_plot_and_reuse(tiny_llama_dir, tmp_path, ray_local):
    from trustray.pipelines import eval_edit

    config = load_config(eval_edit.EvalEditConfig, CONFIGS / "eval_edit" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'eval'}",
                          f"results_dir={tmp_path / 'results'}"])
    report = eval_edit.run(config)
    rows = {(row["editor"], row["n_edits"]): row for row in report["rows"]}
    assert set(rows) == {("ft", 1), ("ft", 4), ("ft_kl", 1)} and report["missing"] == []
    for row in rows.values():
        assert {"es", "gs", "ls", "ppl_ratio", "seconds", "peak_mem_mb", "es_generate", "rag_dev_closed_book", "es_exact",
                "offtemplate_agreement", "ls_gold_drawdown", "known_kept", "known_tokens_kept", "scored_records"} <= row.keys()
        assert 0 <= row["es"] <= 1 and row["ppl_ratio"] > 0 and row["peak_mem_mb"] >= 0
        assert row["prefix_cached"] and row["run"]["editor"] == row["editor"]
        assert 0 <= row["offtemplate_agreement"] <= 1 and set(row["offtemplate_by_source"]) == {"fanoutqa", "cloze"}
        # The drawdown is measured from the unedited model's own gold accuracy, which the base row reports too.
        assert row["offtemplate_gold_before"] == pytest.approx(report["base"]["offtemplate_gold"])
        assert row["ls_gold_drawdown"] == pytest.approx(row["offtemplate_gold_before"] - row["offtemplate_gold"])
    # N = 1 is the mean of single edits (two in the tiny preset), N = 4 one edit of four records.
    assert rows[("ft", 1)]["single_edit_runs"] == 2 == rows[("ft", 1)]["scored_records"]
    assert rows[("ft", 1)]["offtemplate_runs"] == 1  # the off-template questions on the first single edit only
    assert rows[("ft", 4)]["scored_records"] == 4 and "single_edit_runs" not in rows[("ft", 4)]
    assert rows[("ft", 4)]["reused_seconds"] == 0  # ft keeps no work between rows (memit keeps its targets)
    saved = json.loads((tmp_path / "results" / "edit_scaling.json").read_text())
    assert saved["machine"]["cpu_count"] >= 1 and len(saved["rows"]) == 3
    assert (tmp_path / "results" / "edit_scaling.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval" / "rows").glob("*.json")}
    assert eval_edit.run(config)["rows"] == report["rows"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert "ES" in eval_edit.format_table(report)
    # A second run of one editor, told apart by its label: its own rows; the others are reused untouched.
    first = config.editors[0]
    labelled = config.model_copy(update={"editors": [*config.editors, first.model_copy(update={
        "label": "ft_short", "editor_settings": {**first.editor_settings, "steps": 2}, "max_edits": 1})]})
    grown = {(row["editor"], row["n_edits"]): row for row in eval_edit.run(labelled)["rows"]}
    assert set(grown) == set(rows) | {("ft_short", 1)} and grown[("ft_short", 1)]["run"]["editor_settings"]["steps"] == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Raising an editor's max_edits adds its larger N and keeps its rows already computed.
    raised = labelled.model_copy(update={"editors": [
        run.model_copy(update={"max_edits": None}) if run.editor == "ft_kl" else run for run in labelled.editors]})
    assert ("ft_kl", 4) in {(row["editor"], row["n_edits"]) for row in eval_edit.run(raised)["rows"]}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ValueError, match="label"):
        eval_edit.EvalEditConfig(editors=[{"editor": "ft"}, {"editor": "ft"}])
    # Part of the grid: only its rows, reused from the same folder; never copied over the full report.
    part = raised.model_copy(update={"only": ["ft"], "results_dir": None})
    assert {row["editor"] for row in eval_edit.run(part)["rows"]} == {"ft"}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(ValueError, match="results_dir"):
        eval_edit.EvalEditConfig(editors=[{"editor": "ft"}], only=["ft"], results_dir="x")
    with pytest.raises(ValueError, match="does not have"):
        eval_edit.EvalEditConfig(editors=[{"editor": "ft"}], only=["memit"])
    # A grid run over several sessions: report_only reports the rows at hand, lists the others and computes none.
    pending = raised.model_copy(update={"report_only": True, "editors": [
        *raised.editors, first.model_copy(update={"label": "ft_later"})]})
    partial = eval_edit.run(pending)
    assert partial["missing"] == ["ft_later-1", "ft_later-4"]
    assert {(row["editor"], row["n_edits"]) for row in partial["rows"]} == set(grown) | {("ft_kl", 4)}
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    with pytest.raises(FileNotFoundError, match="base.json"):
        eval_edit.run(pending.model_copy(update={"output_dir": str(tmp_path / "empty")}))
    # A fresh machine (empty outputs/): the published report's rows are taken in, reported, and not recomputed.
    published = str(tmp_path / "results" / "edit_scaling.json")
    fresh = eval_edit.run(pending.model_copy(update={"output_dir": str(tmp_path / "fresh"), "rows_from": published}))
    assert json.loads(Path(published).read_text())["rows"] == partial["rows"]  # the last report copied there
    assert fresh["rows"] == partial["rows"] and fresh["base"] == report["base"]
    assert fresh["missing"] == ["ft_later-1", "ft_later-4"]
    with pytest.raises(ArtifactMismatchError, match="other settings of the comparison"):
        eval_edit.run(pending.model_copy(update={"output_dir": str(tmp_path / "other"), "rows_from": published,
                                                 "locality_scored": 1}))
    # A meta-trained editor exported again into its folder (trained on) makes its rows stale: an error, not reuse.
    trained_dir = tmp_path / "trained"
    trained_dir.mkdir()
    (trained_dir / "metadata.json").write_text(json.dumps({"settings": {"steps": 30}, "created_at": "later"}))
    trained_run = eval_edit.EditorRun(editor="malmen", editor_dir=str(trained_dir))
    assert trained_run.trained_editor() == {"steps": 30, "created_at": "later"}
    (tmp_path / "eval" / "rows" / "malmen-4.json").write_text(json.dumps(
        {"run": trained_run.model_dump(mode="json"), "trained_editor": {"steps": 20, "created_at": "earlier"},
         "ppl": report["base"]["ppl"]}))
    with pytest.raises(ArtifactMismatchError, match="as trained then"):
        eval_edit.run(raised.model_copy(update={"editors": [trained_run]}))
    # Its folder gone (a fresh machine): the rows made with it are still reported; a row to compute needs it.
    shutil.rmtree(trained_dir)
    kept = eval_edit.run(raised.model_copy(update={"editors": [trained_run], "report_only": True}))
    assert [(row["editor"], row["n_edits"]) for row in kept["rows"]] == [("malmen", 4)] and kept["missing"] == ["malmen-1"]
    with pytest.raises(FileNotFoundError, match="steps=K"):
        eval_edit.run(raised.model_copy(update={"editors": [trained_run]}))
    with pytest.raises(FileNotFoundError, match="steps=K"):
        eval_edit.EditorRun(editor="malmen", editor_dir=str(tmp_path / "untrained")).trained_editor()
    changed = load_config(eval_edit.EvalEditConfig, CONFIGS / "eval_edit" / "tiny.yaml",
                          [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'eval'}", "locality_scored=1"])
    with pytest.raises(ArtifactMismatchError, match="locality_scored"):
        eval_edit.run(changed)
    # force=true deletes the folder made with the other settings and starts over.
    forced = changed.model_copy(update={"force": True, "editors": changed.editors[:1], "n_edits": [1]})
    assert [(row["editor"], row["n_edits"]) for row in eval_edit.run(forced)["rows"]] == [("ft", 1)]
    assert sorted(path.stem for path in (tmp_path / "eval" / "rows").glob("*.json")) == ["base", "ft-1"]


def test_eval_edit_single_edit_row_in_parts_resumes_from_its_runs(tiny_llama_dir, tmp_path, ray_local):
    """N = 1 with work_parts = 2: two tasks share the single edits (every other one), each run saved as it ends;
    the row equals one task's. A row that stopped redoes only the runs it lacks; runs of other settings are refused."""
    from trustray.pipelines import eval_edit

    config = load_config(eval_edit.EvalEditConfig, CONFIGS / "eval_edit" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'one'}", "results_dir=null",
                          "n_edits=[1]", "single_edit_runs=3", "generation_sample=0"])
    config = config.model_copy(update={"editors": config.editors[:1]})
    measured = ("es", "gs", "ls", "es_exact", "ppl", "offtemplate_agreement", "rag_dev_closed_book")

    def metrics(row):
        return {key: row[key] for key in measured}

    alone = eval_edit.run(config)["rows"][0]
    split_config = config.model_copy(update={"output_dir": str(tmp_path / "two"), "work_parts": 2})
    split = eval_edit.run(split_config)["rows"][0]
    assert split["single_edit_runs"] == 3 and split["general_runs"] == 1 and split["offtemplate_runs"] == 1
    assert metrics(split) == pytest.approx(metrics(alone), abs=1e-6)
    runs = tmp_path / "two" / "single-runs" / "ft-1"
    assert sorted(path.name for path in runs.iterdir()) == ["0.json", "1.json", "2.json", "metadata.json"]
    assert json.loads((runs / "0.json").read_text())["ppl"] > 0 and "ppl" not in json.loads((runs / "1.json").read_text())
    (tmp_path / "two" / "rows" / "ft-1.json").unlink()
    (runs / "1.json").unlink()
    kept = {name: (runs / name).stat().st_mtime_ns for name in ("0.json", "2.json")}
    resumed = eval_edit.run(split_config.model_copy(update={"work_parts": 1}))["rows"][0]
    assert {name: (runs / name).stat().st_mtime_ns for name in kept} == kept and (runs / "1.json").is_file()
    assert metrics(resumed) == pytest.approx(metrics(alone), abs=1e-6)
    (tmp_path / "two" / "rows" / "ft-1.json").unlink()
    first = split_config.editors[0]
    other = split_config.model_copy(update={"editors": [first.model_copy(update={
        "editor_settings": {**first.editor_settings, "steps": 2}})]})
    with pytest.raises(ArtifactMismatchError, match="single-edit runs"):
        eval_edit.run(other)


def test_single_edit_rows_average_runs_and_slice_each_records_pairs():
    from trustray.pipelines import eval_edit

    runs = [{"es": 1.0, "known_kept": None, "by": {"a": 0.5}, "note": "x"},
            {"es": 0.5, "known_kept": 0.25, "by": {"a": 1.0}, "ppl": 10.0}]
    assert eval_edit.mean_rows(runs) == {"es": 0.75, "known_kept": 0.25, "by": {"a": 0.75}, "note": "x", "ppl": 10.0}
    records = [{"paraphrases": ["a", "b"], "locality": [1]}, {"paraphrases": ["c"], "locality": [2, 3, 4]},
               {"paraphrases": [], "locality": [5]}]
    assert eval_edit.pair_spans(records, 1) == {"edit": slice(1, 2), "paraphrase": slice(2, 3), "locality": slice(1, 4)}
    assert eval_edit.pair_spans(records, 2) == {"edit": slice(2, 3), "paraphrase": slice(3, 3), "locality": slice(4, 5)}


def test_eval_edit_hides_scored_probes_from_editors_and_fills_beyond_the_split(monkeypatch):
    from trustray.pipelines import eval_edit

    record = {"prompt": "p", "target_new": "t", "paraphrases": ["a", "b", "c"],
              "locality": [{"prompt": "x", "answer": "1"}, {"prompt": "y", "answer": "2"}, {"prompt": "z", "answer": "3"}]}
    config = eval_edit.EvalEditConfig(editors=[{"editor": "ft"}], n_edits=[1, 5], eval_sample=2, fill_split="train")
    scored = eval_edit.scored_records(config, [record] * 3)
    given = eval_edit.editor_records(config, [record] * 3)
    assert len(scored) == 2 and scored[0]["paraphrases"] == ["a", "b"] and len(scored[0]["locality"]) == 2
    assert len(given) == 3 and given[0]["paraphrases"] == ["c"] and given[0]["locality"] == [record["locality"][2]]
    splits = {"test": [{"id": i} for i in range(3)], "train": [{"id": 10 + i} for i in range(4)]}
    monkeypatch.setattr(eval_edit, "load_records", lambda data, split: splits[split])
    assert [r["id"] for r in eval_edit.load_all_records(config)] == [0, 1, 2, 10, 11, 12, 13]
    assert eval_edit.edited_layers({"model.layers.3.mlp.down_proj": 0, "lm_head": 0}) == {3, -1}


def test_edit_train_resumes_and_its_editor_refuses_another_model(tiny_llama_dir, tmp_path, ray_local):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trustray.core.editing.factory import load_trained_editor
    from trustray.pipelines.edit_train import EditTrainConfig, run

    config = load_config(EditTrainConfig, CONFIGS / "edit_train" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'train'}"])
    editor_dir = run(config)
    metadata = json.loads((editor_dir / "metadata.json").read_text())
    assert [entry["step"] for entry in metadata["history"]] == [2, 4]
    assert "dev_es" in metadata["history"][-1]

    # A crash after step 2: the rerun continues from the step-2 checkpoint and ends with the same editor.
    uninterrupted = torch.load(editor_dir / "editor.pt", weights_only=True)
    shutil.rmtree(editor_dir)
    shutil.rmtree(tmp_path / "train" / "checkpoints" / "step-4")
    again = run(config)
    resumed = torch.load(again / "editor.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys() and "steps" in resumed
    for key, value in uninterrupted.items():
        if value.is_floating_point():
            assert torch.allclose(resumed[key], value, rtol=1e-6, atol=1e-6), key
        else:
            assert torch.equal(resumed[key], value), key
    resumed_history = json.loads((again / "metadata.json").read_text())["history"]
    assert [e["step"] for e in resumed_history] == [2, 4]
    for entry, straight in zip(resumed_history, metadata["history"], strict=True):  # timings aside, the same run
        assert {k: v for k, v in entry.items() if k != "step_seconds"} == pytest.approx(
            {k: v for k, v in straight.items() if k != "step_seconds"}, rel=1e-6)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert load_trained_editor(again, model, tokenizer, metadata["model_fingerprint"]).name == "mend"
    overridden = load_trained_editor(again, model, tokenizer, metadata["model_fingerprint"], {"batch_size": 3})
    assert overridden.settings.batch_size == 3 != metadata["settings"]["editor_settings"].get("batch_size")
    with pytest.raises(ArtifactMismatchError, match="meta-trained on"):
        load_trained_editor(again, model, tokenizer, "another-model")
    # Training can be extended: the run's length is not part of the checkpoints' identity.
    longer = load_config(EditTrainConfig, CONFIGS / "edit_train" / "tiny.yaml",
                         [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'longer'}", "steps=2"])
    run(longer)
    longer = longer.model_copy(update={"steps": 4})
    extended = json.loads((run(longer) / "metadata.json").read_text())
    assert [e["step"] for e in extended["history"]] == [2, 4] and extended["settings"]["steps"] == 4
    other = load_config(EditTrainConfig, CONFIGS / "edit_train" / "tiny.yaml",
                        [f"model={tiny_llama_dir}", f"output_dir={tmp_path / 'train'}", "edits_per_step=4"])
    with pytest.raises(ArtifactMismatchError):
        run(other)
    # force=true deletes the folder of the other run and starts over.
    forced = run(other.model_copy(update={"force": True, "steps": 2}))
    assert json.loads((forced / "metadata.json").read_text())["settings"]["edits_per_step"] == 4
    assert sorted(path.name for path in (tmp_path / "train" / "checkpoints").glob("step-*")) == ["step-2"]


def test_edit_train_starts_from_an_editor_and_fits_preserved_keys(tiny_llama_dir, tmp_path, ray_local):
    """`init_from` continues a finished MALMEN editor; `preserve_records` holds records out and stores their keys."""
    from trustray.pipelines.edit_train import EditTrainConfig, load_records, run

    settings = {"modules": {"layers": [-1]}, "rank": 8, "batch_size": 8, "max_length": 96}
    common = {"model": tiny_llama_dir, "editor": "malmen", "steps": 2, "edits_per_step": 8, "eval_every": 2,
              "eval_edits": 8, "checkpoint_every": 2}
    base_dir = run(EditTrainConfig(**common, editor_settings=settings, output_dir=str(tmp_path / "base")))
    with pytest.raises(ValueError, match="preserve_records"):
        EditTrainConfig(**common, editor_settings={**settings, "preserve_weight": 10.0})
    with pytest.raises(ValueError, match="preserve_texts"):
        EditTrainConfig(**common, editor_settings={**settings, "preserve_text_weight": 10.0})
    with pytest.raises(ValueError, match="retention_texts"):
        EditTrainConfig(**common, editor_settings={**settings, "retention_coef": 0.5})
    warm_settings = {**settings, "preserve_weight": 10.0, "preserve_text_weight": 10.0, "retention_coef": 0.5}
    warm = EditTrainConfig(**common, editor_settings=warm_settings, preserve_records=64, preserve_texts=4,
                           retention_texts=6, retention_per_step=2,
                           init_from=os.path.relpath(base_dir), output_dir=str(tmp_path / "warm"))  # relative to here
    warm_dir = run(warm)
    state = torch.load(warm_dir / "editor.pt", weights_only=True)
    assert int(state["steps"]) == 4  # two steps of its own after the two of the editor it started from
    for prefix in ("preserved.", "preserved_text."):
        preserved = [key for key in state if key.startswith(prefix)]
        assert len(preserved) == 1 and state[preserved[0]].shape[0] == state[preserved[0]].shape[1]
    metadata = json.loads((warm_dir / "metadata.json").read_text())
    assert all(step["retention_loss"] > 0 for step in metadata["history"])
    assert metadata["preserved_records"] == 64
    assert metadata["train_records"] == len(load_records(warm.data, "train")) - 64
    with pytest.raises(FileNotFoundError, match="init_from"):
        run(warm.model_copy(update={"init_from": str(tmp_path), "output_dir": str(tmp_path / "bad")}))


def test_a_rows_phases_are_logged_with_their_seconds_and_a_failed_one_is_not_called_done(caplog):
    from trustray.pipelines import eval_edit

    caplog.set_level("INFO", logger=eval_edit.logger.name)
    with eval_edit.logged_phase("memit-1024: generation on 64 records"):
        pass
    assert [r.getMessage() for r in caplog.records] == ["memit-1024: generation on 64 records ...",
                                                        "memit-1024: generation on 64 records: done in 0 s"]
    caplog.clear()
    with pytest.raises(RuntimeError), eval_edit.logged_phase("scoring"):
        raise RuntimeError("out of memory")
    assert [r.getMessage() for r in caplog.records] == ["scoring ..."]
