"""How many facts can be fixed at once, at what cost? The editing scaling curve.

    trustray eval edit --config configs/eval_edit/<tiny|cpu|gpu>.yaml [key=value ...]
    python -m trustray.pipelines.eval_edit --config ...

For every editor and every N in `n_edits`, one Ray task (a fresh process, so its memory peak is its own) loads the
model, edits the first N records of the split at once, and measures on the edited records (all of them up to
`eval_sample`, that fixed sample beyond): teacher-forced ES / GS / LS (LS = agreement with the unedited model on
the records' own probes, which share the edits' relations and templates; `ls_gold` against their gold answers;
`ls_known` on the gold tokens the unedited model predicted; GS and LS on the first `paraphrases_scored` /
`locality_scored` of each record's paraphrases and probes), locality on off-template questions no edit is about
(`trustray.data.offtemplate`: gold accuracy after, its drawdown `ls_gold_drawdown` from before, agreement with
the unedited model, and `known_kept`, the share of exactly-known answers still exact), ES / GS by generation on
`generation_sample` records, perplexity on held-out Wikipedia text (ratio to the unedited model) and
answer-contained accuracy on the RAG dev split (closed book, and with retrieval when `index_dir` holds an index),
plus the editing time and peak memory. The N = 1 row is the mean of `single_edit_runs` single edits, each on its
own record with the model restored between.

Editors never see what is scored: the records they edit keep only the paraphrases and locality probes beyond the
scored ones (`ft_kl` anchors on those, and on Wikipedia intros disjoint from the perplexity texts). When N exceeds
the split, `fill_split` supplies the remaining edits (edited, never scored). With `scoring_prefix_layers` = k, a
first task runs the decoder layers below k once for every scored pair and computes the unedited model's locality
predictions; rows whose edits all lie at layer k or above are then scored on that cache (identical results).

Each row is saved as it finishes (an N = 1 row's single edits each as they end, in `single-runs/`); a rerun
computes only what is missing, and a folder made with other settings is refused. The report (`edit_scaling.json` +
`edit_scaling.png`) goes to `output_dir/report` and, when set, `results_dir`; its `missing` lists the rows of the
grid not computed yet (`report_only=true` assembles a report from the rows at hand without computing any, for a
grid run over several sessions; `rows_from` takes in the rows of a published report, so a fresh machine goes on
with such a grid).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from trustray.artifacts import (
    ArtifactMismatchError,
    TensorFiles,
    atomic_folder,
    atomic_write_text,
    check_metadata,
    read_metadata,
    write_metadata,
)
from trustray.config import ActorResources, BaseConfig, PipelineConfig
from trustray.data.corpus import EDIT_EVAL_POOL, edit_eval_texts
from trustray.models.sources import DEFAULT_CHAT_MODEL, model_fingerprint
from trustray.pipelines import gather, prepare_output
from trustray.pipelines.edit_train import EditDataSettings, load_records
from trustray.runtime import machine_info, save_figure, setup_logging

logger = logging.getLogger(__name__)


class EditorRun(BaseConfig):
    """One editor of the comparison."""

    editor: str = Field(description="A name from trustray.core.editing.registry.EDITORS.")
    editor_dir: str | None = Field(None, description="Meta-trained editor folder (malmen / mend).")
    editor_settings: dict[str, Any] = Field(default_factory=dict, description="Settings of ft / ft_kl; for a meta-trained editor, overrides of its inference settings (e.g. MALMEN's rounds, round_step).")
    untrained: bool = Field(False, description="A meta-learned editor with fresh networks (MALMEN's hyper-network "
                            "is then the identity; tune its lr_init and log_lambda_init in editor_settings): what "
                            "meta-training buys.")
    general_texts: int | None = Field(None, ge=1, description="Wikipedia intros (from the held-out pool, disjoint "
                                      "from the perplexity texts) given as general text to this editor, e.g. MEMIT's "
                                      "covariance (None: the config's replay_texts).")
    max_edits: int | None = Field(None, ge=1, description="Largest N for this editor (baselines may stop at 1,024).")
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_+.]+$", description="Name of its rows and curve (default: the editor's name); set it to compare two runs of one editor.")

    @property
    def name(self) -> str:
        return self.label or self.editor

    # The label only names the rows and max_edits only says which N run: neither changes a row, so raising
    # max_edits keeps the rows already computed.
    NOT_IN_METADATA: ClassVar[frozenset[str]] = frozenset({"label", "max_edits"})

    def expected_metadata(self) -> dict[str, Any]:
        """What a stored row must have been made with."""
        return self.model_dump(mode="json", exclude=set(self.NOT_IN_METADATA))

    def trained_editor(self) -> dict[str, Any] | None:
        """Which training of `editor_dir` a row was made with (its steps and when it was written): a run that is
        trained on and exported again into the same folder makes the old rows stale. None without a folder."""
        if not self.editor_dir:
            return None
        metadata = read_metadata(self.editor_dir)
        if metadata is None:
            raise FileNotFoundError(f"{self.editor_dir} holds no trained {self.editor} editor (no metadata.json): "
                                    "meta-train it first (trustray run edit_train; `steps=K` exports a checkpoint)")
        return {"steps": metadata.get("settings", {}).get("steps"), "created_at": metadata.get("created_at")}


class GeneralAbility(BaseConfig):
    """What 'unrelated skills' are measured by."""

    ppl_texts: int = Field(100, ge=1, description="Held-out Wikipedia intros for perplexity.")
    ppl_max_length: int = Field(256, ge=16, description="Tokens per perplexity text.")
    rag_questions: int | None = Field(None, ge=1, description="RAG dev questions used (None: all 46).")
    index_dir: str | None = Field(None, description="An index folder for the RAG condition; None: closed book only.")
    max_tokens: int = Field(24, ge=1, description="Answer tokens generated per question.")


class OffTemplate(BaseConfig):
    """The papers' locality set (`trustray.data.offtemplate`): questions no edit is about, in no edit template."""

    fanoutqa: int = Field(200, ge=0, description="FanOutQA dev single-hop questions.")
    cloze: int = Field(200, ge=0, description="Cloze questions about never-edited Wikipedia pages.")


