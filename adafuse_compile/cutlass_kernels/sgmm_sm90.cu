// SGMM for Hopper (sm_90a): one-launch fused adapter switching.
//
// For every adapted weight W_g [out, in] (all layers, all modules):
//     D_g = C_g + L_g @ R_g,  L_g = [out, Kc], R_g = [Kc, in], fp32 accumulation,
// with C_g == D_g == W_g (mode "inplace", beta = 1) or C_g = W0_g (mode "pristine").
// L_g holds the gathered, gate-scaled LoRA B factors (previous experts negated, then the
// current experts), R_g the gathered LoRA A factors, both packed by `sgmm_pack_kernel` into a
// workspace whose addresses never change, so every GEMM argument (pointers, strides,
// problem shapes) is built once and lives on the device: a call is two launches (pack, GEMM),
// no host sync, no host-to-device copy, capturable in a CUDA graph.
//
// The pack kernel's last block also copies the current experts / gates into the "previous"
// buffers (a grid-wide counter decides which block is last), so a graph replay unmerges the
// right experts next time.
//
// The gather variants (23-26, GatherMainloop) read L and R straight from the stacked experts
// instead; their light launch (`sgmm_slots_kernel`) only writes a 64-byte slot table (experts,
// coefficients) and the "previous" buffers. Measured slower than the pack in pristine mode and
// tied in place (docs/kernels.md), so the pack is the default.
//
// This file compiles on its own with nvcc (no torch headers):
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I<cutlass>/include
//        -I<cutlass>/tools/util/include --expt-relaxed-constexpr -c sgmm_sm90.cu
// compiles the pack kernel and the variant registry; adding
//   -DADAFUSE_SGMM_GEMM_TU -DADAFUSE_SGMM_DTYPE=0 -DADAFUSE_SGMM_VARIANT=0
// compiles one grouped-GEMM instantiation instead (build.py compiles every variant as its own
// translation unit that way, so the JIT build runs them in parallel).

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <string>
#include <vector>

