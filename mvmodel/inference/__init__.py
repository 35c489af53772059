"""Multi-view Text2World inference: checkpoint folders, the generation pipeline and its output files.

CLI: ``python -m mvmodel.inference.text2world_multiview`` (upstream's argument set; see that module).
"""
from .model_dir import CONFIG_NAME, SLOTS, ModelSpec, resolve_model, slot_of_camera, write_model_dir
from .pipeline import MultiviewGenerationPipeline, build_network, encode_prompts, euler_step_cfg
from .video_io import concat_in_time, grid, save_outputs

__all__ = [
    "CONFIG_NAME", "ModelSpec", "MultiviewGenerationPipeline", "SLOTS", "build_network", "concat_in_time",
    "encode_prompts", "euler_step_cfg", "grid", "resolve_model", "save_outputs", "slot_of_camera",
    "write_model_dir",
]
