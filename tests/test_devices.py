"""A model spread over several devices is refused by name, never run with a device mismatch
or copied to one device behind the user's back (issue 17).

No machine here has two GPUs, so the spread is made on the CPU: one block's parameters moved
to the ``meta`` device (what ``accelerate`` uses for offloaded weights), and TransformerLens 3's
``n_devices`` set on the config as ``from_pretrained(..., n_devices=2)`` would."""

from __future__ import annotations

import pytest
import torch

import depass_lens as dp
from depass_lens.errors import UnsupportedModelError
from tests.conftest import TL, make_model, random_tokens


def test_parameters_on_two_devices_are_refused_naming_them():
    model = make_model("gpt2", torch.float32)
    tokens = random_tokens(model)
    dp.DePass(model).attribute(tokens, dp.Logit(3), dp.Heads())  # one device: fine
    model.blocks[1].to("meta")
    with pytest.raises(UnsupportedModelError, match=r"several devices \(cpu, meta;"):
        dp.DePass(model)


@pytest.mark.skipif(TL >= 4, reason="n_devices is TransformerLens 3's HookedTransformer setting")
def test_n_devices_is_refused_by_name():
    model = make_model("gpt2", torch.float32)
    model.cfg.n_devices = 2
    with pytest.raises(UnsupportedModelError, match="n_devices=2"):
        dp.DePass(model)
