"""The label-format contract: light imports, manifest round trip, version checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import (
    FORMAT_VERSION,
    FormatError,
    Manifest,
    ShardRecord,
    UnitRecord,
    label_schema,
    shard_name,
    token_hash,
)


def test_schema_is_flat_and_non_nullable():
    schema = label_schema()
    for field in schema:
        assert not field.nullable, field.name
        if hasattr(field.type, "value_type"):
            assert not hasattr(field.type.value_type, "value_type"), f"{field.name} is a list of lists"
    assert schema.metadata[b"labelgen.format_version"] == FORMAT_VERSION.encode()


def test_shard_names_sort_in_unit_order():
    names = [shard_name(u, s) for u in (0, 1, 10) for s in (0, 2, 11)]
    assert names == sorted(names)


def test_token_hash_depends_on_every_token():
    a = np.arange(100, dtype=np.int32)
    b = a.copy()
    b[57] += 1
    assert token_hash(a) == token_hash(a.astype(np.int64)) != token_hash(b)


def _manifest() -> Manifest:
    shard = ShardRecord("shards/part-00000-00000.parquet", 0, 0, 3, 30, 27, 1, 100, "ab", 0, 3)
    unit = UnitRecord(0, "file:///c.jsonl", 3, 30, 1, {"empty_text": 2}, "cd")
    return Manifest(
        k=4,
        teacher={"model": "m"},
        tokenizer={"fingerprint": "f"},
        corpus={},
        spec_sha256="s",
        shards=[shard],
        units=[unit, unit],
        created_at="now",
    )


def test_manifest_round_trip_and_totals(tmp_path):
    m = _manifest()
    (tmp_path / "manifest.json").write_text(m.to_json())
    back = read_manifest(str(tmp_path))
    assert back == m
    assert back.totals["tokens"] == 30 and back.rejected == {"empty_text": 4}


def test_missing_manifest_means_incomplete(tmp_path):
    (tmp_path / "_commits").mkdir()
    (tmp_path / "_commits" / "part-00000-00000.json").write_text("{}")
    with pytest.raises(FormatError, match="incomplete.*1 shard\\(s\\) are committed"):
        read_manifest(str(tmp_path))


def test_version_mismatch_names_both_versions(tmp_path):
    data = json.loads(_manifest().to_json())
    data["format_version"] = "2.0"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=f"format version 2.0, this reader supports {FORMAT_VERSION}"):
        read_manifest(str(tmp_path))


def test_unit_records_of_parts_and_records_written_before_them(tmp_path):
    """Records without the part fields (written before units could be parts) are whole
    sources; a manifest listing a split source's parts reads back whole."""
    old = {
        "unit": 0,
        "source": "file:///c.jsonl",
        "sequences": 3,
        "tokens": 30,
        "shards": 1,
        "source_sha256": "cd",
    }
    record = UnitRecord.from_dict(old, "old record")
    assert (record.part, record.parts, record.range_kind, record.range_sha256) == (0, 1, "file", "")
    part = UnitRecord(1, "file:///big.jsonl", 3, 30, 1, {}, "", 1, 4, "bytes", 500, 1000, "ef")
    assert UnitRecord.from_dict(json.loads(json.dumps(part.__dict__)), "part") == part
    m = _manifest()
    m.units = [UnitRecord(0, "file:///c.jsonl", 3, 30, 1, {"empty_text": 2}, "", 0, 2, "bytes", 0, 9, "ab")]
    m.corpus = {
        "sources": [
            {
                "url": "file:///c.jsonl",
                "size": 18,
                "sha256": None,
                "parts": [
                    {
                        "unit": 0,
                        "kind": "bytes",
                        "start": 0,
                        "stop": 9,
                        "offset": 0,
                        "size": 9,
                        "sha256": "ab",
                    }
                ],
            }
        ]
    }
    (tmp_path / "manifest.json").write_text(m.to_json())
    assert read_manifest(str(tmp_path)) == m
