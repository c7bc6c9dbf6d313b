"""JIT build of the sm_90a SGMM extension (sgmm_sm90.cu + a small torch binding).

Headers come from the `nvidia-cutlass` wheel (cutlass_library/source/include and
tools/util/include) or from $CUTLASS_PATH (a CUTLASS checkout). Every grouped-GEMM variant x
dtype is its own translation unit (a two-line wrapper that includes sgmm_sm90.cu with
defines), so ninja builds them in parallel; about 35 s of nvcc per unit. Builds land in
$ADAFUSE_CACHE or ~/.cache/adafuse_compile and are reused across processes.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
CU_SOURCE = _HERE / "sgmm_sm90.cu"
NUM_VARIANTS = 33  # ADAFUSE_SGMM_NUM_VARIANTS in sgmm_sm90.cu
GATHER_VARIANTS = range(23, 27)  # ADAFUSE_SGMM_IS_GATHER: the experts gathered in the GEMM
REDUCE_VARIANTS = range(27, 30)  # ADAFUSE_SGMM_IS_REDUCE: in place only, W += D by TMA reduce-add
UNSCALED_PROBE_VARIANT = 26  # ADAFUSE_SGMM_UNSCALED_PROBE_VARIANT: a timing probe, wrong results
# Variants compiled into every build of the extension (one build serves every request for a
# subset): the candidates a plan times (cutlass_sgmm.GEMM_CANDIDATES: 1, 14, 17) and the previous
# default (3). The other measured variants, the gathering ones (23-25) among them, are built only
# when asked for (benchmarks/bench_sgmm.py asks for all), so they do not slow down the first use.
BUILD_VARIANTS = (1, 3, 14, 17)
DTYPE_CODES = {"bf16": 0, "fp16": 1}

_loaded: dict[tuple[int, ...], ModuleType] = {}
_failed: dict[tuple[int, ...], str] = {}

# The torch-facing binding (host compiler). Declarations mirror sgmm_sm90.cu.
_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <memory>
#include <string>

namespace adafuse_sgmm {
struct PlanBase {
  virtual ~PlanBase() {}
  virtual int run(cudaStream_t stream) = 0;
  virtual size_t workspace_bytes() const = 0;
};
struct GatherArgs {
  const void* slot_table;
  int rank;
  int n_experts;
};
PlanBase* create_plan(int dtype, int variant, int groups, const int* mnk, const int64_t* p_lhs,
                      const int64_t* p_rhs, const int64_t* p_c, const int64_t* p_d,
                      int sm_count, int raster, int swizzle, const GatherArgs* gather,
                      std::string* err);
bool is_gather_variant(int v);
int launch_slots(const int64_t* experts, const float* gates, int64_t* prev_experts,
                 float* prev_gates, void* table, int k, int inplace, float scaling,
                 cudaStream_t stream);
int pack_blocks_per_sm(int dtype);
int launch_pack(int dtype, const int64_t* desc, const int* work, int blocks,
                const int64_t* experts, const float* gates, int64_t* prev_experts,
                float* prev_gates, unsigned int* counter, int k, int r, int inplace,
                float scaling, cudaStream_t stream);
int num_variants();
const char* variant_name(int v);
}  // namespace adafuse_sgmm

struct Plan {
  std::unique_ptr<adafuse_sgmm::PlanBase> impl;
  void run() {
    int rc = impl->run(c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(rc == 0, "SGMM grouped GEMM launch failed (code ", rc, ")");
  }
  int64_t workspace_bytes() const { return static_cast<int64_t>(impl->workspace_bytes()); }
};

// slot_table: for the gather variants, a CUDA tensor of at least 64 bytes (the SlotTable), whose
// address the plan keeps; ptrs' first two rows then hold the stacked B and A of each weight.
static Plan create_plan(int64_t dtype, int64_t variant, torch::Tensor mnk, torch::Tensor ptrs,
                        int64_t sm_count, int64_t raster, int64_t swizzle,
                        c10::optional<torch::Tensor> slot_table, int64_t rank, int64_t n_experts) {
  TORCH_CHECK(mnk.device().is_cpu() && mnk.dtype() == torch::kInt32 && mnk.dim() == 2 &&
              mnk.size(1) == 3 && mnk.is_contiguous(), "mnk: CPU int32 [G, 3]");
  int64_t G = mnk.size(0);
  TORCH_CHECK(ptrs.device().is_cpu() && ptrs.dtype() == torch::kInt64 && ptrs.dim() == 2 &&
              ptrs.size(0) == 4 && ptrs.size(1) == G && ptrs.is_contiguous(),
              "ptrs: CPU int64 [4, G]");
  const int64_t* p = ptrs.data_ptr<int64_t>();
  adafuse_sgmm::GatherArgs gather{nullptr, static_cast<int>(rank), static_cast<int>(n_experts)};
  const bool gathers = adafuse_sgmm::is_gather_variant(static_cast<int>(variant));
  if (gathers) {
    TORCH_CHECK(slot_table.has_value() && slot_table->is_cuda() && slot_table->is_contiguous() &&
                slot_table->nbytes() >= 64, "SGMM gather plan: slot_table must be a contiguous "
                "CUDA tensor of at least 64 bytes");
    gather.slot_table = slot_table->data_ptr();
  }
  std::string err;
  adafuse_sgmm::PlanBase* raw = adafuse_sgmm::create_plan(
      static_cast<int>(dtype), static_cast<int>(variant), static_cast<int>(G),
      mnk.data_ptr<int>(), p, p + G, p + 2 * G, p + 3 * G, static_cast<int>(sm_count),
      static_cast<int>(raster), static_cast<int>(swizzle), gathers ? &gather : nullptr, &err);
  TORCH_CHECK(raw != nullptr, "SGMM plan: ", err);
  Plan plan;
  plan.impl.reset(raw);
  return plan;
}

static void pack(int64_t dtype, torch::Tensor desc, torch::Tensor work, torch::Tensor experts,
                 torch::Tensor gates, torch::Tensor prev_experts, torch::Tensor prev_gates,
                 torch::Tensor counter, int64_t k, int64_t r, bool inplace, double scaling) {
  TORCH_CHECK(work.is_cuda() && work.scalar_type() == torch::kInt32 && work.dim() == 2 &&
              work.size(1) == 3 && work.is_contiguous() && work.device() == desc.device(),
              "pack: work must be a contiguous int32 [blocks, 3] tensor on the descriptors' device");
  int rc = adafuse_sgmm::launch_pack(
      static_cast<int>(dtype), desc.data_ptr<int64_t>(), work.data_ptr<int>(),
      static_cast<int>(work.size(0)), experts.data_ptr<int64_t>(), gates.data_ptr<float>(),
      prev_experts.data_ptr<int64_t>(), prev_gates.data_ptr<float>(),
      reinterpret_cast<unsigned int*>(counter.data_ptr<int>()), static_cast<int>(k),
      static_cast<int>(r), inplace ? 1 : 0, static_cast<float>(scaling),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc == 0, "SGMM pack launch failed: ", cudaGetErrorString((cudaError_t)rc));
}

static void slots(torch::Tensor experts, torch::Tensor gates, torch::Tensor prev_experts,
                  torch::Tensor prev_gates, torch::Tensor table, int64_t k, bool inplace,
                  double scaling) {
  TORCH_CHECK(table.is_cuda() && table.nbytes() >= 64 && table.device() == experts.device(),
              "slots: the slot table must be a CUDA tensor of at least 64 bytes on the experts' device");
  int rc = adafuse_sgmm::launch_slots(
      experts.data_ptr<int64_t>(), gates.data_ptr<float>(), prev_experts.data_ptr<int64_t>(),
      prev_gates.data_ptr<float>(), table.data_ptr(), static_cast<int>(k), inplace ? 1 : 0,
      static_cast<float>(scaling), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc == 0, "SGMM slot-table launch failed: ", cudaGetErrorString((cudaError_t)rc));
}

static std::vector<std::string> variant_names() {
  std::vector<std::string> out;
  for (int i = 0; i < adafuse_sgmm::num_variants(); ++i) out.push_back(adafuse_sgmm::variant_name(i));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // module_local: a process may load two builds of this extension (a plan asking for variants the
  // first build lacks, e.g. the gather ones), and both define this C++ type.
  pybind11::class_<Plan>(m, "Plan", pybind11::module_local())
      .def("run", &Plan::run)
      .def("workspace_bytes", &Plan::workspace_bytes);
  m.def("create_plan", &create_plan, pybind11::arg("dtype"), pybind11::arg("variant"),
        pybind11::arg("mnk"), pybind11::arg("ptrs"), pybind11::arg("sm_count"),
        pybind11::arg("raster"), pybind11::arg("swizzle"),
        pybind11::arg("slot_table") = pybind11::none(), pybind11::arg("rank") = 0,
        pybind11::arg("n_experts") = 0);
  m.def("pack", &pack);
  m.def("slots", &slots);
  m.def("pack_blocks_per_sm", [](int64_t dtype) {
    int n = adafuse_sgmm::pack_blocks_per_sm(static_cast<int>(dtype));
    TORCH_CHECK(n > 0, "SGMM pack occupancy query failed (code ", -n, ")");
    return n;
  });
  m.def("variant_names", &variant_names);
}
"""


