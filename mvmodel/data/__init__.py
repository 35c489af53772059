"""Multi-view video data: upstream's folder layout, decoders (DALI on GPU, PyAV on CPU), the training loader,
a synthetic dataset generator and T5 embedding preprocessing.

    from mvmodel.data import MultiviewDataset, build_dataloader
    ds = MultiviewDataset("datasets/waymo", num_frames=57, view_keys=[...], video_size=(480, 848))
    loader = build_dataloader(ds, batch_size=1, rank=rank, world_size=world, seed=0)
"""
from .dataset import CAPTION_POLICIES, MultiviewDataset
from .decoders import PyAVDecoder, VideoDecoder, dali_available, get_decoder, probe, resize_video
from .loader import MultiviewLoader, ResumableDistributedSampler, build_dataloader

__all__ = [
    "CAPTION_POLICIES", "MultiviewDataset", "MultiviewLoader", "PyAVDecoder", "ResumableDistributedSampler",
    "VideoDecoder", "build_dataloader", "dali_available", "get_decoder", "probe", "resize_video",
]
