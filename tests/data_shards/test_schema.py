"""Schema validation and the member codec (data_shards/schema.py)."""

import io
import json
import struct

import numpy as np
import pytest

from data_shards.schema import (
    Backbone,
    ProteinRecord,
    SchemaError,
    decode_sample,
    encode_record,
    normalize_text,
    safe_key,
    validate_record,
)


def make_backbone(length=5, plddt=False, seed=0):
    rng = np.random.default_rng(seed)
    coords = rng.normal(size=(length, 4, 3)).astype(np.float32)
    mask = np.ones((length, 4), dtype=bool)
    return Backbone(coords, mask, rng.uniform(50, 90, length).astype(np.float32) if plddt else None)


def make_record(**overrides):
    fields = dict(
        id="P12345",
        sequence="MKVLA",
        backbone=make_backbone(5),
        text={
            "name": "Kinase",
            "go": [{"id": "GO:0005524", "aspect": "F", "name": "ATP binding"}],
            "ec": ["2.7.11.1"],
        },
        meta={"source": "test", "evidence": 1, "organism": "Homo sapiens"},
    )
    fields.update(overrides)
    return ProteinRecord(**fields)


def test_valid_record_passes_and_reports_modalities():
    record = make_record()
    validate_record(record)
    assert record.modalities() == {"sequence", "structure", "text"}
    assert make_record(backbone=None, text=None).modalities() == {"sequence"}
    assert make_record(sequence=None).modalities() == {"structure", "text"}


def test_nan_coordinates_allowed_only_where_unobserved():
    backbone = make_backbone(5)
    backbone.coords[2, 3] = np.nan
    backbone.atom_mask[2, 3] = False
    validate_record(make_record(backbone=backbone))
    backbone.atom_mask[2, 3] = True
    with pytest.raises(SchemaError, match="not finite"):
        validate_record(make_record(backbone=backbone))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sequence": "mkvla"}, "uppercase"),
        ({"sequence": "MKV1A"}, "uppercase"),
        ({"sequence": ""}, "uppercase"),
        ({"sequence": "MKVL"}, "differs from backbone length"),
        ({"backbone": Backbone(np.zeros((5, 4, 3)), np.ones((5, 4), bool))}, "float32"),
        ({"backbone": Backbone(np.zeros((5, 3, 3), np.float32), np.ones((5, 3), bool))}, r"\(L, 4, 3\)"),
        ({"backbone": Backbone(np.zeros((5, 4, 3), np.float32), np.ones((5, 4), np.uint8))}, "bool"),
        (
            {"backbone": Backbone(np.zeros((5, 4, 3), np.float32), np.ones((4, 4), bool))},
            "atom_mask must have shape",
        ),
        (
            {"backbone": Backbone(np.zeros((5, 4, 3), np.float32), np.ones((5, 4), bool), np.ones(4, np.float32))},
            "plddt must have shape",
        ),
        (
            {"backbone": Backbone(np.zeros((5, 4, 3), np.float32), np.ones((5, 4), bool), None, np.arange(5))},
            "residue_number must be an int32",
        ),
        (
            {"backbone": Backbone(np.zeros((5, 4, 3), np.float32), np.ones((5, 4), bool), None, np.ones(4, np.int32))},
            "residue_number must have shape",
        ),
        ({"text": ["not", "a", "dict"]}, "text must be a dict"),
        ({"text": {"name": 3}}, "text.name"),
        ({"text": {"go": [{"id": "GO:12", "aspect": "F"}]}}, "GO:0005524"),
        ({"text": {"go": [{"id": "GO:0005524", "aspect": "X"}]}}, "aspect"),
        ({"text": {"ec": ["kinase"]}}, "text.ec"),
        ({"text": {"rewrites": "one string"}}, "text.rewrites"),
        ({"text": {"rewrites": ["ok", "  "]}}, "text.rewrites entries"),
        ({"text": {"rewrites": ["x"] * 65}}, "at most 64"),
        ({"text": {"go": [{"id": "GO:0005524", "aspect": "F", "definition": 3}]}}, "definition"),
        ({"meta": {"evidence": 1}}, "meta.source"),
        ({"meta": {"source": "x", "evidence": 1.5}}, "meta.evidence"),
        ({"meta": {"source": "x", "id": "other"}}, "differs from the record id"),
        ({"sequence": None, "backbone": None, "text": None}, "no modality"),
        ({"id": ""}, "non-empty"),
    ],
)
def test_invalid_records_are_rejected(overrides, message):
    with pytest.raises(SchemaError, match=message):
        validate_record(make_record(**overrides))


def test_codec_round_trip_and_text_normalisation():
    record = make_record(backbone=make_backbone(5, plddt=True))
    members = encode_record(record)
    assert set(members) == {"seq.txt", "backbone.npz", "text.json", "meta.json"}
    assert encode_record(record) == members  # deterministic bytes
    decoded = decode_sample(members)
    assert decoded.id == record.id and decoded.sequence == record.sequence
    np.testing.assert_array_equal(decoded.backbone.coords, record.backbone.coords)
    np.testing.assert_array_equal(decoded.backbone.plddt, record.backbone.plddt)
    assert decoded.backbone.residue_number is None  # optional: absent stays absent
    record.backbone.residue_number = np.array([3, 4, 9, 10, 10], np.int32)
    numbered = decode_sample(encode_record(record)).backbone.residue_number
    assert numbered.dtype == np.int32 and numbered.tolist() == [3, 4, 9, 10, 10]
    assert decoded.text == normalize_text(record.text)
    assert decoded.text["function"] == "" and decoded.text["location"] == ""
    assert decoded.meta == {**record.meta, "id": record.id}