class EvalEditConfig(PipelineConfig):
    output_root: ClassVar[str] = "outputs/eval_edit"

    model: str = Field(DEFAULT_CHAT_MODEL, description="The chat model edited.")
    editors: list[EditorRun] = Field(description="Editors compared.")
    n_edits: list[int] = Field(default_factory=lambda: [1, 16, 128, 1024, 4096], description="Edits applied at once.")
    eval_sample: int = Field(1024, ge=1, description="Edited records scored at most (a fixed prefix of the split).")
    generation_sample: int = Field(128, ge=0, description="Records scored by generation (0: none).")
    paraphrases_scored: int | None = Field(
        2, ge=1, description="Paraphrases per record in GS (None: all; each costs a forward pass per record)."
    )
    locality_scored: int | None = Field(
        2, ge=1, description="Locality probes per record in LS (None: all); editors that anchor on locality "
        "probes (`ft_kl`) get only the others, never the scored ones.",
    )
    offtemplate: OffTemplate | None = Field(
        default_factory=OffTemplate, description="Off-template locality questions scored before and after every "
        "edit (None: not measured).",
    )
    single_edit_runs: int = Field(
        64, ge=1, description="The N = 1 row edits each of the first this many records on its own (one edit at a "
        "time, the model restored between) and averages the runs: one record says little.",
    )
    single_general_runs: int = Field(
        4, ge=1, description="Of those single edits, how many also measure perplexity and RAG dev accuracy (each "
        "costs a perplexity pass and the dev questions' generations).",
    )
    single_offtemplate_runs: int = Field(
        16, ge=1, description="Of those single edits, how many also score the off-template questions (each run "
        "scores all of them, the bulk of a single edit's time; one edit moves them little).",
    )
    data: EditDataSettings = Field(default_factory=EditDataSettings, description="Where the records come from.")
    split: str = Field("test", description="Split edited and scored.")
    fill_split: str | None = Field(
        None, description="When N exceeds `split`, the remaining edits come from this split (edited, never "
        "scored: memory and interference at N beyond the split). None: N is capped at the split's size.",
    )
    replay_texts: int = Field(
        64, ge=0, description="Wikipedia intros (disjoint from the perplexity texts and from meta-training's) given "
        "as general text to editors that take it (`ft_kl`), unless their settings name their own.",
    )
    scoring_prefix_layers: int = Field(
        0, ge=0, description="Decoder layers run once for all rows (0: none). Rows whose edits reach below are "
        "scored on the full model.",
    )
    general: GeneralAbility = Field(default_factory=GeneralAbility, description="General-ability checks.")
    batch_size: int = Field(16, ge=1, description="Conversations per scoring pass.")
    resources: ActorResources = Field(default_factory=lambda: ActorResources(num_cpus=1), description="Each task.")
    work_parts: int = Field(
        1, ge=1, description="Tasks that share a row's work. N > 1: an editor's per-record work (MEMIT's target "
        "search; editors without such work ignore it), each task on a part of the records split at the editor's "
        "batches, into the row's work cache (started before the scoring cache, which they do not need); the row then "
        "finds every record's work there, the edit equals one task's and its `seconds` add up the parts' work. "
        "N = 1: the single edits, every K-th to each task, into the row's runs folder. Tasks sharing the cores "
        "slow each other, and the times reported include that.",
    )
    results_dir: str | None = Field(None, description="Also copy the report here (e.g. benchmarks/results).")
    only: list[str] | None = Field(
        None, description="Run and report just these of `editors` (names or labels), e.g. the baselines first of a grid "
        "run over several sessions; rows are shared with the full run. A partial report is not copied: set "
        "results_dir to null.",
    )
    report_only: bool = Field(
        False, description="Compute no row: report the rows already in the folder (the unedited model's must be "
        "there) and list the grid's other rows under `missing`.",
    )
    rows_from: str | None = Field(
        None, description="An earlier report of this comparison (its edit_scaling.json, e.g. the one in "
        "benchmarks/results) whose rows the folder lacks are taken in before the run, so a fresh machine continues a "
        "published grid instead of recomputing it. The report must have been made with the same settings.",
    )

    @field_validator("editors")
    @classmethod
    def _distinct_editors(cls, editors: list[EditorRun]) -> list[EditorRun]:
        names = [run.name for run in editors]
        if len(set(names)) != len(names):
            raise ValueError(f"each editor may appear once (its rows are keyed by name; set label to tell two runs "
                             f"of one editor apart): {names}")
        return editors

    @model_validator(mode="after")
    def _only_names_editors(self) -> EvalEditConfig:
        if self.only is not None:
            unknown = sorted(set(self.only) - {run.name for run in self.editors})
            if unknown:
                raise ValueError(f"only names editors the config does not have: {unknown}")
            if self.results_dir:
                raise ValueError("only runs part of the comparison, whose report must not replace the full one: "
                                 "set results_dir to null")
        return self

    @model_validator(mode="after")
    def _texts_fit_the_eval_pool(self) -> EvalEditConfig:
        largest = max([self.replay_texts, *(run.general_texts or 0 for run in self.editors)])
        if self.general.ppl_texts + largest > EDIT_EVAL_POOL:
            raise ValueError(f"general.ppl_texts + replay_texts (or an editor's general_texts) must be at most "
                             f"{EDIT_EVAL_POOL} (the intros held out of meta-training for evaluation)")
        return self


