"""Compile conv networks with effc for llvm and time them against ONNX Runtime side by side.

    python tools/bench_convnets.py [--models resnet18,audio-stem] [--work DIR] [--runs 15] [--repeat 2]
                                   [--threads 2] [--profile]

resnet18: transformers' ResNetModel with a ResNet-18 configuration (basic blocks, depths 2-2-2-2),
random init, exported by torch.onnx.export with its default settings at [1, 3, 224, 224].
audio-stem: Whisper's encoder stem (Conv1d k3 s1 + GELU, Conv1d k3 s2 + GELU) on 80 x 3000 mel frames.
Each model is exported and compiled once per work directory (`effc compile --passes none --target
llvm`); `effc bench` (effc/codegen/bench.py: interleaved engines, ORT not spinning between runs) is
run --repeat times, since the machine may be shared; --profile adds `effc bench --profile`'s table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = ("resnet18", "audio-stem")


def resnet18():
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                          embedding_size=64)
    return ResNetModel(config), (1, 3, 224, 224)


def audio_stem():
    import torch
    from torch import nn

    class Stem(nn.Module):  # as WhisperEncoder's conv1 / conv2
        def __init__(self, mels: int = 80, width: int = 384):
            super().__init__()
            self.conv1 = nn.Conv1d(mels, width, kernel_size=3, padding=1)
            self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)

        def forward(self, x):
            return nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(x))))

    torch.manual_seed(0)
    return Stem(), (1, 80, 3000)


BUILDERS = {"resnet18": resnet18, "audio-stem": audio_stem}


def export(name: str, path: Path) -> None:
    import torch

    torch.manual_seed(0)
    module, shape = BUILDERS[name]()
    torch.onnx.export(module.eval(), (torch.randn(*shape),), str(path))


def effc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc.cli", *args], capture_output=True, text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--work", default="/tmp/effc-convnets")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        onnx_path, out = work / f"{name}.onnx", work / name
        if not onnx_path.exists():
            export(name, onnx_path)
        if not (out / "model.so").exists():
            proc = effc("compile", str(onnx_path), "-o", str(out), "--passes", "none", "--target", "llvm")
            if proc.returncode != 0:
                print(f"{name}: compile failed: {proc.stderr.strip()[-300:]}")
                continue
        rules = json.loads((out / "codegen.json").read_text())["rule_hits"]
        print(f"## {name}  (kernels by rule: {rules})")
        for i in range(args.repeat):
            bench = ["bench", str(out), "--runs", str(args.runs), "--threads", str(args.threads),
                     "--json", str(out / f"bench{i}.json")]
            proc = effc(*bench, *(["--profile", "--top", "25"] if args.profile and i == args.repeat - 1 else []))
            if proc.returncode != 0:
                print(f"{name}: bench failed: {proc.stderr.strip()[-300:]}")
                break
            r = json.loads((out / f"bench{i}.json").read_text())
            print(f"run {i}: effc {r['effc']['median_ms']:.2f} ms, ORT {r['ort']['median_ms']:.2f} ms, "
                  f"effc/ORT {r['ratio_vs_ort']:.3f} (after idle {r['ratio_vs_ort_after_idle']:.3f}), "
                  f"max rel err {r['max_rel_err']:.2e}", flush=True)
            if "profile" in proc.stdout or args.profile and i == args.repeat - 1:
                print(proc.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
