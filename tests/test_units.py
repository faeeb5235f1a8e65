"""Work units: the plan (deterministic, whole small files, parts of big ones) and the
readers of parts, whose ranges tile a file so that every record is read exactly once."""

from __future__ import annotations

import gzip
import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelgen.contract.configs import load_config
from labelgen.contract.storage import MIB
from labelgen.corpus import Record, read_source, resolve_sources
from labelgen.spec import CorpusSpec
from labelgen.units import plan_record, plan_units, read_unit, unit_sha256


def spec(**kw) -> CorpusSpec:
    return load_config(CorpusSpec, {"sources": ["unused"], **kw})


def items_of(items) -> list[tuple[str, str]]:
    """What a reader gave, without indices and progress: ("record", text) / ("rejected", reason)."""
    return [("record", i.text) if isinstance(i, Record) else ("rejected", i.reason) for i in items]


def whole_and_source(path, **kw):
    s = spec(sources=[str(path)], **kw)
    (source,) = resolve_sources(s)
    return s, source, items_of(read_source(source, s))


def read_tiled(source, s, cuts: list[int]) -> list[tuple[str, str]]:
    """Records of the byte ranges [0, c1), [c1, c2), ..., [ck, size), one after another."""
    bounds = [0, *cuts, source.size]
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        part = list(read_source(source, s, (a, b)))
        assert [i.index for i in part] == sorted(i.index for i in part)
        assert all(0 <= i.progress <= b - a for i in part), "progress counts bytes within the part"
        out.extend(items_of(part))
    return out


def check_every_tiling(path, **kw) -> None:
    """Every single cut, and random tilings of many cuts, read what the whole file reads."""
    s, source, whole = whole_and_source(path, **kw)
    assert whole, "the test file holds records"
    for cut in range(source.size + 1):
        assert read_tiled(source, s, [cut]) == whole, f"a cut at byte {cut} reads another set of records"
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, source.size), rng.randint(2, min(40, source.size - 1))))
        assert read_tiled(source, s, cuts) == whole, f"the tiling at {cuts} reads another set of records"


JSONL = (
    b'{"text": "first"}\n'
    b'{"text": "a line much longer than the small parts it will be cut into, on purpose"}\n'
    b'{"text": "crlf"}\r\n'
    b"\n"
    b'{"text": broken\n'
    b'{"text": "' + b"x" * 30 + b'"}\n'
    b'\xff{"text": "bad utf8"}\n'
    b'{"text": "no newline at the end"}'
)


def test_jsonl_byte_ranges_tile_the_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(JSONL)
    check_every_tiling(path, max_record_chars=20)


def test_jsonl_ranges_ending_in_a_newline_and_lines_longer_than_a_part(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "' + b"y" * 5000 + b'"}\n{"text": "after"}\n')
    s, source, whole = whole_and_source(path)
    cuts = list(range(100, source.size, 100))  # 50 parts inside the long line read nothing
    assert read_tiled(source, s, cuts) == whole == [("record", "y" * 5000), ("record", "after")]


def test_an_overlong_line_in_a_part_is_skipped_in_bounded_memory(tmp_path, monkeypatch):
    import labelgen.corpus as corpus

    monkeypatch.setattr(corpus, "_CHUNK", 1000)
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "' + b"x" * 200_000 + b'"}\n{"text": "next"}\n')
    s, source, whole = whole_and_source(path, max_record_chars=10)
    assert read_tiled(source, s, [5, 50_000, 150_000]) == whole
    assert whole == [("record", "a"), ("rejected", "too_long"), ("record", "next")]


TEXT = (
    b"\n\nleading blank lines\r\nand a second line\r\n\r\n"
    b"one\n\ntwo\n\n\nthree\n\n\n\nfour\n   \nstill four (a line of spaces is not blank)\n"
    b"\n\r\r\nafter a line of one CR\n\n"
    b"   \n\n"
    b"\xff\xfe not utf-8\n\n"
    b"last, no newline"
)


@pytest.mark.parametrize("split", ["paragraph", "line"])
def test_text_byte_ranges_tile_the_file(tmp_path, split):
    path = tmp_path / "c.txt"
    path.write_bytes(TEXT)
    check_every_tiling(path, text_split=split)


def test_text_paragraphs_cut_inside_runs_of_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a\n\n\n\n\n\nb\r\n\r\n\r\n\r\nc\n")
    s, source, whole = whole_and_source(path, text_split="paragraph")
    assert whole == [("record", "a"), ("record", "b"), ("record", "c")]
    for a in range(source.size):
        for b in range(a + 1, source.size):
            assert read_tiled(source, s, [a, b]) == whole, (a, b)


