"""Multi-view Text2World inference: checkpoint folders, the generation pipeline and its output files.

CLIs: ``python -m mvmodel.inference.text2world_multiview`` (upstream's argument set; see that module) and
``python -m mvmodel.inference.model_dir`` (a trainer job's checkpoint -> an inference model folder).
"""
from importlib import import_module

# Names are imported on first use (PEP 562), not here: a submodule that is also a CLI (``python -m
# mvmodel.inference.model_dir``) must not already be in sys.modules when runpy executes it as __main__, or runpy
# warns on every run and the CLI would see a second copy of the module's globals.
_EXPORTS = {
    "CONFIG_NAME": "model_dir", "SLOTS": "model_dir", "ModelSpec": "model_dir", "resolve_model": "model_dir",
    "slot_of_camera": "model_dir", "write_model_dir": "model_dir",
    "MultiviewGenerationPipeline": "pipeline", "build_network": "pipeline", "encode_prompts": "pipeline",
    "euler_step_cfg": "pipeline",
    "concat_in_time": "video_io", "grid": "video_io", "save_outputs": "video_io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
