"""OnnxDecoder: greedy generation with ONNX Runtime over an `to_onnx` export directory.

Per token:  prologue (tokens -> experts, gates)
            -> sgmm_switch_ on the switched-weight buffers (exact mode: W = W0 + delta_t)
            -> step (tokens, input_pos, KV cache, switched weights -> logits, new KV cache)

Every buffer is a torch tensor owned here and bound to the sessions through IO binding by
pointer: the prologue writes experts/gates straight into the tensors the switch reads, the
switch rewrites the weight buffers the step reads, and the KV cache ping-pongs between two
bound sets (present of step t is past of step t+1), so nothing is copied per token. The next
token is chosen by argmax on the device and written into the bound token buffer.

On CPU (CPUExecutionProvider, the reference switch) this is what the tests run. On GPU
(device="cuda") the same bindings point at CUDA tensors, the CUDA execution provider runs on
torch's current stream (`user_compute_stream`), and the switch is the project's SGMM kernel
on that stream, so switch and step are ordered without a host sync. The GPU path is written
but has NOT been run (no GPU was available when it was written).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..cutlass_kernels.ops import sgmm_switch_
from .families import ExportError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _onnx_type(dtype: torch.dtype) -> int:
    import onnx

    return {
        torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
        torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.int64: onnx.TensorProto.INT64,
        torch.bool: onnx.TensorProto.BOOL,
    }[dtype]


def load_decode_buffers(decoder, manifest: dict, dtype: torch.dtype) -> None:
    """The buffers every exported-model decoder (ONNX Runtime, TensorRT) binds once and reuses:
    switch factors and pristine W0, the switched weights, expert/gate buffers, two KV cache sets,
    and the token/position/logits I/O. Sets them as attributes of `decoder`."""
    from safetensors.torch import load_file

    dev = decoder.device
    blobs = load_file(str(decoder.dir / manifest["adapters"]), device=str(dev))
    decoder.names = manifest["switched"]
    decoder.lora_A = [blobs[f"{n}.lora_A"] for n in decoder.names]
    decoder.lora_B = [blobs[f"{n}.lora_B"] for n in decoder.names]
    decoder.pristine = [blobs[f"{n}.pristine"] for n in decoder.names]
    decoder.weights = [w.clone() for w in decoder.pristine]
    k = manifest["top_k"]
    decoder.experts = torch.zeros(k, dtype=torch.int64, device=dev)
    decoder.gates = torch.zeros(k, dtype=torch.float32, device=dev)
    decoder.prev_experts = torch.zeros(k, dtype=torch.int64, device=dev)
    decoder.prev_gates = torch.zeros(k, dtype=torch.float32, device=dev)
    spec = manifest["spec"]
    decoder.num_layers, decoder.capacity, decoder.vocab = spec["num_layers"], manifest["capacity"], spec["vocab_size"]
    shape = (1, spec["num_kv_heads"], decoder.capacity, spec["head_dim"])
    decoder.caches = [[torch.zeros(shape, dtype=dtype, device=dev) for _ in range(2 * decoder.num_layers)]
                      for _ in range(2)]
    decoder.tokens = torch.zeros(1, 1, dtype=torch.int64, device=dev)
    decoder.pos = torch.zeros(1, dtype=torch.int64, device=dev)
    decoder.logits = torch.zeros(1, decoder.vocab, dtype=dtype, device=dev)


def _require_cuda_provider(ort) -> None:
    """device="cuda" binds CUDA pointers: refuse up front where that cannot work. A CPU-only onnxruntime
    would otherwise fall back to the CPU provider with a warning and then be handed device pointers."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ExportError(
            f"OnnxDecoder(device='cuda') needs ONNX Runtime's CUDAExecutionProvider, but onnxruntime "
            f"{ort.__version__} offers only {available} (a CPU-only build): the IO binding of CUDA buffers cannot "
            f"run. Install onnxruntime-gpu (in place of onnxruntime), or decode with device='cpu'")
    if not torch.cuda.is_available():
        raise ExportError("OnnxDecoder(device='cuda'): torch sees no CUDA device, so there are no CUDA buffers to "
                          "bind; decode with device='cpu'")


