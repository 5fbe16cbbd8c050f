"""cmrcnn_ext's config keys, their validation, and building a config from a file.

- :mod:`~cmrcnn_ext.config.schema`: cmrcnn_ext's own keys (default, allowed values, meaning);
- :mod:`~cmrcnn_ext.config.tuned`: the Detectron2 keys it tunes (reference values);
- :mod:`~cmrcnn_ext.config.values`: the allowed-value types both use;
- :mod:`~cmrcnn_ext.config.defaults`: :func:`add_cmrcnn_config`, built from the schema;
- :mod:`~cmrcnn_ext.config.validate`: every config rule;
- :mod:`~cmrcnn_ext.config.setup`: loading a config file with overrides.
"""

from cmrcnn_ext.config.defaults import add_cmrcnn_config
from cmrcnn_ext.config.setup import load_config, setup_cfg
from cmrcnn_ext.config.validate import (
    ConfigError,
    check_values,
    config_problems,
    validate_config,
)

__all__ = [
    "ConfigError",
    "add_cmrcnn_config",
    "check_values",
    "config_problems",
    "load_config",
    "setup_cfg",
    "validate_config",
]