namespace adafuse_sgmm {

// dtype codes shared with Python (cutlass_sgmm.py)
enum DType : int { kBF16 = 0, kFP16 = 1 };

struct PlanBase {
  virtual ~PlanBase() {}
  // Launch the grouped GEMM on `stream`; returns a cudaError_t-like code (0 = success).
  virtual int run(cudaStream_t stream) = 0;
  virtual size_t workspace_bytes() const = 0;
};

// groups problems; mnk_host [groups*3] (M=out, N=in, K=Kc); pointers are device addresses.
// raster: 0 = along M (CUTLASS's default), 1 = along N, 2 = CUTLASS's heuristic; swizzle: the
// tile scheduler's max_swizzle_size (1, 2, 4, 8).
// Gather variants: ptr_lhs / ptr_rhs are the stacked B [N, out, r] / A [N, r, in] of each weight
// and `gather` names the slot table, r and N; the packed variants take gather == nullptr.
struct GatherArgs {
  const void* slot_table;  // SlotTable on the device
  int rank;
  int n_experts;
};
typedef PlanBase* (*CreatePlanFn)(int groups, const int* mnk_host, const int64_t* ptr_lhs,
                                  const int64_t* ptr_rhs, const int64_t* ptr_c,
                                  const int64_t* ptr_d, int sm_count, int raster, int swizzle,
                                  const GatherArgs* gather, std::string* err);

// Variant table: (id, name, kernel schedule, epilogue schedule, tile M, N, K, cluster M, N,
// epilogue tile M, N (0, 0 = CUTLASS's automatic choice), epilogue C stages (0 = CUTLASS's
// choice)); 13-22 also override the epilogue policy (EpilogueOverride below). Ids must run 0, 1,
// 2, ... in order (checked below); cutlass_sgmm.py's GEMM_CANDIDATES and build.py's NUM_VARIANTS
// and BUILD_VARIANTS refer to them. Every variant was measured on the H200 (docs/kernels.md):
// 0-12 by benchmarks/bench_sgmm.py (sgmm_h200*.json), 13-22 by benchmarks/probe_sgmm_gemm.py.
//
// 0-4: q,v switch at 61% (inplace, K = 256) and 78% (pristine, K = 128) of copy bandwidth. At
// this K the C-load / D-store epilogue is as heavy as the main loop.
// 5-12 try to overlap one tile's epilogue with the next tile's main loop, or to keep more C in
// flight; none beat 1 / 3 by more than noise:
// - pingpong (5-9): the two consumer warp groups take alternate 64-row tiles, so one group's
//   epilogue runs during the other's MMA. 5: automatic 64x32 epilogue tile; 6-9: 64x128.
// - cooperative 128x256 / 256x128 (10, 11): fewer L/R tile loads per byte of W.
// - more C stages (9, 12): 12 has 96 KB of C in shared memory, 9 has 64 KB.
// 13-22 give D shared memory of its own (the builder lets D reuse C's buffers, so a buffer takes
// the next C only after the D store out of it): 14 and 17 are the candidates a plan times.
// 23-25 are 14, 17 and 1 with the experts gathered inside the GEMM instead of packed by a
// separate launch (GatherMainloop): L and R are read straight from the stacked expert tensors
// B [N, out, r] and A [N, r, in], which needs r % 64 == 0 (one k-block never spans two experts).
// 27-29 (in place only) read no C and store D with a TMA reduce-add into W, so no epilogue waits
// for a C load: measured slower than 14 (q,v GEMM alone 1.73-1.85 against 1.44 ms, probe run 11).
// 30, 31 (not yet measured): pingpong with 14's whole 128x128 tile per consumer warp group (one
// 128x128 fp32 accumulator, 128 registers a thread), so one group's epilogue runs while the other
// group's K = 256 main loop does, at 14's L/R traffic per byte of W. The pingpong tiles measured
// before were half height (5-9, 18: twice the factor loads per byte of W) or had the automatic
// 64x32 epilogue tile (runs 1-2). 30: 14's epilogue bytes (4 C, 2 D stages of 16 KB; a pingpong
// epilogue subtile is 64 rows high, so 64x128); 31: 2 C stages, leaving the main loop more;
// 32: 30 in 2x1 clusters (the two CTAs share their R tile by TMA multicast: less L2 traffic; the
// cluster took pingpong 64x128 from 2.25 to 1.95 ms in place, run 4). Pack only: the gather loops keep a second accumulator, which a
// 128x128 tile per warp group has no registers for.
#define ADAFUSE_SGMM_VARIANTS(X)                                                            \
  X(0, coop_128x128x64, KernelPtrArrayTmaWarpSpecializedCooperative,                        \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 0, 0, 0)                     \
  X(1, coop_128x128x64_e128x64, KernelPtrArrayTmaWarpSpecializedCooperative,                \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 0)                  \
  X(2, coop_128x128x64_e128x64_c2x1, KernelPtrArrayTmaWarpSpecializedCooperative,           \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 2, 1, 128, 64, 0)                  \
  X(3, coop_128x128x64_e128x128, KernelPtrArrayTmaWarpSpecializedCooperative,               \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 128, 0)                 \
  X(4, coop_128x128x64_e128x128_c2x1, KernelPtrArrayTmaWarpSpecializedCooperative,          \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 2, 1, 128, 128, 0)                 \
  X(5, pingpong_64x128x64, KernelPtrArrayTmaWarpSpecializedPingpong,                        \
    PtrArrayTmaWarpSpecializedPingpong, 64, 128, 64, 1, 1, 0, 0, 0)                         \
  X(6, pingpong_64x128x64_e64x128, KernelPtrArrayTmaWarpSpecializedPingpong,                \
    PtrArrayTmaWarpSpecializedPingpong, 64, 128, 64, 1, 1, 64, 128, 0)                      \
  X(7, pingpong_64x128x64_e64x128_c2x1, KernelPtrArrayTmaWarpSpecializedPingpong,           \
    PtrArrayTmaWarpSpecializedPingpong, 64, 128, 64, 2, 1, 64, 128, 0)                      \
  X(8, pingpong_64x256x64_e64x128, KernelPtrArrayTmaWarpSpecializedPingpong,                \
    PtrArrayTmaWarpSpecializedPingpong, 64, 256, 64, 1, 1, 64, 128, 0)                      \
  X(9, pingpong_64x128x64_e64x128_sc4, KernelPtrArrayTmaWarpSpecializedPingpong,            \
    PtrArrayTmaWarpSpecializedPingpong, 64, 128, 64, 1, 1, 64, 128, 4)                      \
  X(10, coop_128x256x64_e128x64, KernelPtrArrayTmaWarpSpecializedCooperative,               \
    PtrArrayTmaWarpSpecializedCooperative, 128, 256, 64, 1, 1, 128, 64, 0)                  \
  X(11, coop_256x128x64_e128x64, KernelPtrArrayTmaWarpSpecializedCooperative,               \
    PtrArrayTmaWarpSpecializedCooperative, 256, 128, 64, 1, 1, 128, 64, 0)                  \
  X(12, coop_128x128x64_e128x128_sc3, KernelPtrArrayTmaWarpSpecializedCooperative,          \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 128, 3)              \
  X(13, coop_128x128x64_e128x128_sepd, KernelPtrArrayTmaWarpSpecializedCooperative,         \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 128, 2)                 \
  X(14, coop_128x128x64_e128x64_sepd2, KernelPtrArrayTmaWarpSpecializedCooperative,         \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 4)                  \
  X(15, coop_128x128x64_e128x64_sepd2_delay, KernelPtrArrayTmaWarpSpecializedCooperative,   \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 4)                  \
  X(16, coop_128x128x64_e128x64_sepd2_sc6, KernelPtrArrayTmaWarpSpecializedCooperative,     \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 6)                  \
  X(17, coop_128x128x64_e128x128_sepd2, KernelPtrArrayTmaWarpSpecializedCooperative,        \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 128, 2)                 \
  X(18, pingpong_64x256x64_e64x128_sepd2, KernelPtrArrayTmaWarpSpecializedPingpong,         \
    PtrArrayTmaWarpSpecializedPingpong, 64, 256, 64, 1, 1, 64, 128, 4)                      \
  X(19, coop_128x128x64_e128x64_sepd2_sc8, KernelPtrArrayTmaWarpSpecializedCooperative,     \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 8)                  \
  X(20, coop_128x128x64_e128x32_sepd4_sc8, KernelPtrArrayTmaWarpSpecializedCooperative,     \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 32, 8)                  \
  X(21, coop_128x128x64_e128x64_sepd2_c1x2, KernelPtrArrayTmaWarpSpecializedCooperative,    \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 2, 128, 64, 4)                  \
  X(22, coop_128x128x64_e128x128_sepd2_c1x2, KernelPtrArrayTmaWarpSpecializedCooperative,   \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 2, 128, 128, 2)                 \
  X(23, gather_coop_128x128x64_e128x64_sepd2, KernelPtrArrayTmaWarpSpecializedCooperative,  \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 4)                  \
  X(24, gather_coop_128x128x64_e128x128_sepd2, KernelPtrArrayTmaWarpSpecializedCooperative, \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 128, 2)                 \
  X(25, gather_coop_128x128x64_e128x64, KernelPtrArrayTmaWarpSpecializedCooperative,        \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 0)                  \
  X(26, gather_coop_128x128x64_e128x64_sepd2_unscaled, KernelPtrArrayTmaWarpSpecializedCooperative, \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 4)                  \
  X(27, reduce_coop_128x128x64_e128x64, KernelPtrArrayTmaWarpSpecializedCooperative,         \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 64, 0)                  \
  X(28, reduce_coop_128x128x64_e128x128, KernelPtrArrayTmaWarpSpecializedCooperative,        \
    PtrArrayTmaWarpSpecializedCooperative, 128, 128, 64, 1, 1, 128, 128, 0)                 \
  X(29, reduce_coop_128x256x64_e128x64, KernelPtrArrayTmaWarpSpecializedCooperative,         \
    PtrArrayTmaWarpSpecializedCooperative, 128, 256, 64, 1, 1, 128, 64, 0)                  \
  X(30, pingpong_128x128x64_e64x128_sepd2, KernelPtrArrayTmaWarpSpecializedPingpong,        \
    PtrArrayTmaWarpSpecializedPingpong, 128, 128, 64, 1, 1, 64, 128, 4)                     \
  X(31, pingpong_128x128x64_e64x128_sepd2_sc2, KernelPtrArrayTmaWarpSpecializedPingpong,    \
    PtrArrayTmaWarpSpecializedPingpong, 128, 128, 64, 1, 1, 64, 128, 2)                     \
  X(32, pingpong_128x128x64_e64x128_sepd2_c2x1, KernelPtrArrayTmaWarpSpecializedPingpong,   \
    PtrArrayTmaWarpSpecializedPingpong, 128, 128, 64, 2, 1, 64, 128, 4)

#define ADAFUSE_SGMM_NUM_VARIANTS 33
// A timing probe, not a kernel to use: 23 with the slots' coefficients left out (every slot
// accumulated as is, like the packed GEMM's loop), to separate the cost of the per-slot combine
// from that of the gathered loads. Its results are wrong; cutlass_sgmm.py refuses it outside probes.
#define ADAFUSE_SGMM_UNSCALED_PROBE_VARIANT 26
// Variants 23-26 gather the experts inside the GEMM (GatherMainloop below): no pack.
#define ADAFUSE_SGMM_IS_GATHER(ID) ((ID) >= 23 && (ID) <= 26)
// Variants 27-29 are in place only: no C operand, D stored with a TMA reduce-add into W (the L2
// adds delta to W), so the epilogue never waits for a C load (ReduceAddEpilogue below).
#define ADAFUSE_SGMM_IS_REDUCE(ID) ((ID) >= 27 && (ID) <= 29)

// The per-call slot table of the gather variants, written by `sgmm_slots_kernel` into a buffer
// whose address never changes (so the GEMM's arguments stay fixed): for each K slot j (inplace:
// the previous experts, then the current ones; pristine: the current ones), the expert whose
// factors fill it and the coefficient its LoRA B tile is scaled by (+-scaling * gate).
struct SlotTable {
  int32_t expert[8];
  float coef[8];
};

}  // namespace adafuse_sgmm

