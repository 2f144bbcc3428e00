// cuDNN graphs (cudnn-frontend graph API), one fused kernel per call where cuDNN has an engine:
//
//   cudnn_conv_bias_act:  y = [relu](conv(x, W) + bias + residual)          inference epilogue
//   cudnn_conv_genstats:  y = conv([relu](x * scale + shift), W), and the per-channel sum and
//                         sum of squares of y computed in the conv's epilogue (NormConv training:
//                         the previous BN's apply becomes this conv's prologue)
//
// Each op has a `_supported` twin answering, without running anything, whether cuDNN can build
// the graph for that signature. The verdict and the built plan are cached per signature (op,
// shape, dtypes, layout, device, TF32 / determinism switches); 16-byte alignment is guaranteed by
// copying a misaligned operand, so it is constant and not part of the key. A graph with no
// engine is "not covered" (false), never an error for the caller.
//
// Execution: torch's per-thread, per-device cuDNN handle set to torch's current stream, workspace
// from the caching allocator, no host synchronisation (CUDA graph capture works once the plan is
// cached: build plans outside capture, e.g. by calling `_supported` or a warm-up run).
//
// This is the only translation unit that includes cudnn_frontend (slow to compile), built when
// setup.py finds its headers (FASTRES_WITH_CUDNN_GRAPHS).
#ifdef FASTRES_WITH_CUDNN_GRAPHS

#define CUDNN_FRONTEND_SKIP_JSON_LIB 1
#include <cudnn_frontend.h>

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "../fastres.h"

namespace fastres {

namespace {

namespace fe = cudnn_frontend;

enum Uid : int64_t { kX = 1, kW, kBias, kResidual, kY, kScale, kShift, kSum, kSqSum };

struct Entry {
  std::shared_ptr<fe::graph::Graph> graph;  // null: no engine for this signature
  int64_t workspace = 0;
  bool channels_last = false;   // the layout the graph was built for
  bool bias_in_io_dtype = false;
  std::string why;              // why not, when graph is null
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<const Entry>> cache;

bool io_dtype(at::ScalarType t, fe::DataType_t& out) {
  switch (t) {
    case at::kHalf: out = fe::DataType_t::HALF; return true;
    case at::kBFloat16: out = fe::DataType_t::BFLOAT16; return true;
    case at::kFloat: out = fe::DataType_t::FLOAT; return true;
    default: return false;
  }
}

// Sizes and strides of t as cuDNN reads them (NCHW dimension order, strides of `format`).
std::vector<int64_t> dense_strides(at::IntArrayRef sizes, bool channels_last) {
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  if (channels_last) return {c * h * w, 1, w * c, c};
  return {c * h * w, h * w, w, 1};
}

std::vector<int64_t> conv_out_shape(at::IntArrayRef x, at::IntArrayRef w, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation) {
  std::vector<int64_t> out{x[0], w[0], 0, 0};
  for (int d = 0; d < 2; ++d)
    out[2 + d] = (x[2 + d] + 2 * padding[d] - dilation[d] * (w[2 + d] - 1) - 1) / stride[d] + 1;
  return out;
}

// What a graph is asked to compute: the cache key and the builder read only this.
struct Spec {
  bool genstats = false;      // cudnn_conv_genstats (else cudnn_conv_bias_act)
  at::ScalarType dtype = at::kFloat;
  int device = 0;
  std::vector<int64_t> x, w, y;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  bool bias = false, residual = false, relu = false;        // bias_act
  bool prologue = false, prologue_relu = false;             // genstats: scale/shift (+ relu) on x
  bool allow_tf32 = false, deterministic = false;

