"""Training: µP pre-training and SFT with WSD, multi-token prediction and InfLLM v2 (spec/training.md).

`cpm4 pretrain` / `cpm4 sft` run `Trainer` from a TOML config (`TrainConfig`); the pieces compose:
`schedule.wsd` (learning-rate factor), `optim.param_groups` (µP learning rates), `data` (token shards,
packing, chat SFT), `loss.lm_loss` (next-token + MTP), `checkpoint` (atomic, bit-exact resume).
"""

from .config import TrainConfig, load_train_config
from .schedule import wsd

__all__ = ["TrainConfig", "load_train_config", "wsd", "Trainer"]


def __getattr__(name: str):
    if name == "Trainer":  # heavy (torch.distributed); imported on use
        from .trainer import Trainer

        return Trainer
    raise AttributeError(name)
