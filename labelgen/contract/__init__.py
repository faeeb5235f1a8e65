"""The shared surface between the teacher side and the student side.

- :mod:`~labelgen.contract.format`: the label format (layout, columns, schema, records,
  manifest, version);
- :mod:`~labelgen.contract.codecs`: the top-k codecs, by name;
- :mod:`~labelgen.contract.commits`: the commit log a job writes under ``_commits/``;
- :mod:`~labelgen.contract.dataset`: opening a dataset (manifest, or log while written);
- :mod:`~labelgen.contract.storage`: atomic writes, one-PUT publishing, retries;
- :mod:`~labelgen.contract.configs`: typed YAML configs with every error reported at once;
- :mod:`~labelgen.contract.signatures`: ed25519 manifest signatures and key files.

The ``students`` package imports these and nothing else from ``labelgen``; they import
only the standard library, numpy, pyarrow, fsspec and PyYAML.
"""

from labelgen.contract.codecs import CODEC_NAMES, Codec, get_codec
from labelgen.contract.commits import CommitLog, JobRecord
from labelgen.contract.configs import ConfigError, config_to_dict, load_config, load_config_file
from labelgen.contract.dataset import read_manifest, read_manifest_if_complete
from labelgen.contract.format import (
    FORMAT_VERSION,
    Columns,
    FormatError,
    Manifest,
    ShardRecord,
    UnitRecord,
    label_schema,
    token_hash,
    tokenizer_fingerprint,
)

__all__ = [
    "CODEC_NAMES",
    "FORMAT_VERSION",
    "Codec",
    "Columns",
    "CommitLog",
    "ConfigError",
    "FormatError",
    "JobRecord",
    "Manifest",
    "ShardRecord",
    "UnitRecord",
    "config_to_dict",
    "get_codec",
    "label_schema",
    "load_config",
    "load_config_file",
    "read_manifest",
    "read_manifest_if_complete",
    "token_hash",
    "tokenizer_fingerprint",
]
