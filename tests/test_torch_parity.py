"""Training steps of the reference models equal PyTorch's in float64 (dropout and augmentation
draws shared through scripts/torch_mirror.py), as the parity script checks on real data."""

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from torch_mirror import mirror, mirror_optimizer  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn.models import build_layers  # noqa: E402


@pytest.mark.parametrize("name, shape, optimizer", [
    ("mnist", (28, 28, 1), "sgd"), ("cifar-augmented", (32, 32, 3), "adamw"),
    ("notebook", (32, 32, 3), "adamw"), ("shapes", (32, 32, 3), "sgd")])
def test_reference_model_steps_match_pytorch_in_float64(name, shape, optimizer):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, 12)
    model = xpcnn.Sequential(build_layers(name), input_shape=shape, seed=0, dtype="float64")
    opt = (xpcnn.optim.SGD(0.02, momentum=0.9, nesterov=True, weight_decay=1e-3)
           if optimizer == "sgd" else xpcnn.optim.AdamW(1e-3))
    model.compile(optimizer=opt)
    twin = mirror(model, torch.float64)
    topt = mirror_optimizer(opt, twin.parameters())
    for step in range(3):
        idx = slice(4 * step, 4 * step + 4)
        ours, _ = model.train_step(model.backend.asarray(x[idx].astype(np.float64)),
                                   model.backend.asarray(y[idx]))
        logits = twin(torch.from_numpy(x[idx].astype(np.float64)))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[idx]))
        topt.zero_grad()
        loss.backward()
        topt.step()
        assert ours == pytest.approx(loss.item(), rel=1e-10), f"step {step}"
    first = next(m for m in twin if isinstance(m, torch.nn.Conv2d))
    np.testing.assert_allclose(model.get_weights()[0],
                               first.weight.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-9,
                               atol=1e-12)