  std::string key(bool channels_last, bool bias_io) const {
    std::ostringstream s;
    s << (genstats ? "gs" : "ba") << '|' << static_cast<int>(dtype) << '|' << device << '|' << channels_last << '|'
      << bias_io << '|';
    for (auto v : x) s << v << ',';
    s << '|';
    for (auto v : w) s << v << ',';
    s << '|' << stride[0] << ',' << stride[1] << ',' << padding[0] << ',' << padding[1] << ',' << dilation[0] << ','
      << dilation[1] << ',' << groups << '|' << bias << residual << relu << prologue << prologue_relu << allow_tf32
      << deterministic;
    return s.str();
  }
};

std::shared_ptr<const Entry> build(const Spec& spec, bool channels_last, bool bias_io) {
  auto entry = std::make_shared<Entry>();
  entry->channels_last = channels_last;
  entry->bias_in_io_dtype = bias_io;
  auto fail = [&](const std::string& why) {
    entry->graph = nullptr;
    entry->why = why;
    return entry;
  };
  fe::DataType_t io;
  if (!io_dtype(spec.dtype, io)) return fail("dtype not float16, bfloat16 or float32");
  const auto f32 = fe::DataType_t::FLOAT;
  const auto chan_dims = std::vector<int64_t>{1, spec.y[1], 1, 1};
  const auto chan_strides = std::vector<int64_t>{spec.y[1], 1, 1, 1};
  try {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(io).set_intermediate_data_type(f32).set_compute_data_type(f32);
    auto X = g->tensor(fe::graph::Tensor_attributes()
                           .set_name("x").set_uid(kX).set_dim(spec.x)
                           .set_stride(dense_strides(spec.x, channels_last)).set_data_type(io));
    auto W = g->tensor(fe::graph::Tensor_attributes()
                           .set_name("w").set_uid(kW).set_dim(spec.w)
                           .set_stride(dense_strides(spec.w, channels_last)).set_data_type(io));
    auto conv_in = X;
    if (spec.genstats && spec.prologue) {
      const auto cin = std::vector<int64_t>{1, spec.x[1], 1, 1};
      const auto cin_strides = std::vector<int64_t>{spec.x[1], 1, 1, 1};
      auto S = g->tensor(fe::graph::Tensor_attributes().set_name("scale").set_uid(kScale).set_dim(cin)
                             .set_stride(cin_strides).set_data_type(f32));
      auto T = g->tensor(fe::graph::Tensor_attributes().set_name("shift").set_uid(kShift).set_dim(cin)
                             .set_stride(cin_strides).set_data_type(f32));
      auto scaled = g->pointwise(X, S, fe::graph::Pointwise_attributes().set_name("scale")
                                           .set_mode(fe::PointwiseMode_t::MUL).set_compute_data_type(f32));
      auto shifted = g->pointwise(scaled, T, fe::graph::Pointwise_attributes().set_name("shift")
                                                 .set_mode(fe::PointwiseMode_t::ADD).set_compute_data_type(f32));
      conv_in = shifted;
      if (spec.prologue_relu)
        conv_in = g->pointwise(shifted, fe::graph::Pointwise_attributes().set_name("prologue_relu")
                                            .set_mode(fe::PointwiseMode_t::RELU_FWD).set_compute_data_type(f32));
    }
    auto conv_opts = fe::graph::Conv_fprop_attributes()
                         .set_name("conv").set_padding(spec.padding).set_stride(spec.stride)
                         .set_dilation(spec.dilation).set_compute_data_type(f32);
    auto Y = g->conv_fprop(conv_in, W, conv_opts);
    const auto y_strides = dense_strides(spec.y, channels_last);
    if (spec.genstats) {
      Y->set_output(true).set_uid(kY).set_dim(spec.y).set_stride(y_strides).set_data_type(io);
      auto stats = g->genstats(Y, fe::graph::Genstats_attributes().set_name("genstats").set_compute_data_type(f32));
      stats[0]->set_output(true).set_uid(kSum).set_dim(chan_dims).set_stride(chan_strides).set_data_type(f32);
      stats[1]->set_output(true).set_uid(kSqSum).set_dim(chan_dims).set_stride(chan_strides).set_data_type(f32);
    } else {
      auto out = Y;
      if (spec.bias) {
        auto B = g->tensor(fe::graph::Tensor_attributes().set_name("bias").set_uid(kBias).set_dim(chan_dims)
                               .set_stride(chan_strides).set_data_type(bias_io ? io : f32));
        out = g->pointwise(out, B, fe::graph::Pointwise_attributes().set_name("bias")
                                       .set_mode(fe::PointwiseMode_t::ADD).set_compute_data_type(f32));
      }
      if (spec.residual) {
        auto Z = g->tensor(fe::graph::Tensor_attributes().set_name("residual").set_uid(kResidual).set_dim(spec.y)
                               .set_stride(y_strides).set_data_type(io));
        out = g->pointwise(out, Z, fe::graph::Pointwise_attributes().set_name("residual")
                                       .set_mode(fe::PointwiseMode_t::ADD).set_compute_data_type(f32));
      }
      if (spec.relu)
        out = g->pointwise(out, fe::graph::Pointwise_attributes().set_name("relu")
                                    .set_mode(fe::PointwiseMode_t::RELU_FWD).set_compute_data_type(f32));
      if (out == Y) Y->set_dim(spec.y).set_stride(y_strides);  // a plain conv: its output is the graph's
      out->set_output(true).set_uid(kY).set_dim(spec.y).set_stride(y_strides).set_data_type(io);
    }
    // torch's rules for its own cuDNN convs: inputs are never down-converted; float32 uses TF32
    // tensor cores only where torch allows it; no nondeterministic engine in deterministic mode.
    std::vector<fe::NumericalNote_t> excluded{fe::NumericalNote_t::DOWN_CONVERT_INPUTS};
    if (spec.dtype == at::kFloat && !spec.allow_tf32) excluded.push_back(fe::NumericalNote_t::TENSOR_CORE);
    if (spec.deterministic) excluded.push_back(fe::NumericalNote_t::NONDETERMINISTIC);
    g->deselect_numeric_notes(excluded);

    cudnnHandle_t handle = at::native::getCudnnHandle();
    auto check = [&](fe::error_t status, const char* step) {
      if (!status.is_good()) throw std::runtime_error(std::string(step) + ": " + status.get_message());
    };
    check(g->validate(), "validate");
    check(g->build_operation_graph(handle), "build_operation_graph");
    check(g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}), "create_execution_plans");
    check(g->check_support(handle), "check_support");
    check(g->build_plans(handle, fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "build_plans");
    int64_t workspace = 0;
    check(g->get_workspace_size(workspace), "get_workspace_size");
    entry->graph = g;
    entry->workspace = workspace;
    return entry;
  } catch (const std::exception& error) {
    return fail(error.what());
  }
}

// The cached entry for spec: the first layout/bias-dtype variant cuDNN can build (the input's own
// layout first, then channels_last, where the fused runtime engines live; bias in float32 first).
std::shared_ptr<const Entry> lookup(const Spec& spec, bool channels_last_input) {
  std::vector<bool> layouts{channels_last_input};
  if (!channels_last_input) layouts.push_back(true);
  std::vector<bool> bias_variants{false};
  if (!spec.genstats && spec.bias && spec.dtype != at::kFloat) bias_variants.push_back(true);
  std::shared_ptr<const Entry> last;
  for (bool cl : layouts) {
    for (bool bias_io : bias_variants) {
      const std::string key = spec.key(cl, bias_io);
      std::shared_ptr<const Entry> entry;
      {
        std::lock_guard<std::mutex> lock(cache_mutex);
        auto it = cache.find(key);
        if (it != cache.end()) entry = it->second;
      }
      if (!entry) {
        entry = build(spec, cl, bias_io);
        std::lock_guard<std::mutex> lock(cache_mutex);
        entry = cache.emplace(key, entry).first->second;  // a racing builder's entry wins: same verdict
      }
      if (entry->graph) return entry;
      last = entry;
    }
  }
  return last;
}

bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Whether the call is one the graphs are ever asked about (the rest is "not covered").
bool plausible(const at::Tensor& x, const at::Tensor& w, int64_t groups) {
  return x.is_cuda() && w.device() == x.device() && x.dim() == 4 && w.dim() == 4 && groups == 1 &&
         x.size(1) == w.size(1) && x.numel() > 0 && w.numel() > 0 &&
         (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) &&
         w.scalar_type() == x.scalar_type();
}

Spec make_spec(bool genstats, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastres cuDNN graphs: stride, padding and dilation must have two entries");
  Spec s;
  s.genstats = genstats;
  s.dtype = x.scalar_type();
  s.device = x.get_device();
  s.x = x.sizes().vec();
  s.w = w.sizes().vec();
  s.y = conv_out_shape(x.sizes(), w.sizes(), stride, padding, dilation);
  s.stride = stride.vec();
  s.padding = padding.vec();
  s.dilation = dilation.vec();
  s.groups = groups;
  s.allow_tf32 = at::globalContext().allowTF32CuDNN();
  s.deterministic = at::globalContext().deterministicAlgorithms();
  return s;
}

// t dense in the graph's layout, 16-byte aligned (a view at an odd offset is copied).
at::Tensor operand(const at::Tensor& t, bool channels_last) {
  at::Tensor d = t.contiguous(channels_last && t.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                                             : at::MemoryFormat::Contiguous);
  if (reinterpret_cast<std::uintptr_t>(d.const_data_ptr()) % 16 != 0) d = d.clone();
  return d;
}

// What both ops do before binding their variant pack: the cached graph for this spec (an error if
// cuDNN has none: callers ask *_supported first), x and w in the graph's layout, y allocated in it.
struct Prepared {
  std::shared_ptr<const Entry> entry;
  bool input_cl, cl;
  at::Tensor x, w, y;
};

Prepared prepare(const char* op, const Spec& spec, const at::Tensor& x_in, const at::Tensor& w_in) {
  Prepared p;
  p.input_cl = is_channels_last(x_in);
  p.entry = lookup(spec, p.input_cl);
  TORCH_CHECK(p.entry->graph, op, ": cuDNN has no engine for this call (ask ", op, "_supported first): ",
              p.entry->why);
  p.cl = p.entry->channels_last;
  p.x = operand(x_in, p.cl);
  p.w = operand(w_in, p.cl);
  p.y = at::empty(spec.y, p.x.options(), p.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return p;
}

void execute(const Entry& entry, std::unordered_map<int64_t, void*>& pack, const at::Tensor& like) {
  at::Tensor workspace = at::empty({entry.workspace > 0 ? entry.workspace : 1}, like.options().dtype(at::kByte));
  cudnnHandle_t handle = at::native::getCudnnHandle();
  TORCH_CHECK(cudnnSetStream(handle, at::cuda::getCurrentCUDAStream()) == CUDNN_STATUS_SUCCESS,
              "fastres: cudnnSetStream failed");
  auto status = entry.graph->execute(handle, pack, workspace.data_ptr());
  TORCH_CHECK(status.is_good(), "fastres: cuDNN graph execution failed: ", status.get_message());
}

Spec bias_act_spec(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias, const OptTensor& residual,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                   bool relu) {
  Spec s = make_spec(false, x, w, stride, padding, dilation, groups);
  s.bias = bias.has_value() && bias->defined();
  s.residual = residual.has_value() && residual->defined();
  s.relu = relu;
  return s;
}

bool bias_act_plausible(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias, const OptTensor& residual,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!plausible(x, w, groups) || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) return false;
  const auto y = conv_out_shape(x.sizes(), w.sizes(), stride, padding, dilation);
  if (y[2] <= 0 || y[3] <= 0) return false;
  if (bias.has_value() && bias->defined() && (bias->numel() != w.size(0) || bias->device() != x.device()))
    return false;
  if (residual.has_value() && residual->defined() &&
      (residual->sizes() != at::IntArrayRef(y) || residual->device() != x.device()))
    return false;
  return true;
}

}  // namespace

bool cudnn_conv_bias_act_supported(const at::Tensor& x, const at::Tensor& w, const OptTensor& bias,
                                   const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, int64_t groups, bool relu) {
  if (!bias_act_plausible(x, w, bias, residual, stride, padding, dilation, groups)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  return lookup(bias_act_spec(x, w, bias, residual, stride, padding, dilation, groups, relu), is_channels_last(x))
             ->graph != nullptr;
}

at::Tensor cudnn_conv_bias_act(const at::Tensor& x_in, const at::Tensor& w_in, const OptTensor& bias,
                               const OptTensor& residual, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups, bool relu) {
  TORCH_CHECK(bias_act_plausible(x_in, w_in, bias, residual, stride, padding, dilation, groups),
              "cudnn_conv_bias_act: unsupported arguments (CUDA float16/bfloat16/float32 4-D x and weight of one "
              "dtype, groups 1, bias of K entries, residual of the output's shape)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Spec spec = bias_act_spec(x_in, w_in, bias, residual, stride, padding, dilation, groups, relu);
  Prepared prepared = prepare("cudnn_conv_bias_act", spec, x_in, w_in);
  const auto& entry = prepared.entry;
  const bool input_cl = prepared.input_cl, cl = prepared.cl;
  const at::Tensor &x = prepared.x, &w = prepared.w;
  at::Tensor y = prepared.y;
  std::unordered_map<int64_t, void*> pack{{kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()}};
  at::Tensor b, z;
  if (spec.bias) {
    b = operand(bias->to(entry->bias_in_io_dtype ? spec.dtype : at::kFloat), cl);
    pack[kBias] = b.data_ptr();
  }
  if (spec.residual) {
    z = operand(residual->to(spec.dtype), cl);
    pack[kResidual] = z.data_ptr();
  }
  execute(*entry, pack, x);
  // Out in x's own memory format (a graph built for channels_last on NCHW input converts back).
  return cl == input_cl ? y : y.contiguous(input_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

namespace {

bool genstats_plausible(const at::Tensor& x, const at::Tensor& w, const OptTensor& scale, const OptTensor& shift,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!plausible(x, w, groups) || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) return false;
  const auto y = conv_out_shape(x.sizes(), w.sizes(), stride, padding, dilation);
  if (y[2] <= 0 || y[3] <= 0) return false;
  const bool has_scale = scale.has_value() && scale->defined(), has_shift = shift.has_value() && shift->defined();
  if (has_scale != has_shift) return false;
  if (has_scale && (scale->numel() != x.size(1) || shift->numel() != x.size(1))) return false;
  return true;
}

Spec genstats_spec(const at::Tensor& x, const at::Tensor& w, const OptTensor& scale, bool prologue_relu,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Spec s = make_spec(true, x, w, stride, padding, dilation, groups);
  s.prologue = scale.has_value() && scale->defined();
  s.prologue_relu = s.prologue && prologue_relu;
  return s;
}

}  // namespace

bool cudnn_conv_genstats_supported(const at::Tensor& x, const at::Tensor& w, const OptTensor& scale,
                                   const OptTensor& shift, bool prologue_relu, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!genstats_plausible(x, w, scale, shift, stride, padding, dilation, groups)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  return lookup(genstats_spec(x, w, scale, prologue_relu, stride, padding, dilation, groups), is_channels_last(x))
             ->graph != nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_conv_genstats(
    const at::Tensor& x_in, const at::Tensor& w_in, const OptTensor& scale, const OptTensor& shift,
    bool prologue_relu, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(genstats_plausible(x_in, w_in, scale, shift, stride, padding, dilation, groups),
              "cudnn_conv_genstats: unsupported arguments (CUDA float16/bfloat16/float32 4-D x and weight of one "
              "dtype, groups 1, scale and shift both given or both absent, of C entries)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Spec spec = genstats_spec(x_in, w_in, scale, prologue_relu, stride, padding, dilation, groups);
  Prepared prepared = prepare("cudnn_conv_genstats", spec, x_in, w_in);
  const auto& entry = prepared.entry;
  const bool input_cl = prepared.input_cl, cl = prepared.cl;
  const at::Tensor &x = prepared.x, &w = prepared.w;
  at::Tensor y = prepared.y;
  const auto stat_opts = x.options().dtype(at::kFloat);
  at::Tensor sum = at::empty({spec.y[1]}, stat_opts), sqsum = at::empty({spec.y[1]}, stat_opts);
  std::unordered_map<int64_t, void*> pack{{kX, x.data_ptr()}, {kW, w.data_ptr()}, {kY, y.data_ptr()},
                                          {kSum, sum.data_ptr()}, {kSqSum, sqsum.data_ptr()}};
  at::Tensor s, t;
  if (spec.prologue) {
    s = operand(scale->to(at::kFloat), false);
    t = operand(shift->to(at::kFloat), false);
    pack[kScale] = s.data_ptr();
    pack[kShift] = t.data_ptr();
  }
  execute(*entry, pack, x);
  if (cl != input_cl) y = y.contiguous(input_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return {y, sum, sqsum};
}

std::string cudnn_frontend_version() {
  return std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." + std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_PATCH_VERSION);
}

int64_t cudnn_compiled_version() { return CUDNN_VERSION; }

}  // namespace fastres

#endif  // FASTRES_WITH_CUDNN_GRAPHS
