"""mvmodel: the multi-view DiT, EDM diffusion, tokenizer, data, trainer and inference around mvkernels."""

__version__ = "0.1.0"
