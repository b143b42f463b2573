"""MoELoRA (mixture of LoRA experts) as CoIN implements it, laid out like a peft tuner.

config.py (MoELoRAConfig), router.py (per-token softmax gate, optional top-k, load-balancing loss), layer.py
(MoELoRALinear: fused experts, plus the naive per-expert loop used as the reference), model.py (injection).

Why not a peft tuner: peft 0.21 offers no public way to add a method. A new PeftType cannot be registered from
outside peft; `LoraConfig._register_custom_module` is private and experimental, meant for layer *types* peft
does not support (mapping nn.Linear would hijack every LoRA layer), and it requires the replacement to follow
peft's LoraLayer conventions (`lora_A`/`lora_B` ModuleDicts per adapter name, `update_layer`, merge/unmerge),
while a MoELoRA layer cannot be merged (gates depend on the input) and peft's trainable-parameter marking and
state-dict filtering key on the `lora_` prefix, so a router would be frozen or dropped from saved adapters; the
files would also claim PeftType LORA and load as plain LoRA elsewhere. LoRA variants (`LoraVariant`) are chosen
from LoraConfig fields inside peft and documented as private. So MoELoRA is ~200 lines of our own: injection in
place (the model keeps its class, `generate` works), parameters prefixed `moelora_` (`moelora_A`, `moelora_B`,
`moelora_router.weight`) next to the wrapped `base_layer` exactly as peft names it, and our own safetensors
save/load (coin_ray.tuners). peft is used where it fits: the LoRA baseline is peft's own LoRA
(`inject_adapter_in_model`) on the same resolved target list, so the two methods are directly comparable.
"""
from coin_ray.tuners.moelora.config import MoELoRAConfig
from coin_ray.tuners.moelora.layer import MoELoRALinear, moelora_loop_forward
from coin_ray.tuners.moelora.model import ADAPTER_PREFIX, inject_moelora, moelora_aux_loss, moelora_layers
from coin_ray.tuners.moelora.router import MoELoRARouter

__all__ = [
    "ADAPTER_PREFIX",
    "MoELoRAConfig",
    "MoELoRALinear",
    "MoELoRARouter",
    "inject_moelora",
    "moelora_aux_loss",
    "moelora_layers",
    "moelora_loop_forward",
]
