"""Parameter-efficient tuning: LoRA (with rsLoRA, DoRA, PiSSA init), injected into a plain model.

config (PetConfig) -> matching (which layers) -> lora (LoRALinear) -> inject (apply_lora, adapter
tensors) -> merge (fold into the base). PEFT's adapter files: petformers/checkpoint/peft.py.
"""

from petformers.pet.config import PetConfig
from petformers.pet.inject import apply_lora, count_parameters, load_lora_state_dict, lora_state_dict
from petformers.pet.lora import LoRALinear
from petformers.pet.merge import merge_and_unload, merge_lora, unmerge_lora

__all__ = ["PetConfig", "LoRALinear", "apply_lora", "count_parameters", "lora_state_dict", "load_lora_state_dict",
           "merge_lora", "unmerge_lora", "merge_and_unload"]