class PeakMemory:
    """Peak memory while the block runs, above its level at entry: GPU allocator peak, or sampled process RSS."""

    def __init__(self, device: Any, interval_s: float = 0.01) -> None:
        self.device, self.interval_s, self.peak_mb = device, interval_s, 0.0

    def __enter__(self) -> PeakMemory:
        import psutil
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._process = psutil.Process()
        self._start = self._process.memory_info().rss
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mb = (self._peak - self._start) / 2**20


def scored_records(config: EvalEditConfig, records: list[dict]) -> list[dict]:
    """The first `eval_sample` records with only their scored paraphrases and locality probes."""
    return [{**record, "paraphrases": record["paraphrases"][: config.paraphrases_scored],
             "locality": record["locality"][: config.locality_scored]} for record in records[: config.eval_sample]]


def editor_records(config: EvalEditConfig, records: list[dict]) -> list[dict]:
    """What the editor is given: every record without the paraphrases and locality probes that are scored."""
    paraphrases, locality = config.paraphrases_scored, config.locality_scored
    return [{**record, "paraphrases": record["paraphrases"][paraphrases:] if paraphrases else [],
             "locality": record["locality"][locality:] if locality else []} for record in records]


def edited_layers(deltas: dict[str, Any]) -> set[int]:
    """Decoder layer indices of the changed modules (`model.layers.<i>.…`); -1 for anything outside a layer."""
    layers = set()
    for name in deltas:
        parts = name.split(".")
        index = parts.index("layers") + 1 if "layers" in parts else None
        layers.add(int(parts[index]) if index is not None and parts[index].isdigit() else -1)
    return layers


def task_engine(config: EvalEditConfig) -> Any:
    """The model of one task, in float32 on the device its resources give it, behind an engine (for generation)."""
    import torch

    from trustray.models.engines import EngineConfig
    from trustray.models.hf_engine import HFEngine
    from trustray.models.loading import gpu_or_cpu

    if config.resources.torch_threads is not None:
        torch.set_num_threads(config.resources.torch_threads)
    device = gpu_or_cpu(config.resources.num_gpus > 0)
    return HFEngine(EngineConfig(model=config.model, dtype="float32"), device=device)


def offtemplate_probes(config: EvalEditConfig) -> Any:
    """The off-template `ProbeSet` of the config, or None."""
    from trustray.core.editing.evaluation import ProbeSet
    from trustray.data.offtemplate import load_offtemplate_questions

    if config.offtemplate is None:
        return None
    return ProbeSet.from_rows(load_offtemplate_questions(config.offtemplate.fanoutqa, config.offtemplate.cloze,
                                                         config.data.seed))


def scoring_cache_task(config: EvalEditConfig, scored: list[dict], path: str) -> str:
    """Write the frozen-prefix states of every scored pair (and off-template probe) and the unedited model's
    predictions on the locality and off-template probes to `path`."""
    import torch

    from trustray.core.editing.evaluation import locality_reference, prefix_cache, probe_reference

    engine = task_engine(config)
    probes = offtemplate_probes(config)
    cache = prefix_cache(engine.model, engine.tokenizer, scored, config.scoring_prefix_layers, config.batch_size,
                         probes=probes)
    reference = locality_reference(engine.model, engine.tokenizer, scored, config.batch_size, prefix=cache)
    probe_ref = (probe_reference(engine.model, engine.tokenizer, probes, config.batch_size, prefix=cache)
                 if probes is not None else None)
    with atomic_folder(path) as tmp:
        torch.save({"layers": cache.layers, "states": cache.states, "reference": reference,
                    "probe_reference": probe_ref}, tmp / "cache.pt")
        write_metadata(tmp, scoring_expected_metadata(config))
    return path


def general_requests(config: EvalEditConfig) -> dict[str, Any]:
    """RAG dev questions, their gold answers and the chat requests per condition (retrieval done once here)."""
    from trustray.core.rag.prompting import closed_book_messages, rag_messages
    from trustray.data.qa import load_rag_dev

    questions = load_rag_dev()[: config.general.rag_questions]
    requests = {"closed_book": [closed_book_messages(q["question"]) for q in questions]}
    index_dir = config.general.index_dir
    if index_dir and Path(index_dir, "metadata.json").is_file():
        from trustray.actors.retriever import Retriever
        from trustray.models.embedders import EmbedderConfig

        retrieved = Retriever(index_dir, EmbedderConfig()).retrieve([q["question"] for q in questions], 1)
        requests["rag"] = [rag_messages(q["question"], [(p.title, p.text) for p in passages])
                           for q, passages in zip(questions, retrieved, strict=True)]
    elif index_dir:
        logger.warning("no index at %s: RAG dev accuracy is measured closed book only", index_dir)
    return {"requests": requests, "golden": [q["golden_answers"] for q in questions]}