def write_parquet(path, texts, row_group_size):
    pq.write_table(
        pa.table({"text": texts, "n": list(range(len(texts)))}), path, row_group_size=row_group_size
    )


def test_parquet_parts_are_row_groups_numbered_as_in_the_file(tmp_path):
    texts = [f"row {i} " + "w" * (i % 50) if i % 7 else None for i in range(1000)]
    write_parquet(tmp_path / "x.parquet", texts, 128)
    s = spec(sources=[str(tmp_path / "x.parquet")], unit_mib=3000 / MIB)
    (source,) = resolve_sources(s)
    units = plan_units([source], s)
    assert len(units) > 2 and {u.kind for u in units} == {"row_groups"}
    assert units[0].start == 0 and units[-1].stop == 8
    assert all(a.stop == b.start for a, b in zip(units, units[1:], strict=False))
    assert [u.first_record for u in units] == [u.start * 128 for u in units]
    assert all(u.sample_prefix == "x.parquet" for u in units), "Parquet parts keep the file's record numbers"
    whole = list(read_source(source, s))
    parts = [item for u in units for item in read_unit(u, s)]
    assert [i.index for i in parts] == [i.index for i in whole] == list(range(1000))
    assert items_of(parts) == items_of(whole) and ("rejected", "missing_field") in items_of(whole)
    for u in units:
        assert all(0 <= i.progress <= u.size for i in read_unit(u, s))
        data = (tmp_path / "x.parquet").read_bytes()[u.offset : u.offset + u.size]
        assert unit_sha256(u) == hashlib.sha256(data).hexdigest()
    assert units[0].offset == 4, "the first row group's span starts after the magic bytes"


def test_saved_dataset_parts_are_arrow_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"doc {i} " + "z" * (i % 40) for i in range(600)] + [""]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"), num_shards=4)
    s = spec(sources=[str(tmp_path / "ds")], unit_mib=1 / MIB)  # every Arrow file is a unit
    (source,) = resolve_sources(s)
    units = plan_units([source], s)
    assert [(u.kind, u.start, u.stop) for u in units] == [("arrow_files", i, i + 1) for i in range(4)]
    assert len({u.sample_prefix for u in units}) == 4 and units[1].sample_prefix == "ds@1"
    whole = items_of(read_source(source, s))
    assert [item for u in units for item in items_of(read_unit(u, s))] == whole
    assert whole.count(("rejected", "empty_text")) == 1
    files = sorted((tmp_path / "ds").glob("*.arrow"))
    assert unit_sha256(units[2]) == hashlib.sha256(files[2].read_bytes()).hexdigest()


def test_the_plan_whole_files_and_parts(tmp_path):
    (tmp_path / "small.jsonl").write_bytes(b'{"text": "s"}\n' * 10)
    (tmp_path / "big.jsonl").write_bytes(b'{"text": "b"}\n' * 1000)  # 14,000 bytes
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(b'{"text": "b"}\n' * 1000, compresslevel=0))
    (tmp_path / "big.txt").write_bytes(b"para\n\n" * 2000)
    write_parquet(tmp_path / "one-group.parquet", ["t" * 100] * 200, 1000)
    s = spec(sources=[f"{tmp_path}/*"], unit_mib=4000 / MIB)
    sources = resolve_sources(s)
    units = plan_units(sources, s)
    by_name: dict[str, list] = {}
    for u in units:
        by_name.setdefault(u.source.name, []).append(u)
    assert [u.index for u in units] == list(range(len(units)))
    assert [(u.kind, u.start, u.stop) for u in by_name["big.jsonl"]] == [
        ("bytes", 0, 3500),
        ("bytes", 3500, 7000),
        ("bytes", 7000, 10500),
        ("bytes", 10500, 14000),
    ]
    assert [u.part for u in by_name["big.jsonl"]] == [0, 1, 2, 3] and by_name["big.jsonl"][0].parts == 4
    assert by_name["big.jsonl"][1].sample_prefix == "big.jsonl@3500"
    assert len(by_name["big.txt"]) == 3
    for name in ("small.jsonl", "big.jsonl.gz", "one-group.parquet"):
        (u,) = by_name[name]
        assert u.whole and (u.kind, u.start, u.stop, u.size) == ("file", 0, u.source.size, u.source.size)
        assert u.sample_prefix == name
    assert by_name["big.jsonl.gz"][0].source.size > 4000, "compressed files stay whole however big"
    file_split = spec(sources=[f"{tmp_path}/*.txt"], unit_mib=4000 / MIB, text_split="file")
    assert [u.whole for u in plan_units(resolve_sources(file_split), file_split)] == [True]
    again = plan_units(resolve_sources(s), s)
    assert again == units and plan_record(again, s) == plan_record(units, s), "the plan is deterministic"
    default = spec(sources=[f"{tmp_path}/*"])
    assert all(u.whole for u in plan_units(sources, default)), "files under unit_mib stay whole, as before"