class OnnxDecoder:
    """Loads an export directory into two ONNX Runtime sessions and decodes greedily (batch 1)."""

    def __init__(self, export_dir: str | Path, *, device: str | torch.device = "cpu", switch_impl: str | None = None,
                 session_options=None, intra_op_threads: int | None = None):
        import onnxruntime as ort

        self.dir = Path(export_dir)
        if not (self.dir / "manifest.json").is_file():
            raise ExportError(f"{self.dir} holds no manifest.json: not a finished export (to_onnx writes it last, "
                              "after its checks); export again")
        self.manifest = m = json.loads((self.dir / "manifest.json").read_text())
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ExportError(f"OnnxDecoder runs on cpu or cuda, got {self.device}")
        cuda = self.device.type == "cuda"
        if cuda:
            _require_cuda_provider(ort)
        self.switch_impl = switch_impl or ("auto" if cuda else "reference")
        self.dtype = _DTYPES[m["spec"]["dtype"]]
        opts = session_options or ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        if cuda:
            dev_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", dev_id)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers = [("CUDAExecutionProvider", {"device_id": dev_id, "user_compute_stream": str(stream)})]
            self._ort_dev = ("cuda", dev_id)
        else:
            providers = ["CPUExecutionProvider"]
            self._ort_dev = ("cpu", 0)
        self.prologue = ort.InferenceSession(str(self.dir / m["prologue"]["file"]), opts, providers=providers)
        self.step_session = ort.InferenceSession(str(self.dir / m["step"]["file"]), opts, providers=providers)

        # Switch state: factors, pristine W0, the switched weight buffers, previous experts/gates.
        load_decode_buffers(self, m, self.dtype)
        self._bind()
        self.position = 0

    # -- IO binding: every buffer bound once, by pointer ---------------------------------------------
    def _bind_in(self, binding, name: str, t: Tensor) -> None:
        binding.bind_input(name, *self._ort_dev, _onnx_type(t.dtype), list(t.shape), t.data_ptr())

    def _bind_out(self, binding, name: str, t: Tensor) -> None:
        binding.bind_output(name, *self._ort_dev, _onnx_type(t.dtype), list(t.shape), t.data_ptr())

    def _bind(self) -> None:
        m = self.manifest
        self.prologue_binding = self.prologue.io_binding()
        self._bind_in(self.prologue_binding, "tokens", self.tokens)
        self._bind_out(self.prologue_binding, "experts", self.experts)
        self._bind_out(self.prologue_binding, "gates", self.gates)
        in_names, out_names = m["step"]["inputs"], m["step"]["outputs"]
        n_cache = 2 * self.num_layers
        self.step_bindings = []
        for parity in range(2):  # step t reads caches[t % 2] and writes caches[(t + 1) % 2]
            b = self.step_session.io_binding()
            past, present = self.caches[parity], self.caches[1 - parity]
            for name, t in zip(in_names, [self.tokens, self.pos, *past, *self.weights]):
                self._bind_in(b, name, t)
            for name, t in zip(out_names, [self.logits, *present]):
                self._bind_out(b, name, t)
            self.step_bindings.append(b)
        assert len(in_names) == 2 + n_cache + len(self.weights)

    # -- decoding ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        for c in self.caches[0]:
            c.zero_()
        self.prev_gates.zero_()
        self.position = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def route(self) -> None:
        """Prologue on the token in `self.tokens`: writes self.experts / self.gates."""
        self.prologue.run_with_iobinding(self.prologue_binding)

    def switch(self) -> None:
        """Switch every weight buffer to this token's experts (exact mode, from the pristine W0)."""
        sgmm_switch_(self.weights, self.lora_A, self.lora_B, self.experts, self.gates, self.prev_experts,
                     self.prev_gates, self.manifest["scaling"], pristine=self.pristine, impl=self.switch_impl)

    def step(self) -> Tensor:
        """prologue -> switch -> step for the token in `self.tokens` at `self.position`; returns the logits buffer."""
        if self.position >= self.capacity:
            raise ExportError(f"the KV cache is full ({self.capacity} positions, the exported capacity)")
        self.pos.fill_(self.position)
        self.route()
        self.switch()  # on GPU: same stream as both sessions (user_compute_stream), so ordered without a sync
        self.step_session.run_with_iobinding(self.step_bindings[self.position % 2])
        self.position += 1
        return self.logits

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int) -> tuple[Tensor, Tensor]:
        """Greedy: feed the prompt token by token (per-token routing, as in the model's prefill), then decode.

        Returns (tokens [max_new_tokens] int64, logits [max_new_tokens, V]) on the CPU: the logits each
        new token was chosen from, as greedy_decode returns them.
        """
        prompt = torch.as_tensor(prompt, dtype=torch.int64).reshape(-1)
        if prompt.numel() == 0:
            raise ValueError("the prompt is empty")
        if prompt.numel() + max_new_tokens - 1 > self.capacity:
            raise ExportError(
                f"prompt ({prompt.numel()}) + new tokens ({max_new_tokens}) exceed the exported KV capacity "
                f"({self.capacity}); export with a larger capacity")
        self.reset()
        prompt = prompt.to(self.device)
        for t in prompt:
            self.tokens.copy_(t.reshape(1, 1))
            self.step()
        out_tokens = torch.empty(max_new_tokens, dtype=torch.int64, device=self.device)
        out_logits = torch.empty(max_new_tokens, self.vocab, dtype=self.dtype, device=self.device)
        for i in range(max_new_tokens):
            out_logits[i].copy_(self.logits[0])
            nxt = self.logits.argmax(-1)
            out_tokens[i] = nxt[0]
            if i + 1 == max_new_tokens:
                break
            self.tokens.copy_(nxt.reshape(1, 1))
            self.step()
        self._sync()
        return out_tokens.cpu(), out_logits.cpu()


__all__ = ["OnnxDecoder"]
