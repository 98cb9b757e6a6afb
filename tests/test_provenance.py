"""Provenance: the one feature-space check and the one schema-version reader."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ArtifactError, ProvenanceMismatch
from pipeline.provenance import (
    SCHEMA_VERSION,
    Preprocessing,
    Provenance,
    check_schema_version,
    layer_width,
)

BASE = Provenance(weights="random:0", weights_sha256="a" * 64, layer="fc7", dim=4096)


def test_only_the_feature_space_decides_compatibility():
    same_space = BASE.model_copy(update={"dtype": "float16", "torch_version": "9.9",
                                         "created_at": "2026-01-01T00:00:00+00:00"})
    BASE.require_compatible(same_space, "the index", "the embeddings")
    with pytest.raises(ProvenanceMismatch, match="dtype: float32 vs float16"):
        BASE.require_compatible(same_space, "one part", "another part", same_dtype=True)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"layer": "fc6"}, "layer: fc7 vs fc6"),
        ({"layer": "pool5", "dim": 9216}, "dim: 4096 vs 9216"),
        ({"weights": "random:1", "weights_sha256": "b" * 64},
         "weights_sha256: random:0 (aaaaaaaaaaaa) vs random:1 (bbbbbbbbbbbb)"),
        ({"preprocessing": Preprocessing(resize=224)}, "resize 256 bilinear"),
        ({"model": "vgg16"}, "model: alexnet vs vgg16"),
    ],
)
def test_a_different_feature_space_is_refused_naming_both_sides(change, expected):
    other = BASE.model_copy(update=change)
    with pytest.raises(ProvenanceMismatch) as caught:
        BASE.require_compatible(other, "the index", "new.parquet", fix="rebuild it")
    message = str(caught.value)
    assert message.startswith("new.parquet was made with different features than the index")
    assert expected in message and message.endswith("; rebuild it")


def test_provenance_round_trips_through_json():
    stamped = BASE.stamped()
    assert Provenance.from_json(stamped.to_json(), "x") == stamped
    assert stamped.created_at and layer_width("alexnet", stamped.layer) == stamped.dim
    chained = BASE.model_copy(update={"weights_chain": ({"weights": "imagenet", "sha256": "c"},)})
    assert Provenance.from_json(chained.to_json(), "x") == chained


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ("{not json", "provenance is not valid JSON"),
        ("[1, 2]", "provenance is not a JSON object"),
        ({"schema_version": SCHEMA_VERSION + 1}, "written by a newer fc7"),
        ({"schema_version": "1"}, "no valid schema version"),
        ({"schema_version": 1, "weights": "x"}, "provenance is invalid"),
    ],
)
def test_stored_provenance_that_cannot_be_trusted_is_refused(stored, message):
    text = stored if isinstance(stored, str) else json.dumps(stored)
    with pytest.raises(ArtifactError, match=message) as caught:
        Provenance.from_json(text, where="emb/part-00000.parquet")
    assert str(caught.value).startswith("emb/part-00000.parquet: ")


def test_schema_versions_are_read_in_one_place():
    assert check_schema_version(1, 2, "f", "fix") == 1
    assert check_schema_version(2, 2, "f", "fix") == 2
    for bad in (None, True, 0, -1, 1.0, "2"):
        with pytest.raises(ArtifactError, match="f: no valid schema version"):
            check_schema_version(bad, 2, "f", "rebuild it")
    with pytest.raises(ArtifactError, match=r"schema 3, this one reads 2\); upgrade fc7 or "
                                            r"rebuild the index"):
        check_schema_version(3, 2, "f", "rebuild the index")
