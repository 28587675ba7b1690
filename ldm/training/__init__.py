"""Lightning training: the latent diffusion module, its callbacks and learning-rate schedules."""
from ldm.training.latent_diffusion import LatentDiffusionModule, export_state_dict, inference_config
from ldm.training.lr import LinearWarmup, WarmupCosine

__all__ = ["LatentDiffusionModule", "export_state_dict", "inference_config", "LinearWarmup", "WarmupCosine"]
