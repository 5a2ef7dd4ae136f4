"""Feature store: exact round trips, atomic and resumable shards, metadata checks, finalize's id checks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from trustray.artifacts import ArtifactMismatchError
from trustray.core.influence import store as store_module
from trustray.core.influence.store import FeatureStore

META = {"model_hash": "abc123", "reduction": "gaussian", "seed": 7, "checkpoint": "ckpt-10"}
DIM = 6


def _shard(shard_index: int, rows: int = 4, seed: int = 0) -> tuple[list[str], np.ndarray]:
    ids = [f"ex-{shard_index}-{i}" for i in range(rows)]
    features = np.random.default_rng(seed + shard_index).normal(size=(rows, DIM)).astype(np.float32)
    return ids, features


def test_new_store_writes_metadata(tmp_path):
    store = FeatureStore.create_or_open(tmp_path / "fs", META, DIM, "float32")
    meta = json.loads((tmp_path / "fs" / "metadata.json").read_text())
    assert meta["dim"] == DIM and meta["dtype"] == "float32" and meta["model_hash"] == "abc123"
    assert meta["finished"] is False and not store.finished
    assert store.finished_shards() == set()


def test_float32_round_trip_is_exact(tmp_path):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    written = {i: _shard(i) for i in (0, 2, 1)}
    for i, (ids, features) in written.items():
        assert store.write_shard(i, ids, features)
    assert store.finished_shards() == {0, 1, 2}
    ids, features = store.load()
    assert ids == written[0][0] + written[1][0] + written[2][0]
    np.testing.assert_array_equal(features, np.concatenate([written[i][1] for i in range(3)]))
    block_ids, blocks = store.load_blocks()
    assert block_ids == ids and all(isinstance(b, np.memmap) for b in blocks)
    assert store.ids() == ids
    picked = store.features_for(["ex-2-3", "ex-0-1", "ex-1-0"])
    np.testing.assert_array_equal(picked, np.stack([written[2][1][3], written[0][1][1], written[1][1][0]]))
    with pytest.raises(KeyError, match="not in the feature store"):
        store.features_for(["nope"])


def test_float16_round_trip_is_close_and_single_shard_is_a_memmap(tmp_path):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float16")
    ids, features = _shard(0)
    store.write_shard(0, ids, features)
    loaded_ids, loaded = store.load()
    assert loaded_ids == ids and loaded.dtype == np.float16 and isinstance(loaded, np.memmap)
    np.testing.assert_allclose(loaded.astype(np.float32), features, rtol=1e-3, atol=1e-3)


def test_rewrite_is_idempotent_and_conflicting_ids_are_refused(tmp_path):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    ids, features = _shard(3)
    assert store.write_shard(3, ids, features) is True
    assert store.write_shard(3, ids, features) is False
    with pytest.raises(ValueError, match="already finished with other ids"):
        store.write_shard(3, [f"z{i}" for i in range(4)], features)
    with pytest.raises(ValueError, match="shape"):
        store.write_shard(4, ids, features[:, :3])
    with pytest.raises(ValueError, match="ids repeat"):
        store.write_shard(4, ["a", "a", "b", "c"], features)


def test_resume_redoes_shard_whose_ids_file_is_missing(tmp_path):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    ids, features = _shard(0)
    store.write_shard(0, ids, features)
    (tmp_path / "shard-00000.ids.parquet").unlink()  # killed between the features rename and the ids rename
    reopened = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    assert not reopened.is_finished(0) and reopened.finished_shards() == set()
    assert reopened.load()[0] == []
    assert reopened.write_shard(0, ids, features * 2) is True
    np.testing.assert_array_equal(reopened.load()[1], features * 2)


@pytest.mark.parametrize("crash_at", [1, 2], ids=["features-rename", "ids-rename"])
def test_crash_mid_write_leaves_no_visible_shard(tmp_path, monkeypatch, crash_at):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    ids, features = _shard(5)
    real_replace = store_module._fsync_replace
    calls = []

    def crash_on_nth(tmp, path):
        calls.append(path)
        if len(calls) == crash_at:
            raise OSError("killed")
        real_replace(tmp, path)

    monkeypatch.setattr(store_module, "_fsync_replace", crash_on_nth)
    with pytest.raises(OSError, match="killed"):
        store.write_shard(5, ids, features)
    monkeypatch.undo()
    assert store.finished_shards() == set() and not store.is_finished(5)
    assert store.load()[0] == []
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the killed writer's leftovers
    assert store.write_shard(5, ids, features)
    store.finalize(4)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    np.testing.assert_array_equal(store.load()[1], features)


def test_reopen_with_other_settings_is_refused(tmp_path):
    FeatureStore.create_or_open(tmp_path, META, DIM, "float16")
    with pytest.raises(ArtifactMismatchError, match="reduction"):
        FeatureStore.create_or_open(tmp_path, {**META, "reduction": "pca"}, DIM, "float16")
    with pytest.raises(ArtifactMismatchError, match="dim"):
        FeatureStore.create_or_open(tmp_path, META, DIM + 1, "float16")
    with pytest.raises(ArtifactMismatchError, match="dtype"):
        FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    assert FeatureStore.create_or_open(tmp_path, META, DIM, "float16").dim == DIM


def test_reopen_with_tuple_valued_settings_matches(tmp_path):
    meta = {**META, "lora_targets": ("q_proj", "v_proj")}
    FeatureStore.create_or_open(tmp_path, meta, DIM)
    assert FeatureStore.create_or_open(tmp_path, meta, DIM).metadata["lora_targets"] == ["q_proj", "v_proj"]


def test_folder_with_shards_but_no_metadata_is_refused(tmp_path):
    np.save(tmp_path / "shard-00000.npy", np.zeros((1, DIM)))
    with pytest.raises(ArtifactMismatchError, match="no metadata.json"):
        FeatureStore.create_or_open(tmp_path, META, DIM)


def test_finalize_writes_index_and_marks_finished(tmp_path):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    for i in range(2):
        store.write_shard(i, *_shard(i))
    record = store.finalize(8, expected_ids=store.ids())
    assert record["finished"] is True and record["num_examples"] == 8
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["finished"] is True and meta["created_at"] == record["created_at"]
    table = pq.read_table(tmp_path / "index.parquet").to_pydict()
    assert table["id"][5] == "ex-1-1" and table["shard"][5] == 1 and table["row"][5] == 1
    reopened = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    assert reopened.finished
    with pytest.raises(ValueError, match="finalized"):
        reopened.write_shard(2, *_shard(2))


def test_finalize_catches_duplicates_and_missing(tmp_path):
    store = FeatureStore.create_or_open(tmp_path, META, DIM, "float32")
    ids, features = _shard(0)
    store.write_shard(0, ids, features)
    store.write_shard(2, ids[:2] + ["fresh-1", "fresh-2"], features)
    with pytest.raises(ValueError, match=r"2 ids appear more than once.*'ex-0-0' in shards \[0, 2\]"):
        store.finalize(8)
    (tmp_path / "shard-00002.ids.parquet").unlink()
    with pytest.raises(
        ValueError, match=r"4 examples .* expected 8; unfinished shard indices below the last: \[\]"
    ):
        store.finalize(8)
    with pytest.raises(ValueError, match=r"1 expected ids are missing \(e.g. \['ex-9'\]\)"):
        store.finalize(5, expected_ids=ids + ["ex-9"])
    assert not store.finished
