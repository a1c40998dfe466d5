"""quantize_ finds the module a config builds through the handler registry (no isinstance chain): a new config
is one register_handler call."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fmkernels as fk
from fmkernels import quantization as Q


def test_builtin_configs_have_handlers():
    for cls in (fk.Int8DynamicConfig, fk.Int4WeightOnlyConfig, fk.Float8Config, fk.Int8TrainingConfig):
        assert cls in Q.HANDLERS


def test_a_registered_config_is_accepted_and_its_module_built(monkeypatch):
    @dataclass(frozen=True)
    class HalfConfig:  # a toy format: the layer in fp16
        min_in: int = 8

    class HalfLinear(nn.Linear):
        pass

    def convert(lin, cfg):
        new = HalfLinear(lin.in_features, lin.out_features, lin.bias is not None)
        new.load_state_dict(lin.state_dict())
        return new

    monkeypatch.setitem(Q.HANDLERS, HalfConfig, Q.Handler(
        convert, lambda lin, cfg: None if lin.in_features >= cfg.min_in else f"in_features < {cfg.min_in}"))
    m = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 4))
    fk.quantize_(m, HalfConfig())
    assert type(m[0]) is HalfLinear and type(m[2]) is nn.Linear  # the second is skipped with its reason
    with pytest.raises(TypeError, match="config must be one of"):
        fk.quantize_(nn.Sequential(nn.Linear(4, 4)), object())
    torch.testing.assert_close(m(torch.ones(2, 16)).shape, torch.Size([2, 4]))
