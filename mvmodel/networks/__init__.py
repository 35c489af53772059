"""The multi-view DiT of Cosmos-Predict1 (state-dict compatible), its configs and checkpoint loading."""
from .checkpoint import DEFAULT_CAMERA_MAP, LoadReport, load_cosmos_checkpoint, read_state_dict, to_cosmos_state_dict
from .config import (PRESETS, RELEASED_6VIEW_CAMERAS, WAYMO_5VIEW_CAMERAS, DiTConfig, cosmos_7b_multiview_6view,
                     cosmos_7b_multiview_waymo, from_upstream_kwargs, preset, small, tiny)
from .dit import MultiviewDiT, meta_device
from .precision import PRECISIONS, Precision, apply_precision, set_sampling_step

__all__ = [
    "DEFAULT_CAMERA_MAP", "DiTConfig", "LoadReport", "MultiviewDiT", "PRESETS", "RELEASED_6VIEW_CAMERAS",
    "WAYMO_5VIEW_CAMERAS", "cosmos_7b_multiview_6view", "cosmos_7b_multiview_waymo", "from_upstream_kwargs",
    "PRECISIONS", "Precision", "apply_precision", "set_sampling_step",
    "load_cosmos_checkpoint", "meta_device", "preset", "read_state_dict", "small", "tiny", "to_cosmos_state_dict",
]