def general_scores(engine: Any, tokenizer: Any, texts: list[str], general: dict[str, Any], config: EvalEditConfig) -> dict:
    """Perplexity and RAG-dev answer-contained accuracy of the engine's current weights."""
    from trustray.core.editing.evaluation import perplexity
    from trustray.core.rag.metrics import answer_contained
    from trustray.models.engines import SamplingParams

    scores = {"ppl": perplexity(engine.model, tokenizer, texts, config.general.ppl_max_length, config.batch_size)}
    sampling = SamplingParams(max_tokens=config.general.max_tokens, temperature=0.0)
    for condition, requests in general["requests"].items():
        answers = [c.text for c in engine.generate(requests, sampling)]
        scores[f"rag_dev_{condition}"] = sum(
            answer_contained(answer, gold) for answer, gold in zip(answers, general["golden"], strict=True)
        ) / len(answers)
    return scores


def probe_row(scores: dict[str, Any]) -> dict[str, Any]:
    """`probe_scores` under the report's names."""
    return {"offtemplate_gold": scores["gold"], "offtemplate_gold_before": scores["gold_before"],
            "ls_gold_drawdown": scores["drawdown"], "offtemplate_agreement": scores["agreement"],
            "known_kept": scores["known_kept"], "known_facts": scores["known"],
            "known_tokens_kept": scores["known_tokens_kept"], "known_tokens": scores["known_tokens"],
            "offtemplate_by_source": scores["by_source"]}


def mean_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Key by key mean of the numbers (nested dicts too) over the rows that have the key with a value; other
    values are taken from the first row that has one."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row[key] for row in rows if row.get(key) is not None]
        if values and isinstance(values[0], dict):
            merged[key] = mean_rows(values)
        elif values and isinstance(values[0], int | float) and not isinstance(values[0], bool):
            merged[key] = sum(values) / len(values)
        else:
            merged[key] = values[0] if values else None
    return merged


def pair_spans(records: list[dict], index: int) -> dict[str, slice]:
    """Where record `index`'s scored pairs sit, per kind, among the pairs of `records` (in record order)."""
    counts = {"edit": lambda r: 1, "paraphrase": lambda r: len(r["paraphrases"]),
              "locality": lambda r: len(r["locality"])}
    spans = {}
    for kind, count in counts.items():
        start = sum(count(record) for record in records[:index])
        spans[kind] = slice(start, start + count(records[index]))
    return spans


class RowScorer:
    """What a task measures after an edit, against the unedited model's predictions (from the scoring cache, or
    taken here before any edit is applied)."""

    def __init__(self, config: EvalEditConfig, engine: Any, maker: Any, scored: list[dict],
                 cache_path: str | None, edited: set[int]) -> None:
        import torch

        from trustray.core.editing.evaluation import PrefixCache, probe_reference

        self.config, self.engine, self.maker, self.scored = config, engine, maker, scored
        self.probes = offtemplate_probes(config)
        self.texts, _ = edit_eval_texts(config.general.ppl_texts, config.replay_texts)
        self.prefix = None
        if cache_path is not None:
            cache = torch.load(Path(cache_path) / "cache.pt", weights_only=True)
            self.reference = cache["reference"][: sum(len(record["locality"]) for record in scored)]
            self.probe_reference = cache["probe_reference"]
            if min(edited) >= cache["layers"]:
                self.prefix = PrefixCache(cache["layers"], cache["states"])
        else:
            self.reference = maker.locality_reference(scored, config.batch_size)
            self.probe_reference = (probe_reference(engine.model, engine.tokenizer, self.probes, config.batch_size)
                                    if self.probes is not None else None)

    def teacher_forced(self, index: int | None = None, offtemplate: bool = True) -> dict[str, Any]:
        """ES / GS / LS (with `ls_known`) on every scored record, or on record `index` alone, and (`offtemplate`)
        the off-template questions."""
        from trustray.core.editing.evaluation import PrefixCache, probe_scores

        records, reference, prefix = self.scored, self.reference, self.prefix
        if index is not None:
            spans = pair_spans(self.scored, index)
            records, reference = self.scored[index : index + 1], self.reference[spans["locality"]]
            if prefix is not None:
                prefix = PrefixCache(prefix.layers, {**prefix.states, **{kind: prefix.states[kind][span]
                                                                         for kind, span in spans.items()}})
        row = self.maker.scores(records, reference, self.config.batch_size, prefix)
        if self.probes is not None and offtemplate:
            row.update(probe_row(probe_scores(self.engine.model, self.engine.tokenizer, self.probes,
                                              self.probe_reference, self.config.batch_size, prefix=prefix)))
        return row

    def generation(self, records: list[dict]) -> dict[str, float]:
        """ES / GS by greedy generation on `records`."""
        from trustray.core.editing.evaluation import generation_scores
        from trustray.models.engines import SamplingParams

        sampling = SamplingParams(max_tokens=16, temperature=0.0)

        def generate(prompts: list[str]) -> list[str]:
            requests = [[{"role": "user", "content": prompt}] for prompt in prompts]
            return [c.text for c in self.engine.generate(requests, sampling)]

        return generation_scores(generate, records)

    def general(self, general: dict[str, Any]) -> dict[str, Any]:
        return general_scores(self.engine, self.engine.tokenizer, self.texts, general, self.config)


