"""The run configuration: ``schema`` (typed, frozen sections; a field's comment is its
documentation) and ``loader`` (YAML + ``a.b=c`` overrides, strict). Loading a config imports no
torch (a test checks it): the CLI answers a bad config before anything heavy loads."""

from dist_ft.config.loader import config_to_dict, load_config
from dist_ft.config.schema import (
    Config,
    ConfigError,
    ResourcesConfig,
    RunConfig,
    TinyModelConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "ResourcesConfig",
    "RunConfig",
    "TinyModelConfig",
    "config_to_dict",
    "load_config",
]
