"""Protein shards: the schema, WebDataset tar writer/reader, manifests, validation, demo corpus.

``ShardWriter`` and ``build_demo_corpus`` import webdataset (which imports torch) on first use;
reading and validating shards needs only numpy and the standard library.
"""

from data_shards.manifest import Manifest, ManifestError, ShardInfo, load_manifest, write_manifest
from data_shards.reader import BadSampleError, BadShardError, ShardReader, iter_records
from data_shards.schema import SCHEMA_VERSION, Backbone, ProteinRecord, SchemaError, safe_key, validate_record
from data_shards.validate import inspect_dir, validate_dir
from data_shards.writer import ShardWriter


def build_demo_corpus(*args, **kwargs):
    """See :func:`data_shards.demo_corpus.build_demo_corpus` (imported lazily)."""
    from data_shards.demo_corpus import build_demo_corpus as build

    return build(*args, **kwargs)


__all__ = [
    "SCHEMA_VERSION",
    "Backbone",
    "BadSampleError",
    "BadShardError",
    "Manifest",
    "ManifestError",
    "ProteinRecord",
    "SchemaError",
    "ShardInfo",
    "ShardReader",
    "ShardWriter",
    "build_demo_corpus",
    "inspect_dir",
    "iter_records",
    "load_manifest",
    "safe_key",
    "validate_dir",
    "validate_record",
    "write_manifest",
]