#ifdef ADAFUSE_SGMM_GEMM_TU
// ---------------------------------------------------------------------------------------------
// One grouped-GEMM instantiation (dtype ADAFUSE_SGMM_DTYPE, variant ADAFUSE_SGMM_VARIANT).
// ---------------------------------------------------------------------------------------------
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace adafuse_sgmm {
using namespace cute;

// Epilogue policy overrides beyond StagesC, per variant id (variants 13-22): D stages, whether D
// reuses C's shared memory (then the next C load into a buffer waits for the D store out of it),
// and whether the TMA store is issued one subtile late. -1 / 0: the builder's choice.
template <int ID> struct EpilogueOverride {
  static constexpr int kStagesD = 0, kReuseSmemC = -1, kDelayTmaStore = -1;
};

// 13: D in its own buffer (C 2 x 32 KB, D 32 KB): a C buffer is refilled without waiting for
//     the D store out of it. 14: the same with 128x64 subtiles, 4 C and 2 D stages.
// 15: 14 with the store issued one subtile late (the builder never delays for ptr-array).
template <> struct EpilogueOverride<13> {
  static constexpr int kStagesD = 1, kReuseSmemC = 0, kDelayTmaStore = 0;
};
template <> struct EpilogueOverride<14> {
  static constexpr int kStagesD = 2, kReuseSmemC = 0, kDelayTmaStore = 0;
};
template <> struct EpilogueOverride<15> {
  static constexpr int kStagesD = 2, kReuseSmemC = 0, kDelayTmaStore = 1;
};
// 16-18: 14's separate D buffers with 6 C stages, with one 128x128 subtile (2 C, 2 D stages),
// and on the pingpong 64x256 tile (variant 8, the fastest inplace tile of run 4).
template <> struct EpilogueOverride<16> : EpilogueOverride<14> {};
template <> struct EpilogueOverride<17> : EpilogueOverride<14> {};
template <> struct EpilogueOverride<18> : EpilogueOverride<14> {};
// 19, 20: more C in flight per SM (128 KB of 128x64 subtiles; 64 KB of 128x32 subtiles with 4 D
// stages), leaving the main loop fewer stages (K <= 256 is at most 4 k-blocks). 21, 22: 14 and 17
// in 1x2 clusters: the two CTAs of a cluster share their L tile (TMA multicast), less L2 traffic.
template <> struct EpilogueOverride<19> : EpilogueOverride<14> {};
template <> struct EpilogueOverride<20> {
  static constexpr int kStagesD = 4, kReuseSmemC = 0, kDelayTmaStore = 0;
};
template <> struct EpilogueOverride<21> : EpilogueOverride<14> {};
template <> struct EpilogueOverride<22> : EpilogueOverride<14> {};
// 30, 31: 14's separate D buffers on the pingpong 128x128 tile.
template <> struct EpilogueOverride<30> : EpilogueOverride<14> {};
template <> struct EpilogueOverride<31> : EpilogueOverride<14> {};
template <> struct EpilogueOverride<32> : EpilogueOverride<14> {};

// The builder's ptr-array main loop (cooperative schedule), changed in three places so that
// L = [c_0 B[e_0] | c_1 B[e_1] | ...] and R = [A[e_0]; A[e_1]; ...] are read straight from the
// stacked experts, no pack launch:
// - the operands are 3-D, (M, r, N experts) and (N, r, N experts), the expert in TMA's third
//   dimension (L strides out * r and r * in), set per group like the base sets M, N, K;
// - the producer loads k-block t from (k = t % (r / TK), expert = slot_expert[t / (r / TK)]):
//   the problem's K is slots * r, so the kernel's k-block counts stay right;
// - the consumer applies each slot's coefficient to its fp32 product (mma below), so L is never
//   rounded after scaling (the pack kernel rounds c * B to 16 bits).
template <class Base, bool kScaleSlots = true>
struct GatherMainloop : Base {
  using typename Base::TileShape;
  using typename Base::TiledMma;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::TensorMapStorage;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  static constexpr int kTileK = size<2>(TileShape{});
  static constexpr int kMmaThreads = size(TiledMma{});
  static_assert(size(typename Base::DispatchPolicy::ClusterShape{}) == 1,
                "gather variants load without multicast (1x1 clusters)");

  struct Arguments : Base::Arguments {
    const SlotTable* slots;
    int rank;
    int n_experts;
  };
  struct Params : Base::Params {
    const SlotTable* slots;
    int rank;
    int n_experts;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args,
                                        void* workspace) {
    return {Base::to_underlying_arguments(problem_shapes, args, workspace), args.slots,
            args.rank, args.n_experts};
  }

  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                Params const& params) const {
    using X = Underscore;
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mA = params.tma_load_a.get_tma_tensor(make_shape(M, params.rank, params.n_experts));
    Tensor mB = params.tma_load_b.get_tma_tensor(make_shape(N, params.rank, params.n_experts));
    Tensor gA = local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{});  // (BM,BK,m,k,e)
    Tensor gB = local_tile(mB, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});  // (BN,BK,n,k,e)
    return cute::make_tuple(gA, gB);
  }

  template <class TensorA, class TensorB, class TensorMapA, class TensorMapB, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline,
                           PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB> const& load_inputs,
                           cute::tuple<TensorMapA, TensorMapB> const& input_tensormaps,
                           BlockCoord const& blk_coord, KTileIterator, int k_tile_count, int,
                           uint32_t, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    auto tma_a = params.tma_load_a.get_slice(0);
    auto tma_b = params.tma_load_b.get_slice(0);
    auto m_coord = get<0>(blk_coord);
    auto n_coord = get<1>(blk_coord);
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m_coord, _, _));  // (TMA,.,.,k,e)
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n_coord, _, _));
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tBsB = tma_b.partition_D(sB);
    const int blocks_per_slot = params.rank / kTileK;
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < k_tile_count; ++t) {
      const int slot = t / blocks_per_slot, kb = t - slot * blocks_per_slot;
      const int expert = params.slots->expert[slot];
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      copy(params.tma_load_a.with(get<0>(input_tensormaps), *barrier, uint16_t(0)),
           tAgA(_, _, _, kb, expert), tAsA(_, _, _, stage));
      copy(params.tma_load_b.with(get<1>(input_tensormaps), *barrier, uint16_t(0)),
           tBgB(_, _, _, kb, expert), tBsB(_, _, _, stage));
      ++smem_pipe_write;
    }
  }

  // The base's consumer loop (one wgmma batch in flight, each stage released once the next
  // batch is issued; the base's mma_tail releases the last), with the slots' coefficients
  // applied to fp32 products: slot 0 accumulates into `accum`, every later slot into `partial`
  // (both batches of slots 0 and 1 in flight at once), then accum = c_0 accum + c_1 partial,
  // accum += c_j partial for j >= 2, each fold after every MMA issued so far is done.
  // Measured on the H200 (q,v, whole switch; docs/kernels.md): scaling the L tile in shared
  // memory instead (a shared-memory pass, a proxy fence and a barrier per k-block) 1.48 ms
  // pristine; this loop 1.32-1.36 pristine, 1.87-1.93 in place; the gathered loads with no
  // coefficients at all (variant 26, a probe) 1.26 / 1.40. Folding a slot while the next one's
  // MMAs run (two partial accumulators) made ptxas serialize every wgmma (C7514: it cannot tell
  // which accumulator a runtime-chosen slot's batch writes), so it is not done here; in place
  // with four one-k-block slots takes mma_four_slots instead (1.55 ms, run 10).
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int thread_idx,
                          TensorStorage& shared_tensors, Params const& params) {
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    constexpr int kMmaWarpGroups = kMmaThreads / cutlass::NumThreadsPerWarpGroup;
    Layout wg_layout = make_layout(Int<kMmaWarpGroups>{}, Int<cutlass::NumThreadsPerWarpGroup>{});
    int wg = __shfl_sync(0xFFFFFFFF, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(wg_layout(wg));
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,M,K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));
    Tensor partial = make_fragment_like(accum);
    const int blocks_per_slot = params.rank / kTileK;
    const int slots = k_tile_count / blocks_per_slot;
    const float* coef = params.slots->coef;
    // (c2, c3 far from 0: c0 / c2 and c1 / c3 stay finite for any gate and LoRA scale)
    if (kScaleSlots && blocks_per_slot == 1 && slots == 4 && fabsf(coef[2]) > 1e-30f &&
        fabsf(coef[3]) > 1e-30f) {
      mma_four_slots(pipeline, smem_pipe_read, accum, tiled_mma, tCrA, tCrB, coef[0], coef[1],
                     coef[2], coef[3]);  // in place, top-2, r = 64
      return;
    }

    PipelineState smem_pipe_release = smem_pipe_read;
    warpgroup_fence_operand(accum);
    warpgroup_fence_operand(partial);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < k_tile_count; ++t) {
      // the unscaled probe (variant 26) accumulates every slot as is, like the packed GEMM
      const int slot = kScaleSlots ? t / blocks_per_slot : 0;
      const int kb_in_slot = kScaleSlots ? t - slot * blocks_per_slot : t;
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
      const int stage = smem_pipe_read.index();
      tiled_mma.accumulate_ = kb_in_slot == 0 ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
      warpgroup_arrive();
      if (slot == 0) {  // two static targets: a runtime-selected one would leave registers
        CUTLASS_PRAGMA_UNROLL
        for (int kb = 0; kb < size<2>(tCrA); ++kb) {
          cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), accum);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
      } else {
        CUTLASS_PRAGMA_UNROLL
        for (int kb = 0; kb < size<2>(tCrA); ++kb) {
          cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), partial);
          tiled_mma.accumulate_ = GMMA::ScaleOut::One;
        }
      }
      warpgroup_commit_batch();
      if (t > 0) {  // the previous batch is done with its stage
        warpgroup_wait<1>();
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
      ++smem_pipe_read;
      if (slot >= 1 && kb_in_slot == blocks_per_slot - 1) {  // slot complete: fold it in
        warpgroup_wait<0>();
        warpgroup_fence_operand(accum);
        warpgroup_fence_operand(partial);
        const float c = coef[slot], c0 = slot == 1 ? coef[0] : 1.0f;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(accum); ++i) accum(i) = c0 * accum(i) + c * partial(i);
        warpgroup_fence_operand(accum);
        warpgroup_fence_operand(partial);
      }
    }
    if (kScaleSlots && slots == 1) {  // pristine k = 1: the only slot's coefficient
      warpgroup_wait<0>();
      warpgroup_fence_operand(accum);
      const float c0 = coef[0];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(accum); ++i) accum(i) *= c0;
    }
    warpgroup_fence_operand(accum);
  }

  // Four one-k-block slots (in place, top-2, r = 64) in two accumulators with no fold that
  // waits for every MMA: each set is rescaled while the other set's batch runs, and slots 2 and 3
  // accumulate on top of the rescaled sets,
  //   accum = (c0 / c2) P0 + P2,  other = (c1 / c3) P1 + P3,  result = c2 accum + c3 other,
  // which is c0 P0 + c1 P1 + c2 P2 + c3 P3 with one fp32 rounding more per product. Called only
  // with |c2|, |c3| > 1e-30 (this token's gates); a third accumulator set (folding while the next
  // batch runs) did not fit the registers (ptxas serialized the wgmma, C7512).
  template <class FrgTensorC, class FragA, class FragB>
  CUTLASS_DEVICE void mma_four_slots(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                                     FrgTensorC& accum, TiledMma& tiled_mma, FragA const& tCrA,
                                     FragB const& tCrB, float c0, float c1, float c2, float c3) {
    Tensor other = make_fragment_like(accum);
    PipelineState smem_pipe_release = smem_pipe_read;
    warpgroup_fence_operand(accum);
    warpgroup_fence_operand(other);
    auto issue = [&](auto& target, bool accumulate) {
      auto token = pipeline.consumer_try_wait(smem_pipe_read);
      pipeline.consumer_wait(smem_pipe_read, token);
      const int stage = smem_pipe_read.index();
      tiled_mma.accumulate_ = accumulate ? GMMA::ScaleOut::One : GMMA::ScaleOut::Zero;
      warpgroup_fence_operand(target);
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        cute::gemm(tiled_mma, tCrA(_, _, kb, stage), tCrB(_, _, kb, stage), target);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      ++smem_pipe_read;
    };
    auto release_previous = [&]() {  // every batch but the last one issued is done
      warpgroup_wait<1>();
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_release;
    };
    auto rescale = [&](auto& target, float f) {
      warpgroup_fence_operand(target);
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(target); ++i) target(i) *= f;
      warpgroup_fence_operand(target);
    };
    issue(accum, false);   // P0
    issue(other, false);   // P1
    release_previous();    // P0 done
    rescale(accum, c0 / c2);
    issue(accum, true);    // + P2
    release_previous();    // P1 done
    rescale(other, c1 / c3);
    issue(other, true);    // + P3
    release_previous();    // accum done
    warpgroup_wait<0>();   // other done (its stage is released by the base's mma_tail)
    warpgroup_fence_operand(accum);
    warpgroup_fence_operand(other);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(accum); ++i) accum(i) = c2 * accum(i) + c3 * other(i);
    warpgroup_fence_operand(accum);
  }

  // The base's per-group tensor-map update with the 3-D (rows, r, experts) operand shapes.
  template <class TensorMapA, class TensorMapB, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(
      TensorMapStorage& shared_tensormaps, Params const& params,
      cute::tuple<TensorMapA, TensorMapB> const&, ProblemShape_MNKL problem_shape_mnkl,
      int32_t next_group) {
    if (!cute::elect_one_sync()) return;
    this->tensormaps_replace_global_address(shared_tensormaps, params, next_group);
    const uint32_t M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl);
    const uint32_t R = static_cast<uint32_t>(params.rank), E = static_cast<uint32_t>(params.n_experts);
    cute::array<uint32_t, 5> shape_a = {1, 1, 1, 1, 1}, shape_b = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> stride_a = {0, 0, 0, 0, 0}, stride_b = {0, 0, 0, 0, 0};
    Tensor tensor_a = make_tensor(static_cast<InternalElementA const*>(nullptr),
                                  make_shape(M, R, E), params.dA[next_group]);
    Tensor tensor_b = make_tensor(static_cast<InternalElementB const*>(nullptr),
                                  make_shape(N, R, E), params.dB[next_group]);
    cute::detail::fill_tma_gmem_shape_stride(params.tma_load_a, tensor_a, shape_a, stride_a);
    cute::detail::fill_tma_gmem_shape_stride(params.tma_load_b, tensor_b, shape_b, stride_b);
    for (uint64_t& st : stride_a) st = st * sizeof_bits_v<InternalElementA> / 8;
    for (uint64_t& st : stride_b) st = st * sizeof_bits_v<InternalElementB> / 8;
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(shared_tensormaps.smem_tensormap_A,
                                                            shape_a, stride_a);
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(shared_tensormaps.smem_tensormap_B,
                                                            shape_b, stride_b);
  }
};

}  // namespace adafuse_sgmm

