"""Getting a streaming model onto a device, and chunk size <-> attention context.

One path for every source: a Hugging Face id (`ASRModel.from_pretrained`), a `.nemo`
file (`ASRModel.restore_from`), the bundled demo model (a `.nemo` in the package) or
an in-memory model object.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ModelLoadError, UnsupportedChunkSizeError
from .nemo_compat import has_prompt, quiet_nemo_logging

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "nvidia/nemotron-3.5-asr-streaming-0.6b"
DEMO_MODEL = "demo"
# 80 ms encoder frames; chunk = right context + 1 frames.
CHUNK_MS_TO_RIGHT_CONTEXT = {80: 0, 160: 1, 320: 3, 560: 6, 1120: 13}
SAMPLE_RATE = 16000


def demo_model_path() -> Path:
    """The bundled demo checkpoint (a tiny model of the real class, trained on synthetic speech)."""
    return Path(str(resources.files("pipecat_nemotron").joinpath("models", "demo.nemo")))


def model_name(model) -> str:
    """A stable name for a model source, used as the engine registry key."""
    if isinstance(model, (str, Path)):
        return str(model)
    return f"{type(model).__name__}@{id(model):x}"


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device={device!r} was asked for but torch sees no CUDA GPU; use device='cpu' or 'auto'.")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}.")
    return device


def load_model(model, *, device: str = "auto"):
    """Return a cache-aware streaming RNN-T model in eval mode on `device`.

    `model` is a Hugging Face id, a path to a `.nemo` file, `"demo"`, or a model object.
    Raises `ModelLoadError` with what to do when the model cannot be had.
    """
    device = resolve_device(device)
    if isinstance(model, (str, Path)):
        loaded = _load_from_source(str(model), device)
    else:
        loaded = model
    check_streaming_model(loaded, source=model_name(model))
    return loaded.to(device).eval()


def _load_from_source(source: str, device: str):
    import torch

    if source == DEMO_MODEL:
        path = demo_model_path()
        if not path.is_file():
            raise ModelLoadError(
                f"The bundled demo model is missing ({path}). Reinstall pipecat-nemotron, or build it with "
                "`python -m tools.demo_model build` from a source checkout.")
        return _restore(path, torch.device(device))
    path = Path(os.path.expanduser(source))
    if source.endswith(".nemo") or path.exists():
        if not path.is_file():
            raise ModelLoadError(f"No model file at {path}. Give a path to a .nemo checkpoint, a Hugging Face id "
                                 f"such as {DEFAULT_MODEL!r}, or 'demo' for the bundled demo model.")
        return _restore(path, torch.device(device))
    return _from_pretrained(source, torch.device(device))


def _restore(path: Path, device):
    from nemo.collections.asr.models import ASRModel

    try:
        with quiet_nemo_logging():
            return ASRModel.restore_from(str(path), map_location=device)
    except Exception as exc:  # NeMo raises many kinds; the user needs one message
        raise ModelLoadError(f"Could not load the .nemo checkpoint {path}: {type(exc).__name__}: {exc}. "
                             "Is it a complete NeMo ASR checkpoint?") from exc


def _from_pretrained(name: str, device):
    from nemo.collections.asr.models import ASRModel

    try:
        with quiet_nemo_logging():
            return ASRModel.from_pretrained(model_name=name, map_location=device)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"Could not fetch model {name!r} from Hugging Face ({type(exc).__name__}: {exc}). "
            + ("HF_HUB_OFFLINE=1 is set. " if offline else "The machine may be offline or the id misspelt. ")
            + "Download the .nemo file elsewhere and pass its path, or use model='demo' (CLI: --model demo) "
              "for the bundled demo model."
        ) from exc


def check_streaming_model(model, *, source: str) -> None:
    """Refuse models this engine cannot stream, with the reason."""
    from nemo.collections.asr.models import EncDecRNNTModel

    if not isinstance(model, EncDecRNNTModel):
        raise ModelLoadError(f"{source} is a {type(model).__name__}; the engine needs a cache-aware RNN-T model "
                             "(EncDecRNNTBPEModelWithPrompt, as nemotron-3.5-asr-streaming).")
    encoder = getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "get_initial_cache_state") or not hasattr(encoder, "att_context_size_all"):
        raise ModelLoadError(f"{source}'s encoder ({type(encoder).__name__}) is not a cache-aware streaming encoder.")
    if getattr(encoder, "att_context_style", None) != "chunked_limited":
        raise ModelLoadError(f"{source}'s encoder uses att_context_style={encoder.att_context_style!r}; "
                             "cache-aware streaming needs 'chunked_limited'.")
    normalize = getattr(getattr(model.preprocessor, "featurizer", None), "normalize", None)
    if normalize in ("per_feature", "all_features"):
        raise ModelLoadError(f"{source} normalizes features per utterance ({normalize!r}), which cannot stream.")
    if not has_prompt(model):
        logger.info("%s has no language prompt; language must be 'auto' and tags come only from the model", source)


@dataclass(frozen=True)
class ChunkSpec:
    """Chunk geometry of one attention context, in 10 ms mel frames and 80 ms encoder frames."""

    chunk_ms: int
    att_context_size: tuple[int, int]
    first_chunk_frames: int
    chunk_frames: int
    pre_encode_cache_frames: int
    drop_extra_pre_encoded: int
    valid_out_len: int

    @property
    def chunk_samples(self) -> int:
        return self.chunk_frames * HOP_SAMPLES

    def chunk_boundary_at_or_after(self, frame: int) -> int:
        """The first step boundary (in mel frames) at or after `frame`; 0 counts as one."""
        if frame <= 0:
            return 0
        if frame <= self.first_chunk_frames:
            return self.first_chunk_frames
        steps = -(-(frame - self.first_chunk_frames) // self.chunk_frames)
        return self.first_chunk_frames + steps * self.chunk_frames


HOP_SAMPLES = 160


def att_context_for_chunk(model, chunk_ms: int) -> list[int]:
    """[left, right] attention context giving `chunk_ms`, checked against the trained list."""
    if chunk_ms not in CHUNK_MS_TO_RIGHT_CONTEXT:
        raise UnsupportedChunkSizeError(
            f"chunk_ms={chunk_ms} is not a streaming chunk size; use one of {sorted(CHUNK_MS_TO_RIGHT_CONTEXT)}.")
    right = CHUNK_MS_TO_RIGHT_CONTEXT[chunk_ms]
    trained = [list(map(int, a)) for a in model.encoder.att_context_size_all]
    matches = [a for a in trained if a[1] == right]
    if matches:
        return matches[0]
    # NeMo runs any right context on a multi-lookahead model; accuracy is unmeasured for
    # untrained ones (the published nemotron-3.5 config lists [56,3], [56,0], [56,6], [56,13]).
    offered = sorted({_chunk_ms_of(a[1]) for a in trained if a[1] in CHUNK_MS_TO_RIGHT_CONTEXT.values()})
    left = max(a[0] for a in trained)
    logger.warning("chunk_ms=%d (att_context_size [%d, %d]) was not trained for this model, which was trained for "
                   "%s ms (att_context_size %s): accuracy is unknown; prefer a trained chunk size.",
                   chunk_ms, left, right, offered, trained)
    return [left, right]


def _chunk_ms_of(right: int) -> int:
    return {v: k for k, v in CHUNK_MS_TO_RIGHT_CONTEXT.items()}[right]


def chunk_spec(model, chunk_ms: int) -> ChunkSpec:
    """Set the model's attention context for `chunk_ms` and read its streaming geometry."""
    att = att_context_for_chunk(model, chunk_ms)
    with quiet_nemo_logging():
        model.encoder.set_default_att_context_size(att)
    cfg = model.encoder.streaming_cfg

    def pair(value):
        return (value[0], value[1]) if isinstance(value, (list, tuple)) else (value, value)

    first, later = pair(cfg.shift_size)
    cache_first, cache_later = pair(cfg.pre_encode_cache_size)
    if cache_first != 0:
        raise UnsupportedChunkSizeError(f"unexpected pre-encode cache on the first step: {cfg.pre_encode_cache_size}")
    return ChunkSpec(chunk_ms=chunk_ms, att_context_size=(att[0], att[1]), first_chunk_frames=first,
                     chunk_frames=later, pre_encode_cache_frames=cache_later,
                     drop_extra_pre_encoded=int(cfg.drop_extra_pre_encoded), valid_out_len=int(cfg.valid_out_len))
