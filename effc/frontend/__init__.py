"""Front-ends: ONNX files, torch.export programs and live PyTorch modules -> onnx_ir."""