namespace cute {
// A TMA reduce-add store whose descriptor the ptr-array epilogue swaps per group: CUTLASS 4.2
// has `with(descriptor)` for SM90_TMA_STORE only. Same fields as its SM90_TMA_REDUCE_ADD
// traits (make_tma_copy builds them from {descriptor, aux params}).
struct ADAFUSE_TMA_REDUCE_ADD : SM90_TMA_REDUCE_ADD {};
struct ADAFUSE_TMA_REDUCE_ADD_PTR : SM90_TMA_REDUCE_ADD {};

template <class NumBitsPerTMA>
struct Copy_Traits<ADAFUSE_TMA_REDUCE_ADD_PTR, NumBitsPerTMA> {
  using ThrID = Layout<_1>;
  using SrcLayout = Layout<Shape<_1, NumBitsPerTMA>>;
  using DstLayout = Layout<Shape<_1, NumBitsPerTMA>>;
  using RefLayout = SrcLayout;
  TmaDescriptor const* tma_desc_;

  template <class TS, class SLayout, class TD, class DLayout>
  CUTE_HOST_DEVICE friend constexpr void copy_unpack(Copy_Traits const& traits,
                                                     Tensor<TS, SLayout> const& src,
                                                     Tensor<TD, DLayout>& dst) {
    static_assert(is_smem<TS>::value, "Expected smem src for a TMA reduce-add");
    return detail::explode_tuple(detail::CallCOPY<SM90_TMA_REDUCE_ADD>{},
                                 make_tuple(traits.tma_desc_, raw_pointer_cast(src.data())),
                                 seq<0, 1>{}, dst.data().coord_,
                                 tuple_seq<decltype(dst.data().coord_)>{});
  }
};

template <class NumBitsPerTMA, class AuxParams_>
struct Copy_Traits<ADAFUSE_TMA_REDUCE_ADD, NumBitsPerTMA, AuxParams_>
    : Copy_Traits<SM90_TMA_REDUCE_ADD, NumBitsPerTMA, AuxParams_> {
  CUTE_HOST_DEVICE constexpr Copy_Traits<ADAFUSE_TMA_REDUCE_ADD_PTR, NumBitsPerTMA> with(
      TmaDescriptor const* new_tma_desc) const {
    return {new_tma_desc};
  }
};
}  // namespace cute

