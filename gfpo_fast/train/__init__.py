"""The gfpo-fast trainer: ``python -m gfpo_fast.train`` (``__main__``: the command; ``loop``: the loop and its
phases).

Modules: ``config`` (the dataclass that is also the CLI), ``models`` (local / GGUF / cached hub
models), ``data`` (arithmetic task, local datasets, prompt sampler), ``rewards``, ``generation``,
``checkpoint``, ``ownership`` (a run's hold on its output_dir), ``distributed`` (DDP / FSDP2
wrapping), ``reporting`` (metrics, progress bar, plot).
"""
from .config import TrainConfig, parse_args

__all__ = ["TrainConfig", "parse_args", "train"]


def train(cfg: TrainConfig) -> dict:
    """Runs one training run; see :func:`gfpo_fast.train.loop.train`."""
    from .loop import train as _train

    return _train(cfg)