def base_row(config: EvalEditConfig, engine: Any, general: dict[str, Any]) -> dict[str, Any]:
    """The unedited model: perplexity, RAG dev accuracy and off-template gold accuracy."""
    from trustray.core.editing.evaluation import probe_reference, probe_scores

    texts, _ = edit_eval_texts(config.general.ppl_texts, config.replay_texts)
    row = general_scores(engine, engine.tokenizer, texts, general, config)
    probes = offtemplate_probes(config)
    if probes is not None:
        reference = probe_reference(engine.model, engine.tokenizer, probes, config.batch_size)
        row["offtemplate_gold"] = probe_scores(engine.model, engine.tokenizer, probes, reference,
                                               config.batch_size)["gold"]
    return row


def row_maker(config: EvalEditConfig, run: EditorRun, engine: Any, fingerprint: str, work_path: str | None) -> Any:
    """The editor of `run` on the task's model, keeping its per-record work in `work_path` when given."""
    from trustray.actors.editor import EditSetMaker

    _, replay = edit_eval_texts(config.general.ppl_texts, run.general_texts or config.replay_texts)
    maker = EditSetMaker(engine.model, engine.tokenizer, fingerprint, run.editor, run.editor_dir, run.editor_settings,
                         general_text=replay, untrained=run.untrained)
    if work_path:
        maker.editor.work_cache = TensorFiles(work_path)
    return maker


def work_part_task(config: EvalEditConfig, run: EditorRun, records: list[dict], fingerprint: str, work_path: str,
                   part: int) -> int:
    """Part `part` of `config.work_parts` of a row's per-record work, done into the row's work cache. The parts
    split the records at multiples of the editor's batch size, so each batch is the one a single task would form.
    Returns how many records the part holds."""
    setup_logging()
    engine = task_engine(config)
    maker = row_maker(config, run, engine, fingerprint, work_path)
    given = editor_records(config, records)
    batch = maker.editor.settings.batch_size
    size = math.ceil(math.ceil(len(given) / batch) / config.work_parts) * batch
    mine = given[part * size : (part + 1) * size]
    if mine:
        maker.editor.do_work(mine)
    return len(mine)


def single_runs_folder(path: Path, run: EditorRun, trained: dict[str, Any] | None) -> Path:
    """The folder where an N = 1 row keeps each single edit's scores as it ends, so a row of hours that stops
    resumes (and parts of it run in parallel); runs made with other settings of the editor are refused."""
    expected = {"kind": "single-edit runs", "run": run.expected_metadata(), "trained_editor": trained}
    if not check_metadata(path, expected, kind="single-edit runs"):
        path.mkdir(parents=True, exist_ok=True)
        write_metadata(path, expected)
    return path


def single_runs_task(config: EvalEditConfig, run: EditorRun, records: list[dict], general: dict[str, Any],
                     fingerprint: str, cache_path: str | None, work_path: str, runs_path: str, part: int) -> int:
    """Part `part` of `config.work_parts` of an N = 1 row: every `work_parts`-th single edit from `part` on (so the
    first runs, which also measure perplexity and the off-template questions, are shared out), each saved in
    `runs_path`. Returns how many runs the part holds."""
    setup_logging()
    engine = task_engine(config)
    maker = row_maker(config, run, engine, fingerprint, work_path)
    mine = range(part, len(records), config.work_parts)
    single_edit_runs(config, maker, editor_records(config, records), scored_records(config, records), general,
                     engine, cache_path, Path(runs_path), mine)
    return len(mine)


@contextmanager
def logged_phase(what: str) -> Iterator[None]:
    """Logs `what` as it starts and its seconds once it ends: scoring a row at N = 1,024 runs for a quarter of an
    hour inside a Ray task that prints nothing else."""
    began = time.monotonic()
    logger.info("%s ...", what)
    yield
    logger.info("%s: done in %.0f s", what, time.monotonic() - began)