namespace adafuse_sgmm {
// The in-place epilogue without C (variants 27-29): the builder's epilogue for a void C operand
// (no C shared memory, no C load, D = acc), its TMA store replaced by a reduce-add, so W += D
// happens in L2 and a tile's epilogue only converts and stores. W is rounded twice (delta to 16
// bits, then W + delta), against once when C is read; W is written by one tile, so the result is
// deterministic.
template <class BuilderEpilogue>
using ReduceAddEpilogue = cutlass::epilogue::collective::CollectiveEpilogue<
    typename BuilderEpilogue::DispatchPolicy, typename BuilderEpilogue::CtaTileMNK,
    typename BuilderEpilogue::EpilogueTile, typename BuilderEpilogue::ElementC,
    typename BuilderEpilogue::StrideC, typename BuilderEpilogue::ElementD,
    typename BuilderEpilogue::StrideD, typename BuilderEpilogue::FusionCallbacks,
    typename BuilderEpilogue::CopyOpG2S, typename BuilderEpilogue::SmemLayoutAtomC,
    typename BuilderEpilogue::CopyOpS2R, cute::ADAFUSE_TMA_REDUCE_ADD,
    typename BuilderEpilogue::SmemLayoutAtomD, typename BuilderEpilogue::CopyOpR2S,
    typename BuilderEpilogue::CopyAtomC, typename BuilderEpilogue::CopyOpR2R>;

template <class Element, class KernelSchedule, class EpilogueSchedule, int TM, int TN, int TK,
          int CM, int CN, int EM, int EN, int SC, class Override = EpilogueOverride<-1>,
          bool Gather = false, bool UnscaledProbe = false, bool Reduce = false>
struct GroupedGemm {
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  // L (LoRA B gathered) [out, Kc] K-major; R (LoRA A gathered) [Kc, in] N-major; W [out, in].
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::RowMajor;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;  // 16 bytes (TMA)
  using TileShape = Shape<Int<TM>, Int<TN>, Int<TK>>;
  using ClusterShape = Shape<Int<CM>, Int<CN>, _1>;
  using EpilogueTile = std::conditional_t<EM == 0, cutlass::epilogue::collective::EpilogueTileAuto,
                                          Shape<Int<EM == 0 ? 1 : EM>, Int<EN == 0 ? 1 : EN>>>;

  using Fusion = cutlass::epilogue::fusion::LinearCombination<Element, float>;
  using BuilderEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      EpilogueTile, float, float,
      Element, LayoutC*, kAlign, Element, LayoutC*, kAlign, EpilogueSchedule,
      Fusion>::CollectiveOp;
  // SC != 0: the builder's epilogue with StagesC = SC (C tiles the load warp may prefetch).
  // Same steps as the builder (CUTLASS 4.2, epilogue/collective/builders/sm90_builder.inl):
  // epilogue tile, dispatch policy, Sm90TmaBuilderImpl; only StagesC differs.
  using EpilogueTileMN = decltype(cutlass::epilogue::collective::detail::
                                      sm90_compute_tile_shape_or_override<
                                          Element, EpilogueTile, EpilogueSchedule, TileShape>());
  using BuilderPolicy = decltype(cutlass::epilogue::collective::detail::
                                     sm90_get_tma_dispatch_policy<TileShape, EpilogueTileMN,
                                                                  Element, Element,
                                                                  EpilogueSchedule>());
  using StagedPolicy = cutlass::epilogue::Sm90PtrArrayTmaWarpSpecialized<
      SC == 0 ? BuilderPolicy::StagesC : SC,
      Override::kStagesD == 0 ? BuilderPolicy::StagesD : Override::kStagesD,
      BuilderPolicy::FragmentSize,
      Override::kReuseSmemC < 0 ? BuilderPolicy::ReuseSmemC : bool(Override::kReuseSmemC),
      Override::kDelayTmaStore < 0 ? BuilderPolicy::DelayTmaStore : bool(Override::kDelayTmaStore),
      BuilderPolicy::NumEpilogueWarpGroups>;
  static constexpr bool kOverridden = SC != 0 || Override::kStagesD != 0 ||
                                      Override::kReuseSmemC >= 0 || Override::kDelayTmaStore >= 0;
  using StagedEpilogue = typename cutlass::epilogue::collective::detail::Sm90TmaBuilderImpl<
      TileShape, EpilogueTileMN, float, float, Element, LayoutC*, kAlign, Element, LayoutC*,
      kAlign, Fusion, StagedPolicy>::CollectiveOp;
  static_assert(!std::is_same_v<BuilderPolicy, StagedPolicy> ||
                    std::is_same_v<BuilderEpilogue, StagedEpilogue>,
                "the staged epilogue path must reproduce the builder's epilogue");
  // Reduce: the builder's epilogue for C = void, D = acc (alpha = 1), stored with a reduce-add.
  static constexpr bool kReduce = Reduce;
  using ReduceBuilderEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      EpilogueTile, float, float, void, LayoutC*, kAlign, Element, LayoutC*, kAlign,
      EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, float, void>>::CollectiveOp;
  using CollectiveEpilogue = std::conditional_t<
      Reduce, ReduceAddEpilogue<ReduceBuilderEpilogue>,
      std::conditional_t<kOverridden, StagedEpilogue, BuilderEpilogue>>;

  // Gather: L is (out, r, expert) with strides (r, 1, out*r), R is (in, r, expert) with strides
  // (1, in, r*in): the stacked B [N, out, r] and A [N, r, in] as they are.
  static constexpr bool kGather = Gather;
  using GmemStrideA = std::conditional_t<Gather, Stride<int64_t, _1, int64_t>*, LayoutA*>;
  using GmemStrideB = std::conditional_t<Gather, Stride<_1, int64_t, int64_t>*, LayoutB*>;
  using BuilderMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, GmemStrideA, kAlign, Element,
      GmemStrideB, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using CollectiveMainloop =
      std::conditional_t<Gather, GatherMainloop<BuilderMainloop, !UnscaledProbe>, BuilderMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

template <class Cfg>
struct Plan final : PlanBase {
  using Gemm = typename Cfg::Gemm;
  using Shape3 = typename Cfg::ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Gemm::GemmKernel::InternalStrideA;
  using StrideB = typename Gemm::GemmKernel::InternalStrideB;
  using StrideC = typename Gemm::GemmKernel::InternalStrideC;
  using StrideD = typename Gemm::GemmKernel::InternalStrideD;
  using ElementA = typename Gemm::ElementA;
  using ElementB = typename Gemm::ElementB;
  using ElementC = typename Gemm::ElementC;
  using ElementD = typename Gemm::EpilogueOutputOp::ElementOutput;

