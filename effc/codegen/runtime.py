"""Load an `effc compile --target` output directory with plain TVM and run it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from effc.errors import EffcError

MANIFEST = "codegen.json"


class Compiled:
    """A loaded OUT directory: call it with a feed dict, get the output dict."""

    def __init__(self, out_dir: str | Path, threads: int | None = None):
        import tvm
        from tvm import relax

        out = Path(out_dir)
        path = out / MANIFEST
        if not path.exists():
            raise EffcError(f"{out}: no {MANIFEST} (not an `effc compile --target` output)")
        self.manifest = json.loads(path.read_text())
        self.is_cuda = self.manifest["target"] == "cuda"
        self.device = tvm.cuda(0) if self.is_cuda else tvm.cpu(0)
        if self.is_cuda and not self.device.exist:
            raise EffcError(f"{out} was built for CUDA ({self.manifest.get('arch')}) and no GPU is present")
        if not self.is_cuda:
            configure_threads(threads or self.manifest.get("threads") or 1)
        lib = tvm.runtime.load_module(str(out / self.manifest["library"]))
        self.vm = relax.VirtualMachine(lib, self.device)
        loaded = tvm.runtime.load_param_dict_from_file(str(out / self.manifest["params"]))
        self.params = [loaded[k].copyto(self.device) if self.is_cuda else loaded[k] for k in sorted(loaded)]
        self.inputs = self.manifest["inputs"]
        self.output_names = self.manifest["outputs"]

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.outputs(self.vm["main"](*self.args(feed), *self.params))

    def args(self, feed: dict[str, np.ndarray]) -> list:
        """Device tensors for ``feed`` in main's order, checked against the compiled shapes."""
        import tvm

        args = []
        for spec in self.inputs:
            if spec["name"] not in feed:
                raise EffcError(f"missing input '{spec['name']}'")
            # Not np.ascontiguousarray: it turns a 0-d input into shape [1].
            arr = np.require(np.asarray(feed[spec["name"]], dtype=spec["dtype"]), requirements="C")
            if list(arr.shape) != spec["shape"]:
                raise EffcError(f"input '{spec['name']}' has shape {list(arr.shape)}, compiled for {spec['shape']}")
            args.append(tvm.runtime.tensor(arr, self.device))
        return args

    def outputs(self, result) -> dict[str, np.ndarray]:
        values = [result] if hasattr(result, "numpy") else list(result)
        return {n: v.numpy() for n, v in zip(self.output_names, values)}


_THREADS: list[int] = []


def configure_threads(threads: int) -> int:
    """Size TVM's CPU thread pool (it defaults to one thread here) once per process.

    TVM_NUM_THREADS, when set, wins. Workers are not pinned: the machine is shared.
    """
    import tvm

    if not _THREADS:
        n = int(os.environ.get("TVM_NUM_THREADS") or threads)
        os.environ["TVM_NUM_THREADS"] = str(n)
        cpus = [str(c) for c in sorted(os.sched_getaffinity(0))] if hasattr(os, "sched_getaffinity") else []
        tvm.get_global_func("runtime.config_threadpool")(-3, n, cpus)  # -3: all workers share all cores
        _THREADS.append(n)
    return _THREADS[0]


def load_compiled(out_dir: str | Path, threads: int | None = None) -> Compiled:
    return Compiled(out_dir, threads)


def run_compiled(compiled: Compiled | str | Path, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run every feed through a compiled module (a loaded one, or an OUT directory)."""
    if not isinstance(compiled, Compiled):
        compiled = load_compiled(compiled)
    return [compiled(f) for f in feeds]
