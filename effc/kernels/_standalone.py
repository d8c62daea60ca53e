"""One hand-written CPU kernel built on its own, outside a model: what kernel tests and tools/bench_*
call as ``kernel(x)`` and time with TVM's evaluator."""

from __future__ import annotations

import numpy as np


def host_target():
    """The host CPU as TVM detects it (``mcpu=native`` silently builds generic code in TVM 0.27)."""
    import tvm

    return tvm.target.Target.from_device(tvm.cpu())


class StandaloneKernel:
    """``choice`` (a Kernel: its PrimFunc takes x [rows, K], the packed weights, bias, out [rows, n])
    built for ``target``; ``kernel(x)`` pads x [m, K] to the kernel's rows and returns out[:m]."""

    def __init__(self, choice, bias: np.ndarray, m: int, n: int, target):
        import tvm

        self.m, self.n = m, n
        self.name, self.rows = choice.name, int(choice.func.params[0].shape[0])
        lib = tvm.compile(tvm.IRModule({self.name: choice.func}), target=target)
        self.module = lib.jit() if hasattr(lib, "jit") else lib
        self.device = tvm.cpu()
        self._weights = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in
                         (*choice.weights, np.asarray(bias, dtype=np.float32))]
        self._out = tvm.runtime.tensor(np.zeros((self.rows, self.n), dtype=np.float32), self.device)

    def arguments(self, x: np.ndarray) -> list:
        import tvm

        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.rows != len(x):
            x = np.concatenate([x, np.zeros((self.rows - len(x), x.shape[1]), np.float32)])
        return [tvm.runtime.tensor(x, self.device), *self._weights, self._out]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        args = self.arguments(x)
        self.module[self.name](*args)
        return args[-1].numpy()[:self.m]

    def time_ms(self, x: np.ndarray, number: int = 20, repeat: int = 7) -> float:
        """Median over ``repeat`` timings of ``number`` calls each, after TVM's own warm-up call."""
        timer = self.module.time_evaluator(self.name, self.device, number=number, repeat=repeat, min_repeat_ms=0)
        return float(np.median(timer(*self.arguments(x)).results) * 1e3)