  Gemm gemm;
  std::vector<Shape3> shapes_host;  // kept alive: the arguments point at it
  void* dev_block = nullptr;         // one allocation for every device-side argument array
  uint8_t* workspace = nullptr;
  size_t ws_bytes = 0;

  ~Plan() override {
    if (dev_block) cudaFree(dev_block);
    if (workspace) cudaFree(workspace);
  }

  size_t workspace_bytes() const override { return ws_bytes; }

  int run(cudaStream_t stream) override {
    cutlass::Status st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) return -1;
    return static_cast<int>(cudaGetLastError());
  }

  template <class T>
  static size_t push(std::vector<uint8_t>& blob, const std::vector<T>& v) {
    size_t off = (blob.size() + 255) / 256 * 256;
    blob.resize(off + v.size() * sizeof(T));
    std::memcpy(blob.data() + off, v.data(), v.size() * sizeof(T));
    return off;
  }

  bool init(int groups, const int* mnk, const int64_t* p_lhs, const int64_t* p_rhs,
            const int64_t* p_c, const int64_t* p_d, int sm_count, int raster, int swizzle,
            const GatherArgs* gather, std::string* err) {
    constexpr int kTileK = size<2>(typename Cfg::TileShape{});
    if (Cfg::kGather != (gather != nullptr)) {
      *err = Cfg::kGather ? "a gather variant needs the slot table, rank and expert count"
                          : "a packed variant takes no gather arguments";
      return false;
    }
    if (gather != nullptr && (gather->rank <= 0 || gather->rank % kTileK || gather->n_experts <= 0 ||
                              gather->slot_table == nullptr)) {
      *err = "gather variants need r a multiple of " + std::to_string(kTileK) +
             " (got r = " + std::to_string(gather ? gather->rank : 0) + ") and a slot table";
      return false;
    }
    if constexpr (Cfg::kReduce) {  // W += delta through the store: C must be W itself
      for (int g = 0; g < groups; ++g)
        if (p_c[g] != p_d[g]) {
          *err = "reduce-add variants (27-29) only switch in place (C == D == W); pristine mode "
                 "needs a variant that reads C = W0";
          return false;
        }
    }
    shapes_host.resize(groups);
    std::vector<StrideA> sa(groups);
    std::vector<StrideB> sb(groups);
    std::vector<StrideC> sc(groups);
    std::vector<StrideD> sd(groups);
    std::vector<const ElementA*> pa(groups);
    std::vector<const ElementB*> pb(groups);
    std::vector<const ElementC*> pc(groups);
    std::vector<ElementD*> pd(groups);
    for (int g = 0; g < groups; ++g) {
      int M = mnk[3 * g], N = mnk[3 * g + 1], K = mnk[3 * g + 2];
      shapes_host[g] = Shape3{M, N, K};
      if constexpr (Cfg::kGather) {  // the stacks B [E, out, r] and A [E, r, in] as they are
        const int64_t r = gather->rank;
        if (K % r) {
          *err = "gather: K must be a whole number of rank-r slots";
          return false;
        }
        sa[g] = StrideA{r, _1{}, int64_t(M) * r};
        sb[g] = StrideB{_1{}, int64_t(N), r * N};
      } else {
        sa[g] = cutlass::make_cute_packed_stride(StrideA{}, {M, K, 1});
        sb[g] = cutlass::make_cute_packed_stride(StrideB{}, {N, K, 1});
      }
      sc[g] = cutlass::make_cute_packed_stride(StrideC{}, {M, N, 1});
      sd[g] = cutlass::make_cute_packed_stride(StrideD{}, {M, N, 1});
      pa[g] = reinterpret_cast<const ElementA*>(p_lhs[g]);
      pb[g] = reinterpret_cast<const ElementB*>(p_rhs[g]);
      pc[g] = reinterpret_cast<const ElementC*>(p_c[g]);
      pd[g] = reinterpret_cast<ElementD*>(p_d[g]);
    }
    std::vector<uint8_t> blob;
    size_t o_shape = push(blob, shapes_host), o_sa = push(blob, sa), o_sb = push(blob, sb),
           o_sc = push(blob, sc), o_sd = push(blob, sd), o_pa = push(blob, pa),
           o_pb = push(blob, pb), o_pc = push(blob, pc), o_pd = push(blob, pd);
    if (cudaMalloc(&dev_block, blob.size()) != cudaSuccess ||
        cudaMemcpy(dev_block, blob.data(), blob.size(), cudaMemcpyHostToDevice) != cudaSuccess) {
      *err = "cudaMalloc/cudaMemcpy of the argument arrays failed";
      return false;
    }
    auto at = [&](size_t off) { return static_cast<uint8_t*>(dev_block) + off; };

    cutlass::KernelHardwareInfo hw;
    cudaGetDevice(&hw.device_id);
    hw.sm_count = sm_count > 0
                      ? sm_count
                      : cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);

    typename Gemm::Arguments args;
    decltype(args.epilogue.thread) fusion;
    fusion.alpha = 1.0f;  // gate and LoRA scaling are folded into L (pack kernel or main loop)
    fusion.beta = Cfg::kReduce ? 0.0f : 1.0f;  // C == D (inplace) or C = W0 (pristine); reduce: no C
    fusion.alpha_ptr = nullptr;
    fusion.beta_ptr = nullptr;
    fusion.alpha_ptr_array = nullptr;
    fusion.beta_ptr_array = nullptr;
    fusion.dAlpha = {_0{}, _0{}, 0};
    fusion.dBeta = {_0{}, _0{}, 0};
    typename Gemm::GemmKernel::MainloopArguments mainloop;
    if constexpr (Cfg::kGather) {
      mainloop = {{reinterpret_cast<const ElementA**>(at(o_pa)), reinterpret_cast<StrideA*>(at(o_sa)),
                   reinterpret_cast<const ElementB**>(at(o_pb)), reinterpret_cast<StrideB*>(at(o_sb))},
                  static_cast<const SlotTable*>(gather->slot_table), gather->rank, gather->n_experts};
    } else {
      mainloop = {reinterpret_cast<const ElementA**>(at(o_pa)), reinterpret_cast<StrideA*>(at(o_sa)),
                  reinterpret_cast<const ElementB**>(at(o_pb)), reinterpret_cast<StrideB*>(at(o_sb))};
    }
    args = typename Gemm::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {groups, reinterpret_cast<Shape3*>(at(o_shape)), shapes_host.data()},
        mainloop,
        {fusion, Cfg::kReduce ? nullptr : reinterpret_cast<const ElementC**>(at(o_pc)),
         reinterpret_cast<StrideC*>(at(o_sc)), reinterpret_cast<ElementD**>(at(o_pd)),
         reinterpret_cast<StrideD*>(at(o_sd))},
        hw};
    using RasterOptions = decltype(args.scheduler.raster_order);
    args.scheduler.raster_order = raster == 1   ? RasterOptions::AlongN
                                  : raster == 2 ? RasterOptions::Heuristic
                                                : RasterOptions::AlongM;
    args.scheduler.max_swizzle_size = swizzle > 0 ? swizzle : 1;
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess) {
      *err = std::string("CUTLASS can_implement failed: ") + cutlassGetStatusString(st);
      return false;
    }
    ws_bytes = Gemm::get_workspace_size(args);
    if (ws_bytes && cudaMalloc(&workspace, ws_bytes) != cudaSuccess) {
      *err = "cudaMalloc of the GEMM workspace failed";
      return false;
    }
    st = gemm.initialize(args, workspace);
    if (st != cutlass::Status::kSuccess) {
      *err = std::string("CUTLASS initialize failed: ") + cutlassGetStatusString(st);
      return false;
    }
    return true;
  }
};

