"""The build_index pipeline on Ray Data with the tiny embedder: contents, reuse, mismatch, force, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trustray.actors.retriever import Retriever
from trustray.artifacts import METADATA_FILE, ArtifactMismatchError
from trustray.config import load_config
from trustray.core.rag.index import INDEX_FILE, PASSAGES_FILE, PassageIndex
from trustray.models.embedders import Embedder
from trustray.pipelines import build_index
from trustray.pipelines.build_index import BuildIndexConfig

DOCS = 40


def tiny_config(tiny_embedder_dir: str, output_dir, **changes) -> BuildIndexConfig:
    overrides = [f"embedder.model={tiny_embedder_dir}", f"output_dir={output_dir}", f"limit={DOCS}"]
    overrides += [f"{key}={value}" for key, value in changes.items()]
    return load_config(BuildIndexConfig, "configs/build_index/tiny.yaml", overrides)


def file_times(folder) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


@pytest.fixture(scope="module")
def built(ray_local, tiny_embedder_dir, tmp_path_factory):
    config = tiny_config(tiny_embedder_dir, tmp_path_factory.mktemp("index") / "wiki-tiny")
    return config, build_index.run(config)


def test_index_contents(built, tiny_embedder_dir):
    config, folder = built
    assert {INDEX_FILE, PASSAGES_FILE, METADATA_FILE} <= {path.name for path in folder.iterdir()}
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".")]
    metadata = json.loads((folder / METADATA_FILE).read_text())
    index = PassageIndex.load(folder)
    assert metadata["num_docs"] == DOCS
    assert metadata["num_passages"] == len(index) > DOCS  # 64-token budget splits most intros
    assert metadata["passage_tokens"] == 64 and metadata["dim"] == index.dim == 32
    assert len(set(index.ids)) == len(index)
    assert index.ids[:2] == [f"{index.ids[0].split('#')[0]}#0", f"{index.ids[0].split('#')[0]}#1"]

    embedder = Embedder(config.embedder)
    hits = index.search(embedder.encode([index.texts[7]]), 3)[0]
    assert hits[0].id == index.ids[7] and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_a_slice_holds_every_kth_document_as_the_full_index_does(built, tiny_embedder_dir, tmp_path):
    config, folder = built
    full = PassageIndex.load(folder)
    # Fractional splitting tasks and actors, as the quickstart builds beside a Serve app.
    sliced = tiny_config(tiny_embedder_dir, tmp_path / "slice", every=4, every_offset=1, split_cpus=0.25,
                         **{"resources.num_cpus": 0.25})
    assert build_index.is_built(config) and not build_index.is_built(sliced)
    index = PassageIndex.load(build_index.run(sliced))
    assert build_index.is_built(sliced)
    kept = {row["id"] for row in build_index.corpus_rows(config)[1::4]}
    assert index.ids == [pid for pid in full.ids if pid.split("#")[0] in kept]
    rows = [full.ids.index(pid) for pid in index.ids]
    np.testing.assert_allclose(index.index.reconstruct_n(0, len(index)),
                               full.index.reconstruct_n(0, len(full))[rows], atol=1e-5)
    metadata = json.loads((tmp_path / "slice" / METADATA_FILE).read_text())
    assert (metadata["every"], metadata["every_offset"], metadata["num_docs"]) == (4, 1, DOCS // 4)
    with pytest.raises(ValueError, match="every_offset=4 must be below every=4"):
        tiny_config(tiny_embedder_dir, tmp_path / "x", every=4, every_offset=4)


def test_retriever_checks_the_embedder(built, tmp_path):
    _, folder = built
    retriever = Retriever(folder)
    index = retriever.index
    assert retriever.retrieve([index.texts[3]], k=2)[0][0].id == index.ids[3]
    assert retriever.retrieve([], k=2) == []

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in (INDEX_FILE, PASSAGES_FILE):
        (tampered / name).write_bytes((folder / name).read_bytes())
    metadata = json.loads((folder / METADATA_FILE).read_text())
    (tampered / METADATA_FILE).write_text(json.dumps({**metadata, "embedder_fingerprint": "0" * 16}))
    with pytest.raises(ArtifactMismatchError, match="use the same embedder or rebuild"):
        Retriever(tampered)
    with pytest.raises(FileNotFoundError, match="not a finished passage index"):
        Retriever(tmp_path)


def test_rerun_reuses_without_embedding_or_touching_files(built, monkeypatch):
    config, folder = built
    before = file_times(folder)

    def no_embedding(*args, **kwargs):
        raise AssertionError("a matching index was rebuilt instead of reused")

    monkeypatch.setattr(build_index, "embed_passages", no_embedding)
    assert build_index.run(config) == folder
    assert file_times(folder) == before


def test_changed_settings_raise_mismatch(built, tiny_embedder_dir):
    config, folder = built
    changed = tiny_config(tiny_embedder_dir, folder, passage_tokens=32)
    with pytest.raises(ArtifactMismatchError, match="passage_tokens: found 64, asked 32"):
        build_index.run(changed)


def test_crash_while_writing_leaves_no_partial_folder(tmp_path, tiny_embedder_dir, monkeypatch):
    config = tiny_config(tiny_embedder_dir, tmp_path / "out", limit=3)
    fake = {
        "id": np.array(["d#0", "d#1"]), "title": np.array(["t", "t"]), "text": np.array(["a", "b"]),
        "embedding": np.eye(2, 32, dtype=np.float32),
    }
    monkeypatch.setattr(build_index, "embed_passages", lambda config, rows: fake)

    def crash(folder, metadata):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(build_index, "write_metadata", crash)
    with pytest.raises(RuntimeError, match="killed while writing"):
        build_index.run(config)
    assert list(tmp_path.iterdir()) == []


def test_force_rebuilds_with_new_settings(built, tiny_embedder_dir):
    config, folder = built
    before = file_times(folder)
    forced = tiny_config(tiny_embedder_dir, folder, passage_tokens=32, force=True)
    assert build_index.run(forced) == folder
    metadata = json.loads((folder / METADATA_FILE).read_text())
    assert metadata["passage_tokens"] == 32
    assert metadata["num_passages"] > json.loads(json.dumps(before and metadata))["num_docs"]
    assert file_times(folder)[INDEX_FILE] != before[INDEX_FILE]
    assert build_index.run(tiny_config(tiny_embedder_dir, folder, passage_tokens=32)) == folder


def test_passage_budget_must_fit_the_embedder(tiny_embedder_dir, tmp_path):
    with pytest.raises(ValueError, match="does not fit the embedder's max_seq_length=128"):
        build_index.run(tiny_config(tiny_embedder_dir, tmp_path / "x", passage_tokens=127))
