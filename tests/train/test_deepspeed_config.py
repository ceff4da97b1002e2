"""The generated DeepSpeed config: fused AdamW by default, and it does the same update as torch's default."""

import pytest
import torch

from raysys.config import TrainConfig
from raysys.train.deepspeed_config import build_deepspeed_config, fused_adamw_available


def adamw_from(ds_config: dict, params) -> torch.optim.AdamW:
    """What DeepSpeed builds for {"type": "AdamW", "torch_adam": true}: torch AdamW with the other params."""
    kwargs = {k: v for k, v in ds_config["optimizer"]["params"].items() if k != "torch_adam"}
    return torch.optim.AdamW(params, **kwargs)


def test_fused_adamw_is_the_default_and_can_be_turned_off():
    on = build_deepspeed_config(TrainConfig(global_batch_size=8), total_steps=10, world_size=2)
    off = build_deepspeed_config(TrainConfig(global_batch_size=8, fused_optimizer=False), total_steps=10, world_size=2)
    assert on["optimizer"]["params"].get("fused") is (True if fused_adamw_available() else None)
    assert "fused" not in off["optimizer"]["params"]
    assert on["train_micro_batch_size_per_gpu"] == 4 and on["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.skipif(not fused_adamw_available(), reason="this torch has no fused AdamW")
def test_fused_adamw_updates_match_the_default_implementation():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Embedding(1000, 32), torch.nn.Linear(32, 8))  # noqa: E731
    fused_model, default_model = make(), make()
    default_model.load_state_dict(fused_model.state_dict())
    initial = fused_model[1].weight.detach().clone()
    train = TrainConfig(lr=1e-2, weight_decay=0.01)
    fused = adamw_from(build_deepspeed_config(train, total_steps=5, world_size=1), fused_model.parameters())
    default = adamw_from(build_deepspeed_config(TrainConfig(lr=1e-2, weight_decay=0.01, fused_optimizer=False),
                                                total_steps=5, world_size=1), default_model.parameters())
    assert fused.defaults["fused"] and not default.defaults.get("fused")
    tokens = torch.randint(0, 1000, (16, 5))
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (default_model, default)):
            model(tokens).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(fused_model.parameters(), default_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (fused_model[1].weight - initial).abs().max() > 1e-3  # it did train
