"""torch eager as an `effc bench` engine: the zoo model's own torch module on the bench's feed.

Only zoo models know their torch module (`torch_model()`); the compiled inputs are the module's
positional arguments in order, since the ONNX export took its inputs from them.
"""

from __future__ import annotations

import numpy as np

from effc.errors import EffcError


class TorchEngine:
    """A zero-argument eager call of zoo model ``zoo_name`` on ``feed``, with ``threads`` threads."""

    def __init__(self, zoo_name: str, input_names: list[str], feed: dict[str, np.ndarray], threads: int):
        import torch

        from effc import zoo

        module, example = zoo.get(zoo_name).torch_model()
        if len(example) != len(input_names):
            raise EffcError(f"zoo:{zoo_name}: the torch module takes {len(example)} inputs, "
                            f"the compiled model {len(input_names)}")
        torch.set_num_threads(threads)
        self.module = module.eval()
        self.args = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names)
        self._torch = torch

    def __call__(self):
        with self._torch.inference_mode():
            return self.module(*self.args)

    def output(self) -> np.ndarray:
        """The module's (single) output as float32, for the agreement check."""
        result = self()
        if isinstance(result, (tuple, list)):
            result = result[0]
        return result.float().numpy()
