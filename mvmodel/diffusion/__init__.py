"""EDM diffusion around the multi-view DiT: preconditioning, noise levels, loss with the uncertainty head,
conditioning with CFG text dropout, the denoiser used by samplers, and the Karras/Euler sampler."""
from .conditioning import (Condition, condition_from_batch, condition_uncondition, drop_text, latents_from_video,
                           video_from_latents, video_to_model_range)
from .edm import EDMScaling, FourierFeatures, UncertaintyHead, edm_loss, sample_sigma
from .model import DenoisePrediction, Denoiser, DiffusionModel
from .sampler import initial_noise, karras_sigmas, sample_euler
from .video2world import VideoCondition, inference_condition, training_condition

__all__ = [
    "Condition", "DenoisePrediction", "Denoiser", "DiffusionModel", "EDMScaling", "FourierFeatures",
    "UncertaintyHead", "condition_from_batch", "condition_uncondition", "drop_text", "edm_loss", "initial_noise",
    "karras_sigmas", "latents_from_video", "sample_euler", "sample_sigma", "video_from_latents",
    "video_to_model_range", "VideoCondition", "inference_condition", "training_condition",
]
