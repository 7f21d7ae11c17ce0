"""Typed configuration of the ``mgpr`` command (Hydra structured config).

The schema is the :class:`~mgpr.conf.schema.PredictConfig` dataclass, registered in Hydra's
ConfigStore as :data:`~mgpr.conf.schema.SCHEMA_NAME`; registering it is the only import-time
side effect allowed.
"""

from mgpr.conf.schema import PredictConfig, register_configs

register_configs()

__all__ = ["PredictConfig", "register_configs"]
