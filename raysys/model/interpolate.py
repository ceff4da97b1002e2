"""Weight-space interpolation between a fine-tuned encoder and the model it started from.

`(1 - w) * base + w * tuned` for every floating-point tensor (WiSE-FT, Wortsman et al. 2022):
w = 1 is the fine-tuned model, w = 0 the base. Fine-tuning for alignment moves monolingual
retrieval away from what the base model knew; an intermediate w keeps most of the cross- and
multilingual gain while it returns monolingual retrieval towards the base (issue 15's probe:
w = 0.5 of the demo model). Both models must share an architecture (same keys and shapes).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from raysys import storage
from raysys.errors import ConfigError


def interpolate_states(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], weight: float,
                       base_name: str = "base", tuned_name: str = "tuned") -> dict[str, torch.Tensor]:
    """(1 - weight) * base + weight * tuned, tensor by tensor; integer tensors (ids, counters) from `tuned`."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"interpolation weight {weight} is outside [0, 1]", field="--interpolate",
                          hint="0 is the base model, 1 the fine-tuned one")
    if base.keys() != tuned.keys():
        key = sorted(base.keys() ^ tuned.keys())[0]
        raise ConfigError(f"the models differ in architecture: {key!r} is in only one of them", file=base_name,
                          field="--base", hint=f"give the model {tuned_name} was fine-tuned from")
    mixed = {}
    for key, value in tuned.items():
        if base[key].shape != value.shape:
            raise ConfigError(f"the models differ in architecture: {key!r} has shape {tuple(base[key].shape)} "
                              f"here and {tuple(value.shape)} in {tuned_name}", file=base_name, field="--base",
                              hint=f"give the model {tuned_name} was fine-tuned from")
        if value.is_floating_point():
            mixed[key] = (1.0 - weight) * base[key].float() + weight * value.float()
        else:
            mixed[key] = value.clone()
    return mixed


def write_interpolated(base: str, tuned: str, weight: float, out: str) -> str:
    """Save the interpolated encoder as an HF + sentence-transformers directory at `out` (a local
    path or a storage URI); tokenizer, pooling and prefixes are the fine-tuned model's."""
    from transformers import AutoModel

    from raysys.model.default import resolve_model_path
    from raysys.model.encoder import BiEncoder

    tuned_dir, base_dir = resolve_model_path(tuned), resolve_model_path(base)
    encoder = BiEncoder.from_pretrained(tuned_dir)
    base_state = AutoModel.from_pretrained(base_dir).state_dict()
    state = interpolate_states(base_state, encoder.backbone.state_dict(), weight, base_name=base, tuned_name=tuned)
    if not storage.is_remote(out):
        encoder.save(storage.local_path(out), state_dict=state)
        return out
    with tempfile.TemporaryDirectory(prefix="raysys-interpolated-") as tmp:
        encoder.save(Path(tmp) / "model", state_dict=state)
        storage.upload_dir(Path(tmp) / "model", out)
    return out
