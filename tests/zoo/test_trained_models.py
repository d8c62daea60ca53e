"""The trained zoo models (vit-digits, gpt-text) and the RepBN DeiT: shipped weights and data,
ONNX export through the build cache, ONNX Runtime agreement with torch and the task metrics."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from effc.errors import EffcError
from effc.frontend.onnx import load
from effc.ir import op_counts
from effc.verify import OrtRunner, deviation
from effc.zoo import deit_tiny_repbn, gpt_text, vit_digits
from effc.zoo.cache import cached_model_path

VIT_DIGITS_MIN_TOP1 = 0.98  # 0.9889 (356 of 360) as trained
GPT_TEXT_MAX_PERPLEXITY = 4.0
EXPORT_MAX_REL = 1e-4


def torch_runner(module, input_name):
    def run(feed):
        with torch.no_grad():
            return {"logits": module(torch.from_numpy(feed[input_name])).numpy()}
    return run


def torch_vs_ort(zoo_module, name, input_name, feeds):
    module, _ = zoo_module.torch_model()
    ort = OrtRunner(cached_model_path(name))
    reference = [torch_runner(module, input_name)(f) for f in feeds]
    return deviation(ort.run_all(feeds), reference)


# ---- vit-digits ------------------------------------------------------------------------------

def test_vit_digits_split_is_fixed_stratified_disjoint_and_upsampled():
    data = vit_digits.split()
    assert data.train_images.shape == (1149, 1, 32, 32) and data.validation_images.shape == (288, 1, 32, 32)
    assert data.test_images.shape == (360, 1, 32, 32)
    assert data.train_images.dtype == np.float32 and 0.0 <= data.test_images.min() <= data.test_images.max() <= 1.0
    assert set(np.bincount(data.test_labels)) <= {35, 36, 37}  # stratified: 10 nearly equal classes
    assert set(np.bincount(data.validation_labels)) <= {28, 29, 30}
    parts = [{img.tobytes() for img in images}
             for images in (data.train_images, data.validation_images, data.test_images)]
    assert sum(map(len, parts)) == len(set().union(*parts))  # no image in two parts
    raw = np.random.default_rng(0).integers(0, 17, (3, 8, 8))
    expected = torch.nn.functional.interpolate(torch.tensor(raw / 16.0)[:, None], size=32, mode="bilinear",
                                               align_corners=False).numpy()
    np.testing.assert_allclose(vit_digits.upsample(raw), expected, atol=1e-6)


def test_vit_digits_calibration_comes_from_the_validation_split_without_repeats():
    validation = {img.tobytes() for img in vit_digits.split().validation_images}
    feeds = vit_digits.calibration_inputs(8, seed=3)
    assert all(f["pixel_values"].shape == (1, 1, 32, 32) for f in feeds)
    assert all(f["pixel_values"].tobytes() in validation for f in feeds)
    assert [f["pixel_values"].tobytes() for f in feeds] == [
        f["pixel_values"].tobytes() for f in vit_digits.calibration_inputs(8, seed=3)]
    whole = vit_digits.calibration_inputs(len(validation))
    assert {f["pixel_values"].tobytes() for f in whole} == validation  # every image once
    with pytest.raises(EffcError, match="has 288 validation images to calibrate on; asked for 289"):
        vit_digits.calibration_inputs(289)


def test_vit_digits_onnx_reaches_its_accuracy_and_agrees_with_torch():
    metric, top1 = vit_digits.evaluate(OrtRunner(cached_model_path("vit-digits")))
    assert metric == "top1" and top1 >= VIT_DIGITS_MIN_TOP1
    feeds = vit_digits.sample_inputs(4, seed=0)
    assert torch_vs_ort(vit_digits, "vit-digits", "pixel_values", feeds).max_rel <= EXPORT_MAX_REL


def test_missing_weights_raise_a_clear_error(monkeypatch, tmp_path):
    for zoo_module in (vit_digits, gpt_text):
        monkeypatch.setattr(zoo_module, "WEIGHTS", tmp_path / "absent.safetensors")
        with pytest.raises(EffcError, match="weights missing"):
            zoo_module.torch_model()


# ---- gpt-text --------------------------------------------------------------------------------

def test_gpt_text_held_out_windows_are_frozen_and_split_by_file():
    windows = gpt_text.held_out_windows()
    assert windows.shape == (128, 128) and windows.dtype == np.int64
    assert len({w.tobytes() for w in windows}) == len(windows)
    files = gpt_text.stdlib_files()
    held_out = [f for f in files if gpt_text.is_held_out(f)]
    assert 0.02 < len(held_out) / len(files) < 0.1


def test_gpt_text_validation_windows_are_held_out_and_share_no_byte_with_the_evaluation_windows():
    with np.load(gpt_text.VALIDATION) as data:
        frozen = {name: data[name] for name in data.files}
    windows, files, starts = frozen["windows"], frozen["files"], frozen["starts"]
    assert windows.shape == (gpt_text.VALIDATION_WINDOWS, 128) and windows.dtype == np.uint8
    # unseen by training: every window lies in a held-out file (training reads only the others)
    assert all(gpt_text.is_held_out(str(f)) for f in files)
    evaluation = {}
    for f, s in zip(frozen["evaluation_files"], frozen["evaluation_starts"]):
        evaluation.setdefault(str(f), []).append(int(s))
    assert sum(map(len, evaluation.values())) == len(gpt_text.held_out_windows())
    spans: dict[str, list[int]] = {}
    for f, s in zip(files, starts):
        spans.setdefault(str(f), []).append(int(s))
    for f, own in spans.items():  # no byte in two windows: starts at least a window apart
        every = sorted(own + evaluation.get(f, []))
        assert all(b - a >= 128 for a, b in zip(every, every[1:])), f
    assert not {w.tobytes() for w in windows} & {w.astype(np.uint8).tobytes() for w in gpt_text.held_out_windows()}
    if str(frozen["python"]) == sys.version.split()[0]:  # the stdlib that made them: the recorded places hold them
        root = gpt_text.stdlib_root()
        for window, f, s in list(zip(windows, files, starts))[::97]:
            assert (root / str(f)).read_bytes()[s : s + 128] == window.tobytes()
        for window, f, s in zip(gpt_text.held_out_windows(), frozen["evaluation_files"], frozen["evaluation_starts"]):
            assert (root / str(f)).read_bytes()[s : s + 128] == window.astype(np.uint8).tobytes()


def test_gpt_text_calibration_draws_distinct_validation_windows():
    feeds = gpt_text.calibration_inputs(64, seed=1)
    assert all(f["input_ids"].shape == (1, 128) and f["input_ids"].dtype == np.int64 for f in feeds)
    pool = {w.tobytes() for w in gpt_text.validation_windows()}
    drawn = [f["input_ids"][0].tobytes() for f in feeds]
    assert set(drawn) <= pool and len(set(drawn)) == 64
    assert len(gpt_text.calibration_inputs(gpt_text.VALIDATION_WINDOWS)) == gpt_text.VALIDATION_WINDOWS
    with pytest.raises(EffcError, match="2048 validation windows to calibrate on; asked for 2049"):
        gpt_text.calibration_inputs(gpt_text.VALIDATION_WINDOWS + 1)


def test_gpt_text_onnx_perplexity_matches_torch_and_is_good():
    module, _ = gpt_text.torch_model()
    metric, onnx_ppl = gpt_text.evaluate(OrtRunner(cached_model_path("gpt-text")))
    _, torch_ppl = gpt_text.evaluate(torch_runner(module, "input_ids"))
    assert metric == "perplexity"
    # Agreement to 3 significant digits, as a relative bound (rounding both can split at a .5).
    assert onnx_ppl == pytest.approx(torch_ppl, rel=5e-4)
    assert 1.0 < onnx_ppl < GPT_TEXT_MAX_PERPLEXITY
    feeds = gpt_text.sample_inputs(2, seed=0)
    assert torch_vs_ort(gpt_text, "gpt-text", "input_ids", feeds).max_rel <= EXPORT_MAX_REL


def test_gpt_text_next_byte_nll_scores_127_predictions():
    ids = np.arange(128, dtype=np.int64)[None]
    uniform = np.zeros((1, 128, 256), dtype=np.float32)
    nll, count = gpt_text.next_byte_nll(uniform, ids)
    assert count == 127 and nll == pytest.approx(127 * np.log(256))
    certain = np.full((1, 128, 256), -1e4, dtype=np.float32)
    certain[0, np.arange(127), ids[0, 1:]] = 0.0
    assert gpt_text.next_byte_nll(certain, ids)[0] == pytest.approx(0.0, abs=1e-6)


# ---- deit-tiny-repbn -------------------------------------------------------------------------

def test_deit_repbn_exports_batchnorms_with_non_trivial_statistics():
    model = load(cached_model_path("deit-tiny-repbn"))
    assert op_counts(model).get("BatchNormalization") == 25  # 2 per block x 12 + the final norm
    module, _ = deit_tiny_repbn.torch_model()
    bn = module.blocks[3].norm2.bn
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert module.norm.alpha.item() != 1.0


def test_deit_repbn_onnx_agrees_with_torch():
    metric, cosine = deit_tiny_repbn.evaluate(OrtRunner(cached_model_path("deit-tiny-repbn")))
    assert metric == "output-cosine" and cosine > 0.99999
    feeds = deit_tiny_repbn.sample_inputs(2, seed=5)
    assert torch_vs_ort(deit_tiny_repbn, "deit-tiny-repbn", "pixel_values", feeds).max_rel <= EXPORT_MAX_REL


def test_deit_repbn_build_is_deterministic_and_keeps_the_callers_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, _ = deit_tiny_repbn.torch_model()
    assert torch.rand(1) == before
    second, _ = deit_tiny_repbn.torch_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