def cache_dir() -> Path:
    root = os.environ.get("ADAFUSE_CACHE") or os.path.join(Path.home(), ".cache", "adafuse_compile")
    return Path(root)


def cutlass_include_dirs() -> list[Path] | None:
    """[include, tools/util/include] of CUTLASS ($CUTLASS_PATH first, then the pip wheel)."""
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(Path(os.environ["CUTLASS_PATH"]))
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(list(spec.submodule_search_locations)[0]) / "source")
    for root in roots:
        dirs = [root / "include", root / "tools" / "util" / "include"]
        if (dirs[0] / "cutlass" / "cutlass.h").exists() and \
                (dirs[1] / "cutlass" / "util" / "packed_stride.hpp").exists():
            return dirs
    return None


def nvcc_flags(include_dirs: list[Path]) -> list[str]:
    return [
        "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
        "-gencode=arch=compute_90a,code=sm_90a",  # wgmma / setmaxnreg need the 'a' target
        *[f"-I{d}" for d in include_dirs],
    ]


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


_NAME_PREFIX = "adafuse_sgmm_sm90_v"


def _built_superset(want: set[int]) -> tuple[int, ...] | None:
    """The smallest extension already built in the cache that holds every wanted variant, if any.

    A process that asks for (23,) after another built (1, 3, 14, 17, 23, 30) loads that one instead
    of spending another minute of nvcc on a build of its own (torch's loader still rebuilds it if its
    sources changed since).
    """
    best = None
    try:
        dirs = list(cache_dir().glob(_NAME_PREFIX + "*"))
    except OSError:
        return None
    for d in dirs:
        try:
            have = tuple(int(v) for v in d.name[len(_NAME_PREFIX):].split("_"))
        except ValueError:
            continue
        if want <= set(have) and any(d.glob("*.so")) and (best is None or len(have) < len(best)):
            best = have
    return best


