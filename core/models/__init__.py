"""Backbones (NVAE, MLP VAE) and their building blocks. No DeepSpeed, MLflow, Hydra or rank logic here."""
from core.models.interface import LatentGroup, NoiseSpaceBackbone, TowerPass
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.models.nvae import NVAE
from core.models.nvae_config import PRESETS, NVAEConfig, nvae_config_from_dict, nvae_preset
from core.models.summary import count_parameters, format_summary, parameter_summary

__all__ = ["LatentGroup", "MLPVAE", "MLPVAEConfig", "NVAE", "NVAEConfig", "NoiseSpaceBackbone", "PRESETS",
           "TowerPass", "count_parameters", "format_summary", "nvae_config_from_dict", "nvae_preset",
           "parameter_summary"]
