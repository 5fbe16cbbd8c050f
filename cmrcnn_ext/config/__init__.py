"""cmrcnn_ext's config keys, their validation, and building a config from a file."""
from cmrcnn_ext.config.defaults import (
    MASK_STAGES_CHOICES,
    TEST_MASK_MERGE_CHOICES,
    add_cmrcnn_config,
)
from cmrcnn_ext.config.setup import load_config, setup_cfg
from cmrcnn_ext.config.validate import ConfigError, config_problems, validate_config

__all__ = [
    "MASK_STAGES_CHOICES",
    "TEST_MASK_MERGE_CHOICES",
    "ConfigError",
    "add_cmrcnn_config",
    "config_problems",
    "load_config",
    "setup_cfg",
    "validate_config",
]
