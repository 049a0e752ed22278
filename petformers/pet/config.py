"""`PetConfig`: the YAML's `model.model_config.pet_config` (MindFormers' keys) plus the PEFT options.

A MindFormers `pet_config` loads as is; PEFT's `adapter_config.json` converts to and from it, so an
adapter is described the same way whichever tool wrote it.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field

from petformers.errors import AdapterError, ConfigError
from petformers.pet.lora import lora_scaling

log = logging.getLogger(__name__)

# MindFormers pet_config keys with no PyTorch meaning here: accepted, reported once, not used.
_IGNORED_MINDFORMERS_KEYS = {
    "param_init_type": "adapters are always float32",
    "compute_dtype": "the LoRA branch is always computed in float32",
    "lora_a_init": "use init_lora_weights",
    "lora_b_init": "use init_lora_weights",
}
_reported: set[tuple[str, str]] = set()
_INIT_CHOICES = (True, False, "kaiming", "gaussian", "pissa")


@dataclass
class PetConfig:
    pet_type: str = "lora"
    """The kind of parameter-efficient tuning. Only "lora" (MindFormers' p-tuning, prefix tuning and
    S-LoRA are not implemented)."""

    lora_rank: int = 8
    """r: the inner width of the adapter; A is [r, in], B is [out, r]. MindFormers' default, 8."""

    lora_alpha: float = 16
    """alpha: the LoRA branch is scaled by alpha / r (alpha / sqrt(r) with use_rslora). MindFormers' default, 16."""

    lora_dropout: float = 0.01
    """Dropout probability on the LoRA branch's input only (the base path never drops). MindFormers' default."""

    target_modules: str | list[str] | None = None
    """Which nn.Linear layers get an adapter (required). PEFT's rule: a string is a regex `re.fullmatch`ed
    against the full dotted module name (the seed's '.*wq|.*wk|.*wv|.*wo'); a list matches a name exactly
    or as a `.name` suffix (["wq", "wv"]); "all-linear" is every linear layer but lm_head. Hugging Face
    names (q_proj, gate_proj, ...) are understood too."""

    exclude_modules: str | list[str] | None = None
    """Modules never adapted even when target_modules matches them; same rule as target_modules.
    MindFormers' `exclude_layers` is read as this."""

    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r, so that higher ranks still learn."""

    use_dora: bool = False
    """DoRA: a trainable per-output-row magnitude times the direction of W + scaling·BA (PEFT's forward)."""

    init_lora_weights: bool | str = True
    """True or "kaiming": A Kaiming-uniform (a=sqrt(5)), B zeros, so training starts from the base model.
    "gaussian": A normal with std 1/r, B zeros. "pissa": A and B from the top-r singular vectors of W,
    and W replaced by the residual (the model's output is unchanged). False: nn.Linear's default init
    for both (B != 0: the adapter is not a no-op; for tests)."""

    modules_to_save: list[str] | None = None
    """Modules trained in full beside LoRA and saved with the adapter (e.g. ["lm_head"]), kept as a
    float32 copy; list rule of target_modules."""

    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks overriding lora_rank: {regex: r}, the regex matching a dotted suffix of the
    module name (PEFT's rule), e.g. {"wo": 4} or {"layers.0.attention.wq": 32}. The first key that matches wins."""

    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas overriding lora_alpha, same rule as rank_pattern."""

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Type and range checks; messages name the key as pet_config.KEY (from_dict puts the full path)."""
        if str(self.pet_type).lower() != "lora":
            raise ConfigError(f"pet_config.pet_type: {self.pet_type!r} is not supported; petformers implements 'lora'")
        self.pet_type = "lora"
        _check(isinstance(self.lora_rank, int) and not isinstance(self.lora_rank, bool) and self.lora_rank > 0,
               f"pet_config.lora_rank: must be a positive integer, got {self.lora_rank!r}")
        _check(_is_number(self.lora_alpha) and self.lora_alpha > 0,
               f"pet_config.lora_alpha: must be a positive number, got {self.lora_alpha!r}")
        _check(_is_number(self.lora_dropout) and 0 <= self.lora_dropout < 1,
               f"pet_config.lora_dropout: must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            _check(value is None or isinstance(value, str) or
                   (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                   f"pet_config.{name}: must be a regex string or a list of module names, got {value!r}")
        _check(self.modules_to_save is None or (isinstance(self.modules_to_save, list)
                                                and all(isinstance(v, str) for v in self.modules_to_save)),
               f"pet_config.modules_to_save: must be a list of module names, got {self.modules_to_save!r}")
        init = self.init_lora_weights.lower() if isinstance(self.init_lora_weights, str) else self.init_lora_weights
        _check(init in _INIT_CHOICES,
               f"pet_config.init_lora_weights: {self.init_lora_weights!r} is not one of true, "
               "'kaiming', 'gaussian', 'pissa', false")
        self.init_lora_weights = init
        for name, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
            value = getattr(self, name) or {}
            _check(isinstance(value, dict), f"pet_config.{name}: must be a mapping of module pattern to value")
            for k, v in value.items():
                _check(isinstance(v, kind) and not isinstance(v, bool) and v > 0,
                       f"pet_config.{name}.{k}: must be a positive {'integer' if kind is int else 'number'}, got {v!r}")
            setattr(self, name, dict(value))
        for name in ("use_rslora", "use_dora"):
            _check(isinstance(getattr(self, name), bool), f"pet_config.{name}: must be true or false")

    def scaling(self, rank: int, alpha: float) -> float:
        """The factor on B·A·x: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(rank, alpha, self.use_rslora)

    # ---- MindFormers YAML ------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, key_path: str = "model.model_config.pet_config") -> "PetConfig":
        """From a YAML mapping; an unknown key is a ConfigError naming its path and the nearest valid key."""
        if not isinstance(d, dict):
            raise ConfigError(f"{key_path}: must be a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in d.items():
            if key in _IGNORED_MINDFORMERS_KEYS:
                if (key_path, key) not in _reported:  # the config is read more than once per run
                    _reported.add((key_path, key))
                    log.info("%s.%s ignored: %s", key_path, key, _IGNORED_MINDFORMERS_KEYS[key])
            elif key == "exclude_layers":
                kwargs.setdefault("exclude_modules", value)
            elif key in ("freeze_include", "freeze_exclude"):
                if value:
                    raise ConfigError(f"{key_path}.{key}: not supported; list fully trained modules in "
                                      "modules_to_save instead")
            elif key in known:
                kwargs[key] = value
            else:
                near = difflib.get_close_matches(key, known + list(_IGNORED_MINDFORMERS_KEYS), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(known)}"
                raise ConfigError(f"{key_path}.{key}: unknown key{hint}")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(key_path + str(e).removeprefix("pet_config")) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---- PEFT adapter_config.json ----------------------------------------------------------

    def to_peft_config_dict(self, base_model_name_or_path: str | None) -> dict:
        """PEFT's LoraConfig fields. Module names stay as given here; `save_peft_adapter` replaces
        target_modules / rank_pattern / alpha_pattern by the Hugging Face names of the modules it adapted."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": True if self.init_lora_weights == "kaiming" else self.init_lora_weights,
            "modules_to_save": self.modules_to_save,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": "none",
            "fan_in_fan_out": False,
            "lora_bias": False,
            "inference_mode": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
            "auto_mapping": None,
        }

    @classmethod
    def from_peft_config_dict(cls, d: dict, source: str = "adapter_config.json") -> "PetConfig":
        """From PEFT's adapter_config.json; options petformers cannot reproduce are an AdapterError."""
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{source}: peft_type {d.get('peft_type')!r} is not supported (LORA only)")
        unsupported = {
            "bias": "none", "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
            "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
            "use_qalora": False, "use_bdlora": None, "alora_invocation_tokens": None,
        }
        for key, neutral in unsupported.items():
            value = d.get(key, neutral)
            if value not in (neutral, None, False, [], {}, "none"):
                raise AdapterError(f"{source}: {key}={value!r} is not supported by petformers")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in ("gaussian", "pissa", "kaiming"):
            raise AdapterError(f"{source}: init_lora_weights={init!r} is not supported "
                               "(true, 'gaussian', 'pissa')")
        if "r" not in d or "target_modules" not in d:
            raise AdapterError(f"{source}: missing key {'r' if 'r' not in d else 'target_modules'!r}")
        try:
            return cls(
                lora_rank=d["r"],
                lora_alpha=d.get("lora_alpha", 8),
                lora_dropout=d.get("lora_dropout", 0.0),
                target_modules=d["target_modules"],
                exclude_modules=d.get("exclude_modules"),
                use_rslora=bool(d.get("use_rslora", False)),
                use_dora=bool(d.get("use_dora", False)),
                init_lora_weights=init,
                modules_to_save=d.get("modules_to_save"),
                rank_pattern=d.get("rank_pattern") or {},
                alpha_pattern=d.get("alpha_pattern") or {},
            )
        except ConfigError as e:
            raise AdapterError(f"{source}: {str(e).removeprefix('pet_config.')}") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)