def test_byte_range_parts_hash_their_own_bytes(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": f"r{i}"}).encode() + b"\n" for i in range(500)))
    s = spec(sources=[str(path)], unit_mib=2000 / MIB)
    units = plan_units(resolve_sources(s), s)
    data = path.read_bytes()
    assert len(units) > 2
    for u in units:
        assert unit_sha256(u) == hashlib.sha256(data[u.start : u.stop]).hexdigest()


def test_an_overlong_paragraph_in_a_part_is_too_long_and_not_held(tmp_path, monkeypatch):
    import labelgen.corpus as corpus

    monkeypatch.setattr(corpus, "_line_limit", lambda spec: 40)  # bytes a part holds of one piece
    path = tmp_path / "c.txt"
    path.write_bytes(b"short\n\n" + b"x" * 45 + b"\nok\n\n" + b"y" * 20 + b"\n" + b"z" * 30 + b"\n\nend\n")
    s, source, whole = whole_and_source(path, text_split="paragraph", max_record_chars=10)
    assert whole == [
        ("record", "short"),
        ("rejected", "too_long"),
        ("rejected", "too_long"),
        ("record", "end"),
    ]
    for cut in range(source.size + 1):
        assert read_tiled(source, s, [cut]) == whole, cut


def test_a_parquet_file_without_row_groups_is_one_unit(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.ParquetWriter(str(path), pa.schema([("text", pa.string())])).close()
    s = spec(sources=[str(path)], unit_mib=1e-6)
    (unit,) = plan_units(resolve_sources(s), s)
    assert unit.whole and list(read_unit(unit, s)) == []


def test_sample_id_prefixes_of_different_sources_never_coincide(tmp_path):
    """A part of x.jsonl numbers its ids from 'x.jsonl@0'; a source named so is refused."""
    from labelgen.corpus import CorpusError

    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(400)))
    (tmp_path / "x.jsonl@0").write_text(json.dumps({"text": "other"}) + "\n")
    s = spec(sources=[str(tmp_path / "x.jsonl*")], format="jsonl", unit_mib=2000 / MIB)
    with pytest.raises(CorpusError, match=r"would start with 'x.jsonl@0'.*rename one of them"):
        plan_units(resolve_sources(s), s)
    (tmp_path / "x.jsonl@0").rename(tmp_path / "x.jsonl-b")
    units = plan_units(resolve_sources(s), s)
    assert len({u.sample_prefix for u in units}) == len(units) > 2


def test_a_paragraph_file_without_blank_lines_is_not_read_once_per_part(tmp_path, monkeypatch):
    """Parts where no paragraph begins stop at their end instead of scanning to the file's."""
    import labelgen.corpus as corpus

    path = tmp_path / "log.txt"
    path.write_bytes(b"a line of a log without blank lines\n" * 3000)  # ~108 kB, one paragraph
    s = spec(sources=[str(path)], max_record_chars=1000, unit_mib=10_000 / MIB)
    units = plan_units(resolve_sources(s), s)
    assert len(units) >= 10
    consumed = []
    real = corpus._lines_at

    def counting(*args, **kwargs):
        for line in real(*args, **kwargs):
            consumed.append(len(line[0] or b""))
            yield line

    monkeypatch.setattr(corpus, "_lines_at", counting)
    found = [items_of(read_unit(u, s)) for u in units]
    assert found[0] == [("rejected", "too_long")] and all(f == [] for f in found[1:])
    assert sum(consumed) <= 2.5 * path.stat().st_size, "each part reads about its own bytes"


def test_byte_ranges_cut_inside_multibyte_characters_tile_the_file(tmp_path):
    """Cuts fall inside 2-, 3- and 4-byte UTF-8 characters; every record is still read once."""
    texts = ["café au lait", "漢字とかな", "emoji 🎉🎈 party", "ascii", "ünïcödé ñ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_bytes(b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts))
    check_every_tiling(jsonl)
    text = tmp_path / "u.txt"
    text.write_bytes("\n\n".join(texts).encode())
    check_every_tiling(text, text_split="paragraph")
    check_every_tiling(text, text_split="line")


def test_compressed_and_whole_read_sources_are_not_read_in_byte_ranges(tmp_path):
    from labelgen.corpus import CorpusError, byte_splittable

    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(JSONL))
    s, source, _ = whole_and_source(path)
    assert not byte_splittable(source, s)
    with pytest.raises(CorpusError, match="cannot be read in byte ranges"):
        list(read_source(source, s, (0, 10)))
