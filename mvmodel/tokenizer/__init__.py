"""Video tokenizers: upstream's TorchScript Cosmos-Tokenize1-CV8x8x8 loader, a weight-free built-in one and a linear
one fitted to a dataset (what ``python -m mvmodel.tokenizer.export`` writes by default)."""
from .base import VideoTokenizer
from .builtin import SpaceToDepthTokenizer, space_to_depth_basis
from .fitted import FittedTokenizer, reconstruction_psnr
from .jit import REQUIRED_FILES, JITVideoTokenizer


def load_tokenizer(directory=None, **kwargs) -> VideoTokenizer:
    """``JITVideoTokenizer.from_directory(directory, **kwargs)``, or the built-in tokenizer when ``directory`` is
    None (only ``pixel_chunk_duration`` and batch sizes apply to it)."""
    if directory is None:
        keep = {k: v for k, v in kwargs.items() if k in ("pixel_chunk_duration", "max_enc_batch_size", "max_dec_batch_size")}
        return SpaceToDepthTokenizer(**keep)
    return JITVideoTokenizer.from_directory(directory, **kwargs)


__all__ = ["FittedTokenizer", "JITVideoTokenizer", "REQUIRED_FILES", "SpaceToDepthTokenizer", "VideoTokenizer",
           "load_tokenizer", "reconstruction_psnr", "space_to_depth_basis"]
