"""The shared surface between the teacher side and the student side.

``labelgen.contract.format`` is the label format (schema, manifest, version);
``labelgen.contract.configs`` loads typed YAML configs. The ``students`` package
imports these and nothing else from ``labelgen``; both import only the standard
library, numpy, pyarrow, fsspec and PyYAML.
"""

from labelgen.contract.configs import ConfigError, config_to_dict, load_config, load_config_file
from labelgen.contract.format import (
    FORMAT_VERSION,
    Columns,
    FormatError,
    Manifest,
    ShardRecord,
    UnitRecord,
    label_schema,
    read_manifest,
    token_hash,
    tokenizer_fingerprint,
)

__all__ = [
    "FORMAT_VERSION",
    "Columns",
    "ConfigError",
    "FormatError",
    "Manifest",
    "ShardRecord",
    "UnitRecord",
    "config_to_dict",
    "label_schema",
    "load_config",
    "load_config_file",
    "read_manifest",
    "token_hash",
    "tokenizer_fingerprint",
]