def row_task(config: EvalEditConfig, run: EditorRun | None, records: list[dict], general: dict[str, Any],
             fingerprint: str, cache_path: str | None, n_edits: int = 0, work_path: str | None = None,
             runs_path: str | None = None, *parts_done: int) -> dict[str, Any]:
    """One point of the curve (`run=None`: the unedited model's baseline). At N = 1 (`n_edits`) each of `records`
    is edited on its own, each run kept in `runs_path`, and the runs are averaged; otherwise all of `records` are
    edited at once. `work_path`: the folder where the editor keeps per-record work on the unedited weights (MEMIT's
    targets), so a row that stops resumes its search. `parts_done`: the counts of the parts (`work_part_task`,
    `single_runs_task`) that did that work or those runs first (Ray starts the row once they are done)."""
    setup_logging()  # a Ray worker has no log handler: the editor's progress lines would be dropped
    engine = task_engine(config)
    if run is None:
        return base_row(config, engine, general)
    scored = scored_records(config, records)
    given = editor_records(config, records)
    maker = row_maker(config, run, engine, fingerprint, work_path)
    if n_edits == 1:
        if runs_path is None:
            raise ValueError("an N = 1 row needs runs_path, the folder of its single edits")
        row = single_edit_row(config, single_edit_runs(config, maker, given, scored, general, engine, cache_path,
                                                       Path(runs_path), range(len(scored))))
    else:
        label = f"{run.name}-{n_edits}"
        with PeakMemory(engine.device) as memory, logged_phase(f"{label}: the edit of {len(given)} records"):
            edit_set, seconds = maker.compute_deltas(given)
        scorer = RowScorer(config, engine, maker, scored, cache_path, edited_layers(edit_set.deltas))
        with maker.applied(edit_set):
            offtemplate = " and the off-template questions" if scorer.probes is not None else ""
            with logged_phase(f"{label}: teacher-forced scores of {len(scored)} records{offtemplate}"):
                row = scorer.teacher_forced()
            if config.generation_sample:
                sample = scored[: config.generation_sample]
                with logged_phase(f"{label}: generation on {len(sample)} records"):
                    row.update(scorer.generation(sample))
            with logged_phase(f"{label}: perplexity and RAG dev accuracy"):
                row.update(scorer.general(general))
        row.update({"seconds": round(seconds, 2), "reused_seconds": round(maker.editor.reused_seconds, 2),
                    "peak_mem_mb": round(memory.peak_mb, 1),
                    "scored_records": len(scored), "prefix_cached": scorer.prefix is not None})
    return {**row, "run": run.model_dump(mode="json")}


def single_edit_runs(config: EvalEditConfig, maker: Any, given: list[dict], scored: list[dict],
                     general: dict[str, Any], engine: Any, cache_path: str | None, runs_dir: Path,
                     indices: Sequence[int]) -> list[dict[str, Any]]:
    """The single edits `indices` of an N = 1 row, each on its own record with the model restored between
    (perplexity and RAG dev accuracy on the first `single_general_runs`, off-template scores on the first
    `single_offtemplate_runs`). A run already in `runs_dir` is read, not redone; a new one is written there as it
    ends."""
    from trustray.core.editing.base import ProgressLog

    runs = {index: json.loads((runs_dir / f"{index}.json").read_text()) for index in indices
            if (runs_dir / f"{index}.json").is_file()}
    if runs:
        logger.info("single edits: %d of %d runs taken from %s", len(runs), len(indices), runs_dir)
    todo = [index for index in indices if index not in runs]
    scorer = None
    progress = ProgressLog("single edits", len(todo))
    for index in todo:
        with PeakMemory(engine.device) as memory:
            edit_set, seconds = maker.compute_deltas(given[index : index + 1])
        if scorer is None:
            scorer = RowScorer(config, engine, maker, scored, cache_path, edited_layers(edit_set.deltas))
        with maker.applied(edit_set):
            run = {**scorer.teacher_forced(index, offtemplate=index < config.single_offtemplate_runs),
                   "seconds": seconds, "peak_mem_mb": memory.peak_mb, "prefix_cached": scorer.prefix is not None}
            if index < config.generation_sample:
                run.update(scorer.generation(scored[index : index + 1]))
            if index < config.single_general_runs:
                run.update(scorer.general(general))
        atomic_write_text(runs_dir / f"{index}.json", json.dumps(run))
        runs[index] = run
        progress.update()
    return [runs[index] for index in indices]


