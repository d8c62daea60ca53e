"""Shared plumbing for the Hugging Face zoo models: wrapping, export, seeded inputs, metrics.

torch and transformers are imported inside functions so that reading a zoo module's
DESCRIPTION (``effc zoo list``) stays cheap.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

# Everything is built from configs in code or from files shipped in packages: never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPSET = 23
# evaluate() compares against the torch module on these inputs (fixed so the metric is comparable).
EVAL_COUNT, EVAL_SEED = 4, 1234
# Attention as explicit MatMul/Softmax: "sdpa" exports as the opset-23 Attention op, which codegen
# lowers (effc.codegen.attention_lowering) but the passes cannot look inside; the shipped records and
# benchmarks were made with eager exports.
ATTENTION = "eager"


def seeded(factory: Callable[[], Any]) -> Any:
    """``factory()`` under seed 0, in eval mode: random init is then the same in every process."""
    import torch

    torch.manual_seed(0)
    return factory().eval()


def single_output(model: Any, input_names: Sequence[str], field: str) -> Any:
    """Wrap a transformers model so it takes positional tensors and returns one output tensor.

    The exporter wants plain tensors in and out, and the positional order fixes the ONNX inputs.
    """
    return _single_output_class()(model, tuple(input_names), field).eval()


@functools.cache
def _single_output_class() -> type:
    import torch

    class SingleOutput(torch.nn.Module):
        def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], field: str):
            super().__init__()
            self.model, self.input_names, self.field = model, input_names, field

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(self.input_names, inputs)))[self.field]

    return SingleOutput


def to_tensors(feed: dict[str, np.ndarray], input_names: Sequence[str]) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feed[name])) for name in input_names)


def torch_outputs(module: Any, feeds: list[dict[str, np.ndarray]], input_names: Sequence[str]) -> list[np.ndarray]:
    """The module's single output for each feed, as float32 numpy arrays."""
    import torch

    with torch.inference_mode():
        return [module(*to_tensors(feed, input_names)).float().numpy() for feed in feeds]


def token_inputs(count: int, seed: int, vocab_size: int, seq_len: int, with_mask: bool) -> list[dict[str, np.ndarray]]:
    """Uniform token ids in [0, vocab_size) of shape [1, seq_len] (int64), plus an all-ones mask."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {"input_ids": rng.integers(0, vocab_size, size=(1, seq_len), dtype=np.int64)}
        if with_mask:
            feed["attention_mask"] = np.ones((1, seq_len), dtype=np.int64)
        feeds.append(feed)
    return feeds


def pixel_inputs(count: int, seed: int, image_size: int) -> list[dict[str, np.ndarray]]:
    """Standard-normal images [1, 3, H, W]: what normalised pixel values look like."""
    rng = np.random.default_rng(seed)
    return [{"pixel_values": rng.standard_normal((1, 3, image_size, image_size)).astype(np.float32)}
            for _ in range(count)]


def mean_row_cosine(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """Mean cosine similarity over the last-axis vectors (one per token / image / sentence).

    Per-row rather than whole-tensor so that a few badly damaged tokens still show.
    """
    cosines = []
    for got, ref in zip(outputs, references, strict=True):
        g = np.asarray(got, dtype=np.float64).reshape(-1, ref.shape[-1])
        r = np.asarray(ref, dtype=np.float64).reshape(-1, ref.shape[-1])
        denom = np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1)
        cosines.append(np.sum(g * r, axis=1) / np.maximum(denom, 1e-30))
    return float(np.mean(np.concatenate(cosines)))


@dataclass(eq=False)  # identity hashing: the spec keys the per-process reference cache
class HFModel:
    """One zoo model made from a transformers module: everything but the construction is shared."""

    make_module: Callable[[], Any]  # -> eval-mode module taking positional tensors, returning one
    sample_inputs: Callable[[int, int], list[dict[str, np.ndarray]]]
    input_names: tuple[str, ...]
    output_name: str

    def torch_model(self) -> tuple[Any, tuple]:
        """The module and its example inputs (sample_inputs(1, seed=0))."""
        return self.make_module(), to_tensors(self.sample_inputs(1, 0)[0], self.input_names)

    def build(self) -> Any:
        from effc.frontend.torch import from_torch

        module, example = self.torch_model()
        # torch's exporter names values after their torch ops and does not dedupe against the
        # requested output names (an output called "embedding" clashes with aten.embedding's
        # result and fails the checker), so export under a private name and rename afterwards.
        model = from_torch(module, example, opset=OPSET, input_names=list(self.input_names),
                           output_names=[_EXPORT_OUTPUT])
        _rename_output(model, _EXPORT_OUTPUT, self.output_name)
        return model

    def evaluate(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> tuple[str, float]:
        """("output-cosine", mean row cosine of ``run``'s outputs against the torch module's)."""
        feeds = self.sample_inputs(EVAL_COUNT, EVAL_SEED)
        outputs = [run(feed)[self.output_name] for feed in feeds]
        return "output-cosine", mean_row_cosine(outputs, _reference_outputs(self))


_EXPORT_OUTPUT = "effc_zoo_output"


def _rename_output(model: Any, old: str, new: str) -> None:
    """Name graph output ``old`` as ``new``, moving any internal value already called ``new`` aside."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
    taken = {v.name for v in values}
    for value in values:
        if value.name == new:
            suffix = 0
            while f"{new}_{suffix}" in taken:
                suffix += 1
            value.name = f"{new}_{suffix}"
            taken.add(value.name)
    (output,) = [v for v in graph.outputs if v.name == old]
    output.name = new


@functools.lru_cache(maxsize=None)
def _reference_outputs(spec: HFModel) -> tuple[np.ndarray, ...]:
    # The torch outputs are deterministic (seeded init, fixed inputs): compute once per process.
    feeds = spec.sample_inputs(EVAL_COUNT, EVAL_SEED)
    return tuple(torch_outputs(spec.make_module(), feeds, spec.input_names))