#if ADAFUSE_SGMM_DTYPE == 0
using SgmmElement = cutlass::bfloat16_t;
#define ADAFUSE_SGMM_DTYPE_NAME bf16
#else
using SgmmElement = cutlass::half_t;
#define ADAFUSE_SGMM_DTYPE_NAME fp16
#endif

#define ADAFUSE_CAT3_(a, b, c) a##_##b##_##c
#define ADAFUSE_CAT3(a, b, c) ADAFUSE_CAT3_(a, b, c)
}  // namespace adafuse_sgmm

namespace adafuse_sgmm {
template <int V> struct VariantCfg;
#define ADAFUSE_SGMM_VARIANT_CFG(ID, NAME, KS, ES, TM, TN, TK, CM, CN, EM, EN, SC)           \
  template <> struct VariantCfg<ID> {                                                       \
    using Cfg = GroupedGemm<SgmmElement, cutlass::gemm::KS, cutlass::epilogue::ES, TM, TN, TK, \
                            CM, CN, EM, EN, SC, EpilogueOverride<ID>,                       \
                            ADAFUSE_SGMM_IS_GATHER(ID),                                     \
                            (ID == ADAFUSE_SGMM_UNSCALED_PROBE_VARIANT),                    \
                            ADAFUSE_SGMM_IS_REDUCE(ID)>;                                    \
  };
ADAFUSE_SGMM_VARIANTS(ADAFUSE_SGMM_VARIANT_CFG)

PlanBase* ADAFUSE_CAT3(create_plan, ADAFUSE_SGMM_DTYPE_NAME, ADAFUSE_SGMM_VARIANT)(
    int groups, const int* mnk, const int64_t* p_lhs, const int64_t* p_rhs, const int64_t* p_c,
    const int64_t* p_d, int sm_count, int raster, int swizzle, const GatherArgs* gather,
    std::string* err) {
  auto* plan = new Plan<typename VariantCfg<ADAFUSE_SGMM_VARIANT>::Cfg>();
  if (!plan->init(groups, mnk, p_lhs, p_rhs, p_c, p_d, sm_count, raster, swizzle, gather, err)) {
    delete plan;
    return nullptr;
  }
  return plan;
}
}  // namespace adafuse_sgmm

#else  // !ADAFUSE_SGMM_GEMM_TU
// ---------------------------------------------------------------------------------------------
// Pack kernel and the registry of GEMM variants.
// ---------------------------------------------------------------------------------------------
namespace adafuse_sgmm {

// Weak: an extension built with a subset of the variants links, and asks for a missing one
// get a clear error instead of a crash.
#define ADAFUSE_SGMM_DECLARE(ID, NAME, KS, ES, TM, TN, TK, CM, CN, EM, EN, SC)               \
  __attribute__((weak)) PlanBase* create_plan_bf16_##ID(                                     \
      int, const int*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, int,  \
      int, int, const GatherArgs*, std::string*);                                            \
  __attribute__((weak)) PlanBase* create_plan_fp16_##ID(                                     \
      int, const int*, const int64_t*, const int64_t*, const int64_t*, const int64_t*, int,  \
      int, int, const GatherArgs*, std::string*);
ADAFUSE_SGMM_VARIANTS(ADAFUSE_SGMM_DECLARE)

#define ADAFUSE_SGMM_NAME(ID, NAME, KS, ES, TM, TN, TK, CM, CN, EM, EN, SC) #NAME,
static const char* kVariantNames[] = {ADAFUSE_SGMM_VARIANTS(ADAFUSE_SGMM_NAME)};

#define ADAFUSE_SGMM_ID(ID, NAME, KS, ES, TM, TN, TK, CM, CN, EM, EN, SC) ID,
constexpr int kVariantIds[] = {ADAFUSE_SGMM_VARIANTS(ADAFUSE_SGMM_ID)};
constexpr bool variant_ids_in_order() {
  for (int i = 0; i < ADAFUSE_SGMM_NUM_VARIANTS; ++i)
    if (kVariantIds[i] != i) return false;
  return true;
}
static_assert(sizeof(kVariantIds) / sizeof(kVariantIds[0]) == ADAFUSE_SGMM_NUM_VARIANTS,
              "ADAFUSE_SGMM_NUM_VARIANTS must count the ADAFUSE_SGMM_VARIANTS entries");
static_assert(variant_ids_in_order(), "ADAFUSE_SGMM_VARIANTS ids must be 0, 1, 2, ... in order");

int num_variants() { return ADAFUSE_SGMM_NUM_VARIANTS; }
const char* variant_name(int v) {
  return (v >= 0 && v < ADAFUSE_SGMM_NUM_VARIANTS) ? kVariantNames[v] : "";
}

bool is_gather_variant(int v) { return ADAFUSE_SGMM_IS_GATHER(v); }
bool is_reduce_variant(int v) { return ADAFUSE_SGMM_IS_REDUCE(v); }

PlanBase* create_plan(int dtype, int variant, int groups, const int* mnk, const int64_t* p_lhs,
                      const int64_t* p_rhs, const int64_t* p_c, const int64_t* p_d,
                      int sm_count, int raster, int swizzle, const GatherArgs* gather,
                      std::string* err) {
#define ADAFUSE_SGMM_CASE(ID, NAME, KS, ES, TM, TN, TK, CM, CN, EM, EN, SC)                  \
  case ID: {                                                                                 \
    CreatePlanFn fn = dtype == kBF16 ? create_plan_bf16_##ID : create_plan_fp16_##ID;        \
    if (fn == nullptr) {                                                                     \
      *err = "SGMM variant " #NAME " was not built into this extension";                     \
      return nullptr;                                                                        \
    }                                                                                        \
    return fn(groups, mnk, p_lhs, p_rhs, p_c, p_d, sm_count, raster, swizzle, gather, err);  \
  }
  switch (variant) {
    ADAFUSE_SGMM_VARIANTS(ADAFUSE_SGMM_CASE)
    default:
      *err = "unknown SGMM variant " + std::to_string(variant);
      return nullptr;
  }
}

// Per-weight pack descriptor, an int64 row [A, B, lhs, rhs, out, in] (see cutlass_sgmm.py).
constexpr int kDescCols = 6;
constexpr int kMaxSlots = 8;  // 2 * k, k <= 4

template <typename T>
__device__ __forceinline__ uint4 scale8(uint4 raw, float c);

template <>
__device__ __forceinline__ uint4 scale8<__nv_bfloat16>(uint4 raw, float c) {
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    h[i] = __floats2bfloat162_rn(f.x * c, f.y * c);
  }
  return raw;
}

template <>
__device__ __forceinline__ uint4 scale8<__half>(uint4 raw, float c) {
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    h[i] = __floats2half2_rn(f.x * c, f.y * c);
  }
  return raw;
}