def test_decoder_is_lenient_on_sequence_case_and_whitespace():
    members = encode_record(make_record())
    members["seq.txt"] = b"  mkvla\n"
    assert decode_sample(members).sequence == "MKVLA"


@pytest.mark.parametrize(
    "member, payload, message",
    [
        ("meta.json", b"[1, 2]", "JSON object"),
        ("meta.json", b"{bad json", "invalid JSON"),
        ("meta.json", json.dumps({"source": "x"}).encode(), "no string 'id'"),
        ("text.json", b'{"name": NaN}', "invalid JSON|not allowed"),
        ("seq.txt", b"\xff\xfe", "utf-8"),
        ("backbone.npz", b"not a zip", "npz"),
    ],
)
def test_bad_members_are_rejected(member, payload, message):
    members = encode_record(make_record())
    members[member] = payload
    with pytest.raises(SchemaError, match=message):
        decode_sample(members)


def _zip_headers_patched(data: bytes, flags: int = 0, method: int | None = None) -> bytes:
    """``data`` (a zip archive) with ``flags`` OR-ed into, and ``method`` written over, every entry header."""
    out = bytearray(data)
    for signature, flag_at, method_at in ((b"PK\x01\x02", 8, 10), (b"PK\x03\x04", 6, 8)):
        at = out.find(signature)
        while at >= 0:
            struct.pack_into("<H", out, at + flag_at, struct.unpack_from("<H", out, at + flag_at)[0] | flags)
            if method is not None:
                struct.pack_into("<H", out, at + method_at, method)
            at = out.find(signature, at + 4)
    return bytes(out)


@pytest.mark.parametrize(
    "member, damage, message",
    [
        ("backbone.npz", lambda d: _zip_headers_patched(d, flags=1), "encrypted"),
        ("backbone.npz", lambda d: _zip_headers_patched(d, method=99), "compression method"),
        ("meta.json", lambda d: d[:-1] + b', "evidence": ' + b"1" * 5000 + b"}", "invalid JSON"),  # int digit limit
    ],
    ids=["encrypted-zip-entry", "unknown-compression", "5000-digit-int"],
)
def test_members_damaged_past_the_usual_errors_are_schema_errors(member, damage, message):
    """Anything else would escape the reader's skip-and-count and stop a training run."""
    members = encode_record(make_record())
    members[member] = damage(members[member])
    with pytest.raises(SchemaError, match=message):
        decode_sample(members)


def test_npy_instead_of_npz_and_extra_arrays_are_rejected():
    members = encode_record(make_record())
    stream = io.BytesIO()
    np.save(stream, np.zeros((5, 4, 3), np.float32))
    with pytest.raises(SchemaError, match="npz"):
        decode_sample({**members, "backbone.npz": stream.getvalue()})
    stream = io.BytesIO()
    backbone = make_backbone(5)
    np.savez(stream, coords=backbone.coords, atom_mask=backbone.atom_mask, extra=np.zeros(3))
    with pytest.raises(SchemaError, match="unexpected entry"):
        decode_sample({**members, "backbone.npz": stream.getvalue()})


def test_missing_meta_and_unknown_extension_are_rejected():
    members = encode_record(make_record())
    with pytest.raises(SchemaError, match="meta.json is missing"):
        decode_sample({k: v for k, v in members.items() if k != "meta.json"})
    with pytest.raises(SchemaError, match="unexpected member extension"):
        decode_sample({**members, "pkl": b"x"})


def test_safe_key():
    assert safe_key("sp|P12345|KIN_HUMAN") == "sp_P12345_KIN_HUMAN"
    assert safe_key("1abc.A") == "1abc_A"
    assert safe_key("../../etc/passwd") == "______etc_passwd"
    long_a, long_b = safe_key("x" * 300 + "a"), safe_key("x" * 300 + "b")
    assert len(long_a) <= 80 and long_a != long_b


def test_optional_text_fields_round_trip_and_leave_old_records_unchanged():
    """``rewrites`` and GO ``definition`` are stored when given and never invented on decode."""
    plain = make_record()
    before = encode_record(plain)["text.json"]
    assert b"rewrites" not in before and b"definition" not in before
    assert "rewrites" not in decode_sample(encode_record(plain)).text  # old records decode as before
    text = {
        **plain.text,
        "go": [{**plain.text["go"][0], "definition": "Binding to ATP."}],
        "rewrites": ["A kinase that binds ATP.", "Binds ATP; kinase."],
    }
    decoded = decode_sample(encode_record(make_record(text=text)))
    assert decoded.text["rewrites"] == text["rewrites"]
    assert decoded.text["go"][0]["definition"] == "Binding to ATP."
