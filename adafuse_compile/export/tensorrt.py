"""TensorRT: engines built from the `to_onnx` export, and the engine-independent checks of that export.

Why the TensorRT Python API on the exported ONNX, not torch-tensorrt: the ONNX export is already
the static plain-backbone step with the switched weights as inputs, so the engine consumes exactly
the graph ONNX Runtime verifies on every machine; torch-tensorrt would re-lower the Dynamo graph on
its own path, and converters that fall back to PyTorch would break the "one engine per step"
design. The switched weights are network INPUTS (bound by device pointer every step), not
refittable weights: DESIGN.md section 6 notes that refit with graph-input weights is not possible
and that kREFIT has a known bias-drop problem.

`check_tensorrt_facts(export_dir)` checks, without TensorRT, what its ONNX parser needs: every op
is in TensorRT 10's supported list at the export's opset (with the restrictions that concern
these graphs), and every tensor shape is static. `to_tensorrt(...)` needs `tensorrt`; where it
does not import, it raises TensorRTUnavailableError saying how to install it.

Not run here: no machine available while this was written had TensorRT (it needs an NVIDIA GPU
and CUDA). `to_tensorrt` and `TensorRTDecoder` are written against the TensorRT 10 Python API.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .families import ExportError

INSTALL_HINT = (
    "TensorRT is not installed (import tensorrt failed). On a machine with an NVIDIA GPU and CUDA, "
    "`pip install tensorrt` (NVIDIA's wheels; pick the CUDA major version of your driver, e.g. "
    "`pip install tensorrt-cu12`), then retry. The ONNX export (`adafuse export onnx`) and its ONNX "
    "Runtime decoder do not need TensorRT."
)

# TensorRT 10.0's ONNX parser (onnx-tensorrt, docs/operators.md, "supports operators in the inclusive
# range of opset 9 to opset 20"): the operators marked supported ("Y").
TRT_OPSET_RANGE = (9, 20)
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max
MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Restrictions from the same table that concern graphs like ours: input index -> "must be constant".
_CONSTANT_INPUTS = {"Slice": (3,), "ReduceMean": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "TopK": (1,)}
_TOPK_MAX_K = 3840  # "K input must be less than 3840"; "sorted must be 1"


class TensorRTUnavailableError(ImportError):
    """`tensorrt` does not import here; the message says how to install it."""


@dataclass
class FactsReport:
    opset: int
    ops: dict = field(default_factory=dict)  # op -> count, per graph
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> None:
        if self.problems:
            raise ExportError("the export is not TensorRT-ready:\n  - " + "\n  - ".join(self.problems))


def _graph_facts(model, label: str, report: FactsReport) -> None:
    import onnx
    from onnx import shape_inference

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]:
        report.problems.append(f"{label}: opset {opset} outside TensorRT 10's range {TRT_OPSET_RANGE}")
    report.opset = opset
    inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    g = inferred.graph
    constants = {i.name for i in g.initializer}
    constants |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    counts: dict[str, int] = {}
    for node in g.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.domain not in ("", "ai.onnx"):
            report.problems.append(f"{label}: node {node.name} is in custom domain {node.domain!r}")
            continue
        if node.op_type not in TRT_SUPPORTED_OPS:
            report.problems.append(f"{label}: op {node.op_type} ({node.name}) is not supported by TensorRT's ONNX parser")
        for idx in _CONSTANT_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] and node.input[idx] not in constants:
                report.problems.append(f"{label}: {node.op_type} {node.name} input {idx} must be a constant for TensorRT")
        if node.op_type == "TopK":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("sorted", 1) != 1:
                report.problems.append(f"{label}: TopK {node.name} has sorted=0; TensorRT needs sorted=1")
            k_init = next((i for i in g.initializer if i.name == node.input[1]), None)
            if k_init is not None and int(onnx.numpy_helper.to_array(k_init).reshape(-1)[0]) >= _TOPK_MAX_K:
                report.problems.append(f"{label}: TopK {node.name} K >= {_TOPK_MAX_K}")
    report.ops[label] = counts
    values = list(g.input) + list(g.output) + list(g.value_info)
    for v in values:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            report.problems.append(f"{label}: tensor {v.name} has no inferred shape")
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            report.problems.append(f"{label}: tensor {v.name} has a non-static shape {dims}")


def check_graph_facts(model, label: str = "graph") -> FactsReport:
    """The same facts for one loaded onnx.ModelProto."""
    report = FactsReport(opset=0)
    _graph_facts(model, label, report)
    return report


def check_tensorrt_facts(export_dir: str | Path) -> FactsReport:
    """The engine-independent facts TensorRT's parser relies on, for both exported graphs (no TensorRT needed)."""
    import onnx

    d = Path(export_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    report = FactsReport(opset=manifest["opset"])
    for label in ("prologue", "step"):
        # load_external_data=False: shape inference needs only the graph, not multi-GB weights.
        model = onnx.load(str(d / manifest[label]["file"]), load_external_data=False)
        _graph_facts(model, label, report)
    return report


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(INSTALL_HINT) from exc
    return trt


def to_tensorrt(export_dir: str | Path, out_dir: str | Path | None = None, *, fp16: bool = False,
                bf16: bool = False, workspace_gb: float = 4.0) -> dict:
    """Build TensorRT engines (prologue.engine, step.engine) from a `to_onnx` export directory.

    Checks the engine-independent facts first. The switched weights stay network inputs (static
    shapes, bound by pointer at run time); nothing is refittable. Returns {"prologue": path, "step": path}.
    Raises TensorRTUnavailableError where `tensorrt` does not import.
    """
    trt = _import_tensorrt()
    check_tensorrt_facts(export_dir).raise_if_failed()
    src = Path(export_dir)
    dst = Path(out_dir) if out_dir is not None else src
    dst.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    engines = {}
    for label in ("prologue", "step"):
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch, strongly typed off
        parser = trt.OnnxParser(network, logger)
        onnx_path = src / manifest[label]["file"]
        if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ExportError(f"TensorRT could not parse {onnx_path}:\n" + "\n".join(errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if bf16:
            config.set_flag(trt.BuilderFlag.BF16)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
        path = dst / f"{label}.engine"
        path.write_bytes(bytes(serialized))
        engines[label] = path
    return engines


class TensorRTDecoder:
    """Greedy decode with the two engines: prologue -> SGMM switch -> step, all on one CUDA stream.

    Written against the TensorRT 10 API (set_tensor_address / execute_async_v3); NOT run here (no
    TensorRT). Every tensor is a torch CUDA tensor bound once by address; the KV cache ping-pongs
    between two sets, so nothing is copied per token.
    """

    def __init__(self, export_dir: str | Path, engine_dir: str | Path | None = None, *, device: str = "cuda",
                 switch_impl: str = "auto"):
        trt = _import_tensorrt()
        from .runtime import load_decode_buffers

        self.dir = Path(export_dir)
        engine_dir = Path(engine_dir) if engine_dir is not None else self.dir
        m = self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ExportError("TensorRTDecoder needs a CUDA device")
        self.stream = torch.cuda.current_stream(self.device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {k: runtime.deserialize_cuda_engine((engine_dir / f"{k}.engine").read_bytes())
                        for k in ("prologue", "step")}
        self.contexts = {k: e.create_execution_context() for k, e in self.engines.items()}
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[m["spec"]["dtype"]]
        self.switch_impl = switch_impl
        load_decode_buffers(self, m, dtype)
        self.position = 0
        ctx = self.contexts["prologue"]
        for name, t in (("tokens", self.tokens), ("experts", self.experts), ("gates", self.gates)):
            ctx.set_tensor_address(name, t.data_ptr())
        self._step_tensors = []
        for parity in range(2):
            names = m["step"]["inputs"] + m["step"]["outputs"]
            tensors = [self.tokens, self.pos, *self.caches[parity], *self.weights, self.logits,
                       *self.caches[1 - parity]]
            self._step_tensors.append(list(zip(names, tensors)))

    def step(self) -> torch.Tensor:
        from ..cutlass_kernels.ops import sgmm_switch_

        s = self.stream.cuda_stream
        self.pos.fill_(self.position)
        self.contexts["prologue"].execute_async_v3(s)
        sgmm_switch_(self.weights, self.lora_A, self.lora_B, self.experts, self.gates, self.prev_experts,
                     self.prev_gates, self.manifest["scaling"], pristine=self.pristine, impl=self.switch_impl)
        ctx = self.contexts["step"]
        for name, t in self._step_tensors[self.position % 2]:
            ctx.set_tensor_address(name, t.data_ptr())
        ctx.execute_async_v3(s)
        self.position += 1
        return self.logits

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        prompt = torch.as_tensor(prompt, dtype=torch.int64).reshape(-1).to(self.device)
        if prompt.numel() + max_new_tokens - 1 > self.capacity:
            raise ExportError(f"prompt + new tokens exceed the exported KV capacity ({self.capacity})")
        for c in self.caches[0]:
            c.zero_()
        self.position = 0
        for t in prompt:
            self.tokens.copy_(t.reshape(1, 1))
            self.step()
        toks = torch.empty(max_new_tokens, dtype=torch.int64, device=self.device)
        logits = torch.empty(max_new_tokens, self.vocab, dtype=self.logits.dtype, device=self.device)
        for i in range(max_new_tokens):
            logits[i].copy_(self.logits[0])
            nxt = self.logits.argmax(-1)
            toks[i] = nxt[0]
            if i + 1 == max_new_tokens:
                break
            self.tokens.copy_(nxt.reshape(1, 1))
            self.step()
        self.stream.synchronize()
        return toks.cpu(), logits.cpu()


__all__ = ["FactsReport", "INSTALL_HINT", "TRT_SUPPORTED_OPS", "TensorRTDecoder", "TensorRTUnavailableError",
           "check_graph_facts", "check_tensorrt_facts", "to_tensorrt"]
