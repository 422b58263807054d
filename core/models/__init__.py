"""Backbones (NVAE, MLP VAE) and their building blocks. No DeepSpeed, MLflow, Hydra or rank logic here."""
from core.models.interface import LatentGroup, NoiseSpaceBackbone, TowerPass
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.models.nvae import NVAE
from core.models.nvae_config import NVAEConfig
from core.models.official_nvae import OfficialCheckpointError, load_official_nvae
from core.models.summary import count_parameters, format_summary, parameter_summary

__all__ = ["LatentGroup", "MLPVAE", "MLPVAEConfig", "NVAE", "NVAEConfig", "NoiseSpaceBackbone",
           "OfficialCheckpointError", "TowerPass", "count_parameters", "format_summary", "load_official_nvae",
           "parameter_summary"]
