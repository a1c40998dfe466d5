"""Transfer-learning switches of the one training loop (no second trainer), and `fmk merge`:

- init_from: start from a pretrained checkpoint (its weights, architecture and tokenizer) on a new corpus;
- freeze_embeddings / freeze_blocks k: freeze the token embedding (and with it the tied head) and the first k
  blocks (frozen parameters get no gradient and are left out of the optimizer);
- layer_lr_decay d: block i of L trains at lr * d ** (L - i), the embedding at lr * d ** (L + 1), the final
  norm (and an untied head) at lr;
- lora_rank r > 0: LoRA adapters (fmkernels.nn.LoRALinear) on lora_targets, everything else frozen;
  lora_base int8 / int4 quantizes the frozen base first (QLoRA-style).

A LoRA checkpoint stores the adapters next to the frozen base; `load_model` (fmk eval / generate / a later
--from) rebuilds the adapters from the saved config and merges them into dense weights.

Where each piece lives: loading and LoRA attach / merge in model_source.py, freezing in converters.py, the
layer-wise lr groups in optim.py; the names stay importable from here.
"""
from __future__ import annotations

from pathlib import Path

from ..models.config import ConfigError
from .checkpoint import list_checkpoints, save_checkpoint
from .converters import apply_freezing  # noqa: F401
from .model_source import (_quantize_targets, attach_lora, is_lora_checkpoint, load_pretrained,  # noqa: F401
                           merge_to_dense)
from .optim import _block_index, lr_scale, param_groups, trainable_summary  # noqa: F401


def merge_checkpoint(path, out_dir) -> Path:
    """Write a dense copy of a (LoRA) checkpoint into out_dir: adapters folded into the weights, LoRA fields of the
    saved config reset, no optimizer state. `fmk eval` / `generate` / `finetune --from` load it like any other."""
    pre = load_pretrained(path)
    ck = pre["checkpoint"]
    out = Path(out_dir)
    if list_checkpoints(out):
        raise ConfigError(f"merge: out_dir {str(out)!r} already holds checkpoints; choose another out_dir")
    state = dict(ck["state"])
    cfg = dict(state.get("config", {}))
    cfg.update(lora_rank=0, lora_base="dense", out_dir=str(out))
    state.update(config=cfg, merged_from=str(pre["path"]))
    return save_checkpoint(out, int(state.get("step", 0)), pre["model"], {}, state, ck["tokenizer"])