def single_edit_row(config: EvalEditConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The N = 1 row: the mean over its single edits, the slowest run's memory."""
    row = mean_rows(runs)
    return {**row, "seconds": round(row["seconds"], 2), "peak_mem_mb": round(max(run["peak_mem_mb"] for run in runs), 1),
            "scored_records": len(runs), "single_edit_runs": len(runs),
            "general_runs": min(len(runs), config.single_general_runs),
            "offtemplate_runs": min(len(runs), config.single_offtemplate_runs) if config.offtemplate else 0}


def expected_metadata(config: EvalEditConfig) -> dict[str, Any]:
    """What every row of an output folder shares (editors and N may grow between runs; resources may change)."""
    return {"kind": "edit-scaling", "model": config.model, "model_fingerprint": model_fingerprint(config.model),
            "settings": config.model_dump(mode="json", exclude={"name", "editors", "n_edits", "resources",
                                                                 "output_dir", "force", "results_dir", "only",
                                                                 "report_only", "rows_from", "work_parts"})}


def scoring_expected_metadata(config: EvalEditConfig) -> dict[str, Any]:
    """What the scoring cache depends on: the scored pairs and the cached layers."""
    return {"kind": "edit-scoring-cache", "model": config.model, "model_fingerprint": model_fingerprint(config.model),
            "settings": config.model_dump(mode="json", include={"data", "split", "eval_sample", "paraphrases_scored",
                                                                 "locality_scored", "scoring_prefix_layers",
                                                                 "offtemplate"})}


def load_all_records(config: EvalEditConfig) -> list[dict]:
    """The split's records, followed by `fill_split`'s when N needs more."""
    records = load_records(config.data, config.split)
    if len(records) < config.eval_sample:
        logger.warning("split %r has %d records: fewer than eval_sample=%d are scored", config.split,
                       len(records), config.eval_sample)
    if config.fill_split and max(config.n_edits) > len(records):
        fill = load_records(config.data, config.fill_split)
        logger.info("N > %d: the edits beyond come from split %r (edited, never scored)", len(records), config.fill_split)
        records = records + fill
    if len(records) < max(config.n_edits):
        logger.warning("%d records available: N is capped there", len(records))
    return records


def take_in_rows(config: EvalEditConfig, rows_dir: Path) -> None:
    """Copy the rows of the report `config.rows_from` that `rows_dir` lacks into it. Each row
    keeps its `run` and `trained_editor`, so the checks on reuse apply to it as to a row computed here."""
    report = json.loads(Path(config.rows_from).read_text())
    theirs = EvalEditConfig.model_validate(report["config"])
    if expected_metadata(theirs) != expected_metadata(config):
        raise ArtifactMismatchError(f"{config.rows_from} was made with other settings of the comparison (or another "
                                    "model): its rows cannot be taken in")
    rows = {"base": report["base"]} | {f"{row['editor']}-{row['n_edits']}": {
        k: v for k, v in row.items() if k not in ("editor", "n_edits", "ppl_ratio")} for row in report["rows"]}
    taken = 0
    for key, row in rows.items():
        path = rows_dir / f"{key}.json"
        if not path.is_file():
            atomic_write_text(path, json.dumps(row))
            taken += 1
    logger.info("took %d rows from %s (%d were already here)", taken, config.rows_from, len(rows) - taken)


def run(config: EvalEditConfig) -> dict[str, Any]:
    """The scaling curve of every editor; returns the report (also written as JSON and PNG)."""
    import ray

    from trustray.core.editing.factory import registered_editor

    folder = prepare_output(config)
    rows_dir = folder / "rows"
    expected = expected_metadata(config)
    if not check_metadata(folder, expected, kind="edit-scaling rows"):
        rows_dir.mkdir(parents=True, exist_ok=True)
        write_metadata(folder, expected)
    if config.rows_from:
        take_in_rows(config, rows_dir)
    records = load_all_records(config)
    fingerprint = model_fingerprint(config.model)
    general = general_requests(config)
    options = {**config.resources.ray_options(), "max_calls": 1}
    editors = [run for run in config.editors if config.only is None or run.name in config.only]
    todo: dict[str, tuple[EditorRun, int]] = {}
    # Which training of a meta-trained editor the rows are made with, read once before any row starts: a folder
    # exported again while a row runs must not pass for its source.
    trained: dict[str, dict[str, Any] | None] = {}
    for editor_run in editors:
        # A meta-trained editor whose folder is gone (a fresh machine) keeps the rows made with it; only a row still
        # to compute needs the folder.
        try:
            stamp, absent = editor_run.trained_editor(), None
        except FileNotFoundError as error:
            stamp, absent = None, error
        for n in sorted({min(n, len(records)) for n in config.n_edits}):
            if editor_run.max_edits and n > editor_run.max_edits:
                continue
            key = f"{editor_run.name}-{n}"
            path = rows_dir / f"{key}.json"
            trained[key] = stamp
            if not path.is_file():
                if absent is not None and not config.report_only:
                    raise absent
                todo[key] = (editor_run, n)
            else:
                row = json.loads(path.read_text())
                if {k: v for k, v in row.get("run", {}).items()
                        if k not in EditorRun.NOT_IN_METADATA} != editor_run.expected_metadata():
                    raise ArtifactMismatchError(f"{path} was made with other settings of editor {editor_run.name!r}; "
                                                "delete it (or its folder) to recompute")
                if absent is None and row.get("trained_editor") != stamp:
                    raise ArtifactMismatchError(
                        f"{path} was made with the editor in {editor_run.editor_dir} as trained then "
                        f"({row.get('trained_editor')}), not as it is now ({stamp}); delete the rows of that editor "
                        "to recompute them")
    if config.report_only:
        if not (rows_dir / "base.json").is_file():
            raise FileNotFoundError(f"report_only needs the unedited model's row, {rows_dir / 'base.json'}: run the "
                                    "grid (or part of it, with `only`) first")
        if todo:
            logger.warning("report_only: %d of the grid's rows are not computed yet: %s", len(todo), sorted(todo))
        missing, todo = sorted(todo), {}
    else:
        missing = []
    # MEMIT's target search starts first: it needs no scoring cache, and building that cache takes one core only.
    part_task = ray.remote(**options)(work_part_task)
    work_path = str(folder / "work-cache")
    chosen = {key: records[: min(config.single_edit_runs, config.eval_sample)] if n == 1 else records[:n]
              for key, (_, n) in todo.items()}
    parts: dict[str, list[Any]] = {key: [] for key in todo}
    for key, (editor_run, n) in todo.items():
        if config.work_parts > 1 and n > 1 and registered_editor(editor_run.editor).keeps_work:
            parts[key] = [part_task.remote(config, editor_run, chosen[key], fingerprint, work_path, part)
                          for part in range(config.work_parts)]
    cache_path = None
    if config.scoring_prefix_layers and todo:
        cache_path = folder / "scoring-cache"
        if not check_metadata(cache_path, scoring_expected_metadata(config), kind="scoring cache"):
            task = ray.remote(**options)(scoring_cache_task)
            gather({"cache": task.remote(config, scored_records(config, records), str(cache_path))}, "scoring cache",
                   lambda key, value: None)
    cache = str(cache_path) if cache_path else None
    task = ray.remote(**options)(row_task)
    single_task = ray.remote(**options)(single_runs_task)
    jobs: dict[str, Any] = {}
    if not (rows_dir / "base.json").is_file():
        jobs["base"] = task.remote(config, None, [], general, fingerprint, None)
    for key, (editor_run, n) in todo.items():
        runs_path = str(single_runs_folder(folder / "single-runs" / key, editor_run, trained[key])) if n == 1 else None
        if config.work_parts > 1 and n == 1:
            parts[key] = [single_task.remote(config, editor_run, chosen[key], general, fingerprint, cache, work_path,
                                             runs_path, part) for part in range(config.work_parts)]
        jobs[key] = task.remote(config, editor_run, chosen[key], general, fingerprint, cache, n, work_path,
                                runs_path, *parts[key])
    gather(jobs, "edit scaling", lambda key, row: atomic_write_text(
        rows_dir / f"{key}.json", json.dumps({**row, "trained_editor": trained.get(key)})))
    base = json.loads((rows_dir / "base.json").read_text())
    rows = []
    for editor_run in editors:
        mine = [path for path in rows_dir.glob(f"{editor_run.name}-*.json") if path.stem.rsplit("-", 1)[0] == editor_run.name]
        for path in sorted(mine, key=lambda p: int(p.stem.rsplit("-", 1)[1])):
            row = json.loads(path.read_text())
            rows.append({"editor": editor_run.name, "n_edits": int(path.stem.rsplit("-", 1)[1]), **row,
                         "ppl_ratio": row["ppl"] / base["ppl"]})
    # `force` says how this run started, not what the rows were made with.
    report = {"machine": machine_info(), "model": config.model, "split": config.split, "fill_split": config.fill_split,
              "base": base, "rows": rows, "missing": missing,
              "config": config.model_dump(mode="json", exclude={"force"})}
    report_dir = folder / "report"
    report_dir.mkdir(exist_ok=True)
    atomic_write_text(report_dir / "edit_scaling.json", json.dumps(report, indent=2) + "\n")
    write_plot(report_dir / "edit_scaling.png", rows, report["machine"])
    if config.results_dir:
        Path(config.results_dir).mkdir(parents=True, exist_ok=True)
        for name in ("edit_scaling.json", "edit_scaling.png"):
            shutil.copy2(report_dir / name, Path(config.results_dir) / name)
    report["written"] = str(report_dir)
    return report


PLOT_PANELS = (("es", "ES (teacher-forced)"), ("offtemplate_agreement", "off-template locality (agreement)"),
               ("ls", "strict LS (the edits' own probes)"), ("ppl_ratio", "perplexity ratio (log)"))


def write_plot(path: Path, rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    """ES, off-template locality, strict LS and perplexity ratio against the number of simultaneous edits, one
    line per editor (a row without a panel's metric is left out of that panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    figure, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(16, 3.8))
    sizes = sorted({row["n_edits"] for row in rows})
    for editor in sorted({row["editor"] for row in rows}):
        for axis, (key, title) in zip(axes, PLOT_PANELS, strict=True):
            mine = [row for row in rows if row["editor"] == editor and row.get(key) is not None]
            axis.plot([row["n_edits"] for row in mine], [row[key] for row in mine], marker="o", label=editor)
            axis.set_title(title, fontsize=10)
            axis.set_xscale("log")
            axis.set_xlabel("edits at once")
            axis.grid(alpha=0.3)
    # The edit counts themselves as ticks: a log axis over 16-256 would label its minor ticks on top of each other.
    for axis in axes:
        axis.set_xticks(sizes)
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.tick_params(axis="x", labelrotation=45 if len(sizes) > 4 else 0)
    # A broken model's ratio is orders of magnitude above 1 (MEND at 4,096 edits): only a log axis shows the rest.
    # Within one decade its minor ticks are the only ones, so they are labelled too.
    ratio_axis = axes[-1]
    ratio_axis.set_yscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ratio_axis.yaxis.set_major_formatter(plain)
    low, high = ratio_axis.get_ylim()
    ratio_axis.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
    axes[0].legend(fontsize=8)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(figure, path, machine)
    plt.close(figure)


def format_table(report: dict[str, Any]) -> str:
    def number(value: Any) -> str:
        return "     -" if value is None else f"{value:6.3f}"

    lines = [f"{'editor':<16} {'N':>6} {'ES':>6} {'GS':>6} {'LS':>6} {'offLS':>6} {'drawd':>6} {'kept':>6} "
             f"{'ppl x':>6} {'s':>8} {'MB':>8}"]
    for row in report["rows"]:
        lines.append(f"{row['editor']:<16} {row['n_edits']:>6} {row['es']:6.3f} {number(row.get('gs'))} "
                     f"{number(row.get('ls'))} {number(row.get('offtemplate_agreement'))} "
                     f"{number(row.get('ls_gold_drawdown'))} {number(row.get('known_kept'))} "
                     f"{row['ppl_ratio']:6.3f} {row['seconds']:8.1f} {row['peak_mem_mb']:8.0f}")
    lines.append(f"written: {report['written']}")
    return "\n".join(lines)


PIPELINE = {"config": EvalEditConfig, "run": run, "table": format_table}


if __name__ == "__main__":
    from trustray.pipelines import run_module

    run_module("eval_edit")
