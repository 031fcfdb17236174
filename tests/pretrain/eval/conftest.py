from __future__ import annotations

import pytest

from tests.pretrain.eval.tiny import TINY_OBO, build_corpus, build_export


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("eval_corpus"))


@pytest.fixture(scope="session")
def tiny_export(tiny_corpus, tmp_path_factory):
    return build_export(tiny_corpus, tmp_path_factory.mktemp("eval_run") / "export")


@pytest.fixture
def tiny_obo(tmp_path):
    path = tmp_path / "tiny.obo"
    path.write_text(TINY_OBO)
    return path
