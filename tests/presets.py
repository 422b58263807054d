"""The conf/ presets as typed configs, for tests (the same files Hydra composes)."""
from core.models import NVAEConfig
from core.models.energy import EnergyNetConfig
from core.training.config import load_preset


def energy_preset(name: str, **overrides) -> EnergyNetConfig:
    """conf/energy/<name>.yaml with field overrides."""
    return load_preset("energy", name, EnergyNetConfig, **overrides)


def nvae_preset(name: str, **overrides) -> NVAEConfig:
    """conf/nvae/<name>.yaml with field overrides."""
    return load_preset("nvae", name, NVAEConfig, **overrides)
