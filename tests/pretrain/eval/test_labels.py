import numpy as np
import pytest

from data_shards.readers.obo import load_obo
from pretrain.eval.labels import (
    LabelSpace,
    class_labels,
    ec_ancestors_in,
    ec_label_sets,
    ec_prefixes,
    go_ancestors_in,
    go_label_sets,
)


def _t(go_id, aspect, name=""):
    return {"id": go_id, "aspect": aspect, "name": name}


def test_go_propagation_with_a_tiny_obo(tiny_obo):
    onto = load_obo(tiny_obo)
    proteins = [
        [_t("GO:0000009", "F")],  # alt id of zinc ion binding
        [_t("GO:0000001", "F"), _t("GO:0005829", "C")],  # obsolete MF; cytosol part_of cytoplasm
        [_t("GO:9999999", "F", "made-up activity")],  # unknown to the ontology: kept as is
        [],
    ]
    mf = go_label_sets(proteins, "F", onto)
    assert mf.sets == [{"GO:0008270", "GO:0043167", "GO:0005488"}, set(), {"GO:9999999"}, set()]
    assert mf.obsolete_ids == 1 and mf.unknown_ids == 1
    assert mf.names["GO:0043167"] == "ion binding" and mf.names["GO:9999999"] == "made-up activity"
    assert mf.known_ids == 2  # the alt id and the obsolete term, not cytosol (a CC term)
    cc = go_label_sets(proteins, "C", onto)
    assert cc.sets[1] == {"GO:0005829", "GO:0005737"}  # root GO:0005575 removed
    assert (cc.obsolete_ids, cc.known_ids, cc.unknown_ids) == (0, 1, 0)  # the obsolete term is an MF one
    anc = go_ancestors_in(["GO:0005488", "GO:0043167", "GO:0008270"], onto)
    assert anc == {"GO:0005488": [], "GO:0043167": ["GO:0005488"], "GO:0008270": ["GO:0005488", "GO:0043167"]}


def test_go_labels_without_ontology_are_used_as_annotated():
    labels = go_label_sets([[_t("GO:0008270", "F"), _t("GO:0005829", "C")]], "F")
    assert labels.sets == [{"GO:0008270"}] and labels.unknown_ids == 0
    assert go_ancestors_in(["GO:0008270"]) == {"GO:0008270": []}


@pytest.mark.parametrize(
    "ec, expected",
    [
        ("2.7.11.1", ["2.", "2.7.", "2.7.11.", "2.7.11.1"]),
        ("1.2.-.-", ["1.", "1.2."]),
        ("3.4.21.n1", ["3.", "3.4.", "3.4.21.", "3.4.21.n1"]),
        ("-.-.-.-", []),
        ("", []),
    ],
)
def test_ec_prefixes(ec, expected):
    assert ec_prefixes(ec) == expected


def test_ec_prefix_propagation_and_ancestors():
    sets = ec_label_sets([["2.7.11.1", "2.7.1.5"], [], ["1.2.-.-"]])
    assert sets == [{"2.", "2.7.", "2.7.11.", "2.7.11.1", "2.7.1.", "2.7.1.5"}, set(), {"1.", "1.2."}]
    anc = ec_ancestors_in(["2.", "2.7.", "2.7.11.", "2.7.11.1", "1.2."])
    assert anc["2.7.11.1"] == ["2.", "2.7.", "2.7.11."]
    assert anc["2.7."] == ["2."] and anc["1.2."] == []  # "1." is not a label here


def test_label_space_matrix_and_roundtrip(tmp_path):
    space = LabelSpace(["b", "a", "c", "a"], {"a": "alpha"})
    assert space.labels == ["a", "b", "c"] and space.names == {"a": "alpha", "b": "", "c": ""}
    y = space.matrix([{"a", "c"}, {"zz"}, set()])
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 0, 0], [0, 0, 0]])
    space.save(tmp_path / "labels.json", task="t")
    again = LabelSpace.load(tmp_path / "labels.json")
    assert again.labels == space.labels and again.names == space.names


def test_class_labels():
    assert class_labels([{"family": "F1"}, {}, {"family": ""}, {"family": 3}], "family") == ["F1", None, None, "3"]
