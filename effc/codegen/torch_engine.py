"""torch eager as an `effc bench` engine: the zoo model's own torch module on the bench's feed.

Only zoo models know their torch module (`torch_model()`); the compiled inputs are the module's
positional arguments in order, since the ONNX export took its inputs from them. A model compiled for
CUDA is compared with torch on the same GPU (fp32, as compiled), each call waiting for the device.
"""

from __future__ import annotations

import numpy as np

from effc.errors import EffcError


class TorchEngine:
    """A zero-argument eager call of zoo model ``zoo_name`` on ``feed``, with ``threads`` threads."""

    def __init__(self, zoo_name: str, input_names: list[str], feed: dict[str, np.ndarray], threads: int,
                 device: str = "cpu"):
        import torch

        from effc import zoo

        module, example = zoo.get(zoo_name).torch_model()
        if len(example) != len(input_names):
            raise EffcError(f"zoo:{zoo_name}: the torch module takes {len(example)} inputs, "
                            f"the compiled model {len(input_names)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise EffcError("--vs torch for a CUDA build needs torch with CUDA and a GPU; this torch sees none")
        torch.set_num_threads(threads)
        self.module = module.eval().to(device)
        self.args = tuple(torch.from_numpy(np.require(feed[n], requirements="C")).to(device) for n in input_names)
        self._torch, self._cuda = torch, device == "cuda"

    def __call__(self):
        with self._torch.inference_mode():
            result = self.module(*self.args)
        if self._cuda:
            self._torch.cuda.synchronize()
        return result

    def output(self) -> np.ndarray:
        """The module's (single) output as float32, for the agreement check."""
        result = self()
        if isinstance(result, (tuple, list)):
            result = result[0]
        return result.float().cpu().numpy()
