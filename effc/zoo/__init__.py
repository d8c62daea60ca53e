"""Reference models: deterministic builders, held-out data and task metrics.

Each zoo model lives in its own module under effc.zoo exposing:

- ``DESCRIPTION``: one line for ``effc zoo list``;
- ``VERSION``: an int, bumped whenever the build changes (it keys the build cache);
- ``torch_model() -> (torch.nn.Module, tuple)``: the eval-mode module and its example inputs;
- ``build() -> onnx_ir.Model``: the model, built deterministically (fixed seeds / shipped weights),
  normally ``effc.from_torch(*torch_model(), input_names=..., output_names=...)``;
- ``sample_inputs(count, seed) -> list[dict[str, np.ndarray]]``: valid inputs for differential checks;
- ``evaluate(run) -> tuple[str, float]``: the task metric on held-out data, where ``run`` maps one
  feed dict to the model's output dict (an ONNX Runtime session over any variant of the model).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from effc.errors import EffcError

# name -> module (lazy: importing torch/transformers only when a model is used)
MODELS: dict[str, str] = {
    "vit-s16": "effc.zoo.vit_s16",
    "bert-base": "effc.zoo.bert_base",
    "gpt2": "effc.zoo.gpt2",
    "llama-tiny": "effc.zoo.llama_tiny",
    "deit-tiny-repbn": "effc.zoo.deit_tiny_repbn",
    "minilm-l6": "effc.zoo.minilm_l6",
    "vit-digits": "effc.zoo.vit_digits",
    "gpt-text": "effc.zoo.gpt_text",
}


def get(name: str) -> ModuleType:
    if name not in MODELS:
        raise EffcError(f"unknown zoo model '{name}' (known: {', '.join(MODELS)})")
    return importlib.import_module(MODELS[name])