def load_extension(variants: tuple[int, ...] | None = None) -> ModuleType:
    """Build (first use) or load the extension holding the given GEMM variants, both dtypes."""
    want = set(variants or ())
    for have, mod in _loaded.items():
        if want <= set(have):
            return mod
    variants = _built_superset(want | set(BUILD_VARIANTS)) or tuple(sorted(want | set(BUILD_VARIANTS)))
    if variants in _failed:
        raise RuntimeError(_failed[variants])
    incs = cutlass_include_dirs()
    if incs is None:
        raise RuntimeError("CUTLASS headers not found: pip install nvidia-cutlass (or set CUTLASS_PATH)")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise RuntimeError("nvcc not found: the SGMM CUTLASS kernels are JIT-built with nvcc")
    from torch.utils.cpp_extension import load

    name = _NAME_PREFIX + "_".join(str(v) for v in variants)  # (1, 2) is not (12,)
    build_dir = cache_dir() / name
    sources = [CU_SOURCE, build_dir / "binding.cpp"]
    units = {build_dir / f"gemm_{dname}_{v}.cu": (
        "#define ADAFUSE_SGMM_GEMM_TU 1\n"
        f"#define ADAFUSE_SGMM_DTYPE {dcode}\n"
        f"#define ADAFUSE_SGMM_VARIANT {v}\n"
        f'#include "{CU_SOURCE}"\n'
    ) for dname, dcode in DTYPE_CODES.items() for v in variants}
    sources += list(units)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        _write_if_changed(sources[1], _BINDING)
        for tu, text in units.items():
            _write_if_changed(tu, text)
    except OSError as exc:  # remembered like a failed build: auto dispatch falls back to Triton
        _failed[variants] = (f"SGMM CUTLASS build directory {build_dir} not writable ({exc}); "
                             "set ADAFUSE_CACHE to a writable directory")
        raise RuntimeError(_failed[variants]) from exc
    from rich.console import Console

    console = Console(stderr=True)
    try:
        with console.status(
            f"[bold]adafuse: building SGMM CUTLASS kernels ({len(sources) - 2} GEMM units, "
            f"sm_90a) in {build_dir} - first use only, about a minute"
        ):
            mod = load(
                name=name, sources=[str(s) for s in sources], build_directory=str(build_dir),
                extra_cflags=["-O2", "-std=c++17"], extra_cuda_cflags=nvcc_flags(incs),
                extra_include_paths=[str(d) for d in incs], verbose=False,
            )
    except Exception as exc:  # remember the failure: auto dispatch falls back to Triton
        _failed[variants] = f"SGMM CUTLASS build failed: {exc}"
        raise RuntimeError(_failed[variants]) from exc
    _loaded[variants] = mod
    return mod
