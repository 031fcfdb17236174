"""ProtCLIP property-driven sampling (data_shards/sampling.py) and the manifest's sample_props."""

import math

import pytest

from data_shards.manifest import load_manifest
from data_shards.sampling import keep_probability, property_coverage
from data_shards.schema import ProteinRecord
from data_shards.writer import ShardWriter


@pytest.mark.parametrize(
    "existence, coverage, expected",
    [
        (1, 4, 1.0),  # sqrt(4/4) / 1
        (1, 3, 0.8660254037844386),  # sqrt(3/4) / 1
        (2, 4, 0.125),  # 1 / 8
        (2, 3, 0.10825317547305482),  # sqrt(3/4) / 8
        (3, 4, 0.037037037037037035),  # 1 / 27
        (3, 3, 0.03207501495497921),  # sqrt(3/4) / 27
        (1, 2, 0.0),  # o < 3 dropped
        (1, 0, 0.0),
        (4, 4, 0.0),  # predicted: dropped
        (5, 4, 0.0),  # uncertain: dropped
    ],
)
def test_keep_probability_hand_computed(existence, coverage, expected):
    assert math.isclose(keep_probability(existence, coverage), expected, rel_tol=1e-12)


def test_unknown_existence_and_reviewed_are_kept():
    assert keep_probability(None, 0) == 1.0 and keep_probability(None, 4) == 1.0
    assert keep_probability(3, 1, reviewed=True) == 1.0


@pytest.mark.parametrize("existence, coverage", [(0, 4), (6, 4), (1, 5), (1, -1), (True, 4), (1, 2.0)])
def test_keep_probability_rejects_bad_values(existence, coverage):
    with pytest.raises(ValueError):
        keep_probability(existence, coverage)


def test_property_coverage():
    assert property_coverage() == 0
    assert property_coverage(name="Kinase", function="Phosphorylates.", location=" ", similarity="") == 2
    assert property_coverage(name="a", function="b", location="c", similarity="d") == 4


def test_sample_props_in_the_manifest(tmp_path):
    def record(i):
        return ProteinRecord(f"P{i}", "MKV", None, None, {"source": "test"})

    with ShardWriter(tmp_path, samples_per_shard=3) as writer:
        for i in range(4):
            writer.write(record(i), {"existence": i + 1, "coverage": 4} if i != 1 else None)
    shards = load_manifest(tmp_path).shards
    assert shards[0].sample_props == {"coverage": [4, None, 4], "existence": [1, None, 3]}
    assert shards[1].sample_props == {"coverage": [4], "existence": [4]}
    with ShardWriter(tmp_path / "plain") as writer:
        writer.write(record(0))
    assert load_manifest(tmp_path / "plain").shards[0].sample_props is None
    assert "sample_props" not in (tmp_path / "plain" / "manifest.json").read_text()