// One block per row of `work` (int32 [blocks, 3]: weight g, first and end 16-byte vector of
// g's packed factors), built by cutlass_sgmm.py: equal blocks, about four waves of them, so the
// block scheduler evens out the load (with a fixed number of blocks per weight, the small
// weights' blocks idled while the large ones finished: 0.099 against 0.087 ms for the q,v
// pristine pack on the H200). Writes, for weight g:
//   lhs[m, j*r + q] = coef_j * B_g[e_j, m, q]   ([out, Kc], K contiguous)
//   rhs[j*r + q, n] = A_g[e_j, q, n]            ([Kc, in], N contiguous)
// slots j: inplace -> (prev_0..prev_{k-1}: coef = -s*pg, cur_0..cur_{k-1}: coef = s*g);
//          pristine -> cur only. 16-byte vectors (r % 8 == 0 and in % 8 == 0 checked on host).
template <typename T>
__global__ void __launch_bounds__(256) sgmm_pack_kernel(
    const int64_t* __restrict__ desc, const int* __restrict__ work,
    const int64_t* __restrict__ experts,
    const float* __restrict__ gates, int64_t* prev_experts, float* prev_gates,
    unsigned int* counter, int k, int r, int inplace, float scaling) {
  __shared__ int64_t s_e[kMaxSlots];
  __shared__ float s_c[kMaxSlots];
  __shared__ bool s_last;
  const int slots = inplace ? 2 * k : k;
  if (threadIdx.x < slots) {
    int j = threadIdx.x;
    if (inplace && j < k) {
      s_e[j] = prev_experts[j];
      s_c[j] = -scaling * prev_gates[j];
    } else {
      int jj = inplace ? j - k : j;
      s_e[j] = experts[jj];
      s_c[j] = scaling * gates[jj];
    }
  }
  __syncthreads();

  const int* job = work + 3 * blockIdx.x;
  const int64_t* d = desc + static_cast<int64_t>(job[0]) * kDescCols;
  const T* A = reinterpret_cast<const T*>(d[0]);
  const T* B = reinterpret_cast<const T*>(d[1]);
  T* lhs = reinterpret_cast<T*>(d[2]);
  T* rhs = reinterpret_cast<T*>(d[3]);
  // 32-bit index math (a 64-bit division per 16-byte vector is several times the instructions);
  // cutlass_sgmm.py checks that one weight's vectors fit (n_all < 2^31).
  const unsigned out = static_cast<unsigned>(d[4]), in = static_cast<unsigned>(d[5]);
  const unsigned Kc = static_cast<unsigned>(slots * r), ur = static_cast<unsigned>(r);
  const unsigned kv = Kc / 8, nv = in / 8;
  const unsigned n_lhs = out * kv;
  const unsigned first = static_cast<unsigned>(job[1]), end = static_cast<unsigned>(job[2]);
  const unsigned stride = blockDim.x;
  // kUnroll independent 16-byte loads in flight per thread before their stores: a single
  // load-store pair per iteration left too few bytes in flight per SM to reach copy bandwidth.
  constexpr int kUnroll = 4;
  for (unsigned base = first + threadIdx.x; base < end; base += kUnroll * stride) {
    uint4 val[kUnroll];
    T* dst[kUnroll];
    float coef[kUnroll];  // an L vector's gate scale
    bool is_lhs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const unsigned v = base + u * stride;
      dst[u] = nullptr;
      coef[u] = 0.f;
      is_lhs[u] = v < n_lhs;
      if (v >= end) continue;
      const T* src;
      if (is_lhs[u]) {
        const unsigned m = v / kv, kk = (v - m * kv) * 8;
        const unsigned j = kk / ur, q = kk - j * ur;
        src = B + (static_cast<size_t>(s_e[j]) * out + m) * ur + q;
        dst[u] = lhs + static_cast<size_t>(m) * Kc + kk;
        coef[u] = s_c[j];
      } else {
        const unsigned w = v - n_lhs, row = w / nv, col = (w - row * nv) * 8;
        const unsigned j = row / ur, q = row - j * ur;
        src = A + (static_cast<size_t>(s_e[j]) * ur + q) * in + col;
        dst[u] = rhs + static_cast<size_t>(row) * in + col;
      }
      val[u] = *reinterpret_cast<const uint4*>(src);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (dst[u] == nullptr) continue;
      *reinterpret_cast<uint4*>(dst[u]) = is_lhs[u] ? scale8<T>(val[u], coef[u]) : val[u];
    }
  }

  // The last block to finish publishes this token's experts as the next call's "previous".
  // Every block read prev_* into shared memory before incrementing the counter.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    unsigned int total = gridDim.x;
    s_last = (atomicAdd(counter, 1u) == total - 1);
  }
  __syncthreads();
  if (s_last) {
    if (threadIdx.x < k) {
      prev_experts[threadIdx.x] = experts[threadIdx.x];
      prev_gates[threadIdx.x] = gates[threadIdx.x];
    }
    if (threadIdx.x == 0) *counter = 0u;  // ready for the next call / graph replay
  }
}

int pack_blocks_per_sm(int dtype) {
  int n = 0;
  cudaError_t e = dtype == kBF16
      ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, sgmm_pack_kernel<__nv_bfloat16>, 256, 0)
      : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, sgmm_pack_kernel<__half>, 256, 0);
  return e == cudaSuccess ? n : -static_cast<int>(e);
}

int launch_pack(int dtype, const int64_t* desc, const int* work, int blocks,
                const int64_t* experts, const float* gates, int64_t* prev_experts,
                float* prev_gates, unsigned int* counter, int k, int r, int inplace,
                float scaling, cudaStream_t stream) {
  if (k < 1 || k > kMaxSlots / 2) return static_cast<int>(cudaErrorInvalidValue);
  dim3 grid(blocks);
  if (dtype == kBF16) {
    sgmm_pack_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(
        desc, work, experts, gates, prev_experts, prev_gates, counter, k, r, inplace, scaling);
  } else {
    sgmm_pack_kernel<__half><<<grid, 256, 0, stream>>>(
        desc, work, experts, gates, prev_experts, prev_gates, counter, k, r, inplace, scaling);
  }
  return static_cast<int>(cudaGetLastError());
}

// The gather variants' per-call step (one block): this token's slot table (see SlotTable), then
// the current experts / gates published as the next call's "previous" ones. One block, so the
// reads of prev_* (inplace slots) come before the writes (the barrier between them).
__global__ void sgmm_slots_kernel(const int64_t* __restrict__ experts,
                                  const float* __restrict__ gates, int64_t* prev_experts,
                                  float* prev_gates, SlotTable* table, int k, int inplace,
                                  float scaling) {
  const int j = threadIdx.x, slots = inplace ? 2 * k : k;
  if (j < slots) {
    if (inplace && j < k) {
      table->expert[j] = static_cast<int32_t>(prev_experts[j]);
      table->coef[j] = -scaling * prev_gates[j];
    } else {
      const int jj = inplace ? j - k : j;
      table->expert[j] = static_cast<int32_t>(experts[jj]);
      table->coef[j] = scaling * gates[jj];
    }
  }
  __syncthreads();
  if (j < k) {
    prev_experts[j] = experts[j];
    prev_gates[j] = gates[j];
  }
}

int launch_slots(const int64_t* experts, const float* gates, int64_t* prev_experts,
                 float* prev_gates, void* table, int k, int inplace, float scaling,
                 cudaStream_t stream) {
  if (k < 1 || k > kMaxSlots / 2) return static_cast<int>(cudaErrorInvalidValue);
  sgmm_slots_kernel<<<1, 32, 0, stream>>>(experts, gates, prev_experts, prev_gates,
                                          static_cast<SlotTable*>(table), k, inplace, scaling);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace adafuse_sgmm
#endif  // ADAFUSE_SGMM_GEMM_TU
