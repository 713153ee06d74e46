"""Every reference model exported to ONNX and run in onnxruntime against its own ``predict``:
the largest difference in class probabilities over 64 random uint8 images.

    python scripts/onnx_check.py            # needs onnx and onnxruntime (the [test] extra)

Weights are the seeded initial ones with random biases and BatchNorm statistics away from 0 / 1,
so that every weight shows in the output, yet mild enough that the 19 BatchNorms of resnet20 do
not saturate the softmax (which would make any two outputs agree).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import onnxruntime as ort

from xpcnn.models import INPUT_SHAPES, NAMES, build_model


def non_trivial(model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        weights = []
        for name, w in zip(layer.present_weight_names(), layer.get_weights(), strict=True):
            if name == "moving_variance":
                w = rng.uniform(0.5, 2.0, w.shape)
            elif name == "gamma":
                w = rng.uniform(0.7, 1.2, w.shape)
            elif name in ("bias", "beta", "moving_mean"):
                w = rng.normal(0.0, 0.1, w.shape)
            weights.append(w)
        layer.set_weights(weights)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            shape = INPUT_SHAPES[name]
            model = build_model(name, 10, shape)
            rng = np.random.default_rng(0)
            non_trivial(model, rng)
            x = rng.integers(0, 256, (64, *shape), dtype=np.uint8)
            path = os.path.join(tmp, f"{name}.onnx")
            model.export(path)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = session.run(None, {"input": x.astype(np.float32)})[0]
            want = model.predict(x)
            print(f"{name:16s} max |onnxruntime - predict| = {np.abs(got - want).max():.2e}, "
                  f"same class for {np.mean(got.argmax(1) == want.argmax(1)):.0%} of images, "
                  f"largest probability {want.max(1).mean():.2f} on average")


if __name__ == "__main__":
    main()
