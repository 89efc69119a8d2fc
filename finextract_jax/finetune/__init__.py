"""Fine-tuning victims in JAX: DreamBooth and LoRA, Cutout/RandAugment defences, diffusers exports."""
from finextract_jax.finetune.augment import AUGMENTS, AugmentConfig, augment_batch, cutout, randaugment
from finextract_jax.finetune.data import TrainSet, load_train_set
from finextract_jax.finetune.export import save_dreambooth, save_lora
from finextract_jax.finetune.config import FinetuneConfig
from finextract_jax.finetune.inputs import check_resolution
from finextract_jax.finetune.train import Trainer, TrainState, finetune, make_mesh

__all__ = ["AUGMENTS", "AugmentConfig", "augment_batch", "cutout", "randaugment", "TrainSet", "load_train_set",
           "save_dreambooth", "save_lora", "FinetuneConfig", "Trainer", "TrainState", "check_resolution", "finetune",
           "make_mesh"]
