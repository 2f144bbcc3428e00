// cuDNN graphs (cudnn-frontend graph API), one fused kernel per call where cuDNN has an engine:
//
//   cudnn_conv_bias_act:  y = [relu](conv(x, W) + bias + residual)          inference epilogue
//   cudnn_conv_genstats:  y = conv([relu](x * scale + shift), W), and the per-channel sum and
//                         sum of squares of y computed in the conv's epilogue (NormConv training:
//                         the previous BN's apply becomes this conv's prologue)
//   cudnn_conv_wgrad:     dW = wgrad(dy, [relu](x * scale + shift)): the weight gradient of a NormConv
//                         conv, its prologue recomputed from the saved raw x as the tiles are loaded
//                         (cuDNN's ConvBNwgrad pattern)
//   cudnn_conv_dgrad_drelu: gz = dgrad(dy, W) * (x * scale + shift > 0), with sum(gz * x) and sum(gz)
//                         per channel from the same kernel (cuDNN's DgradDreluBNBwdWeight pattern):
//                         the input gradient of a NormConv conv through its ReLU, and the gradients of
//                         the prologue's scale and shift
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
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
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

enum Uid : int64_t {
  kX = 1, kW, kBias, kResidual, kY, kScale, kShift, kSum, kSqSum,
  kGrad, kMean, kInvVar, kEqScaleDy, kEqScaleX, kEqBias
};

// The four graphs. The cache key starts with the kind.
enum class Kind : int { kBiasAct, kGenstats, kWgrad, kDgradDrelu };

struct Entry {
  std::shared_ptr<fe::graph::Graph> graph;  // null: no engine for this signature
  int64_t workspace = 0;
  bool channels_last = false;   // the layout the graph was built for
  bool params_in_io_dtype = false;  // bias (bias_act) or scale/shift (wgrad) in x's dtype, not float32
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
  Kind kind = Kind::kBiasAct;
  at::ScalarType dtype = at::kFloat;
  int device = 0;
  std::vector<int64_t> x, w, y;  // conv input, weight and output shapes (wgrad / dgrad: dy is y-shaped)
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;
  bool bias = false, residual = false, relu = false;        // bias_act
  bool prologue = false, prologue_relu = false;  // genstats / wgrad / dgrad: scale/shift (+ relu) on x
  bool allow_tf32 = false, deterministic = false;

  std::string key(bool channels_last, bool params_io) const {
    std::ostringstream s;
    s << static_cast<int>(kind) << '|' << static_cast<int>(dtype) << '|' << device << '|' << channels_last << '|'
      << params_io << '|';
    for (auto v : x) s << v << ',';
    s << '|';
    for (auto v : w) s << v << ',';
    s << '|' << stride[0] << ',' << stride[1] << ',' << padding[0] << ',' << padding[1] << ',' << dilation[0] << ','
      << dilation[1] << ',' << groups << '|' << bias << residual << relu << prologue << prologue_relu << allow_tf32
      << deterministic;
    return s.str();
  }
};

using TensorPtr = std::shared_ptr<fe::graph::Tensor_attributes>;

// A per-channel (1, c, 1, 1) graph input.
TensorPtr channel_input(fe::graph::Graph& g, const char* name, int64_t uid, int64_t c, fe::DataType_t type) {
  return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim({1, c, 1, 1})
                      .set_stride({c, 1, 1, 1}).set_data_type(type));
}

TensorPtr pointwise(fe::graph::Graph& g, const char* name, fe::PointwiseMode_t mode, TensorPtr a,
                    TensorPtr b = nullptr) {
  auto attributes = fe::graph::Pointwise_attributes().set_name(name).set_mode(mode)
                        .set_compute_data_type(fe::DataType_t::FLOAT);
  return b ? g.pointwise(a, b, attributes) : g.pointwise(a, attributes);
}

// x * scale + shift on the conv's input (the previous BN's apply): the pre-activation.
TensorPtr prologue_affine(fe::graph::Graph& g, TensorPtr x, int64_t c, fe::DataType_t type) {
  auto scaled = pointwise(g, "scale", fe::PointwiseMode_t::MUL, x, channel_input(g, "scale", kScale, c, type));
  return pointwise(g, "shift", fe::PointwiseMode_t::ADD, scaled, channel_input(g, "shift", kShift, c, type));
}

// The graph of spec's kind, its tensors in `channels_last` or NCHW, bias / prologue parameters in
// the io dtype when params_io (else float32). Returns the graph; throws what cuDNN said when it
// cannot build one (the caller records that as "not covered").
std::shared_ptr<fe::graph::Graph> graph_for(const Spec& spec, bool channels_last, bool params_io,
                                            fe::DataType_t io) {
  const auto f32 = fe::DataType_t::FLOAT;
  const auto param_type = params_io ? io : f32;
  const int64_t cin = spec.x[1], cout = spec.y[1];
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(io).set_intermediate_data_type(f32).set_compute_data_type(f32);
  auto image = [&](const char* name, int64_t uid, const std::vector<int64_t>& dims) {
    return g->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(dims)
                         .set_stride(dense_strides(dims, channels_last)).set_data_type(io));
  };
  auto as_output = [&](TensorPtr t, int64_t uid, const std::vector<int64_t>& dims, fe::DataType_t type) {
    t->set_output(true).set_uid(uid).set_dim(dims).set_stride(dense_strides(dims, channels_last)).set_data_type(type);
  };
  // Per-channel outputs (statistics, parameter gradients): float32, (1, c, 1, 1) packed.
  auto channel_output = [&](TensorPtr t, int64_t uid, int64_t c) {
    t->set_output(true).set_uid(uid).set_dim({1, c, 1, 1}).set_stride({c, 1, 1, 1}).set_data_type(f32);
  };
  auto X = image("x", kX, spec.x);
  // The conv's input: x, or relu?(x * scale + shift) recomputed from the raw x.
  auto activation = [&]() {
    if (!spec.prologue) return X;
    auto pre = prologue_affine(*g, X, cin, param_type);
    return spec.prologue_relu ? pointwise(*g, "prologue_relu", fe::PointwiseMode_t::RELU_FWD, pre) : pre;
  };
  switch (spec.kind) {
    case Kind::kBiasAct: {
      auto W = image("w", kW, spec.w);
      auto Y = g->conv_fprop(X, W, fe::graph::Conv_fprop_attributes().set_name("conv").set_padding(spec.padding)
                                       .set_stride(spec.stride).set_dilation(spec.dilation)
                                       .set_compute_data_type(f32));
      auto out = Y;
      if (spec.bias)
        out = pointwise(*g, "bias", fe::PointwiseMode_t::ADD, out, channel_input(*g, "bias", kBias, cout, param_type));
      if (spec.residual) out = pointwise(*g, "residual", fe::PointwiseMode_t::ADD, out, image("residual", kResidual, spec.y));
      if (spec.relu) out = pointwise(*g, "relu", fe::PointwiseMode_t::RELU_FWD, out);
      as_output(out, kY, spec.y, io);
      break;
    }
    case Kind::kGenstats: {
      auto W = image("w", kW, spec.w);
      auto Y = g->conv_fprop(activation(), W, fe::graph::Conv_fprop_attributes().set_name("conv")
                                                  .set_padding(spec.padding).set_stride(spec.stride)
                                                  .set_dilation(spec.dilation).set_compute_data_type(f32));
      as_output(Y, kY, spec.y, io);
      auto stats = g->genstats(Y, fe::graph::Genstats_attributes().set_name("genstats").set_compute_data_type(f32));
      channel_output(stats[0], kSum, cout);
      channel_output(stats[1], kSqSum, cout);
      break;
    }
    case Kind::kWgrad: {
      auto DY = image("dy", kGrad, spec.y);
      auto DW = g->conv_wgrad(DY, activation(), fe::graph::Conv_wgrad_attributes().set_name("wgrad")
                                                    .set_padding(spec.padding).set_stride(spec.stride)
                                                    .set_dilation(spec.dilation).set_compute_data_type(f32));
      as_output(DW, kW, spec.w, io);
      break;
    }
    case Kind::kDgradDrelu: {
      // gz = dgrad(dy, W) masked where the recomputed pre-activation x * scale + shift is <= 0, and
      // dbn_weight's per-channel sums of gz * (x - mean) * invvar and of gz. With mean 0 and invvar 1
      // (the prologue is one affine, not a normalisation) they are sum(gz * x) and sum(gz): the
      // gradients of scale and shift. dbn_weight's three "equivalent scale" outputs are unused.
      auto DY = image("dy", kGrad, spec.y);
      auto W = image("w", kW, spec.w);
      auto DA = g->conv_dgrad(DY, W, fe::graph::Conv_dgrad_attributes().set_name("dgrad").set_padding(spec.padding)
                                         .set_stride(spec.stride).set_dilation(spec.dilation)
                                         .set_compute_data_type(f32));
      DA->set_dim(spec.x);
      auto mean = channel_input(*g, "mean", kMean, cin, f32);
      auto invvar = channel_input(*g, "invvar", kInvVar, cin, f32);
      auto centred = pointwise(*g, "centre", fe::PointwiseMode_t::SUB, X, mean);
      auto normed = pointwise(*g, "normalise", fe::PointwiseMode_t::MUL, centred, invvar);
      auto scale = channel_input(*g, "scale", kScale, cin, f32);
      auto scaled = pointwise(*g, "scale", fe::PointwiseMode_t::MUL, normed, scale);
      auto pre = pointwise(*g, "shift", fe::PointwiseMode_t::ADD, scaled,
                           channel_input(*g, "shift", kShift, cin, f32));
      auto GZ = pointwise(*g, "drelu", fe::PointwiseMode_t::RELU_BWD, DA, pre);
      as_output(GZ, kY, spec.x, io);
      auto [dscale, dshift, eq_dy, eq_x, eq_bias] =
          g->dbn_weight(GZ, X, mean, invvar, scale, fe::graph::DBN_weight_attributes().set_name("dbn"));
      channel_output(dscale, kSqSum, cin);  // sum(gz * x)
      channel_output(dshift, kSum, cin);    // sum(gz)
      channel_output(eq_dy, kEqScaleDy, cin);
      channel_output(eq_x, kEqScaleX, cin);
      channel_output(eq_bias, kEqBias, cin);
      break;
    }
  }
  return g;
}

std::shared_ptr<const Entry> build(const Spec& spec, bool channels_last, bool params_io) {
  auto entry = std::make_shared<Entry>();
  entry->channels_last = channels_last;
  entry->params_in_io_dtype = params_io;
  auto fail = [&](const std::string& why) {
    entry->graph = nullptr;
    entry->why = why;
    return entry;
  };
  fe::DataType_t io;
  if (!io_dtype(spec.dtype, io)) return fail("dtype not float16, bfloat16 or float32");
  try {
    auto g = graph_for(spec, channels_last, params_io, io);
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

// The cached entry for spec: the first layout / parameter-dtype variant cuDNN can build (the input's
// own layout first, then channels_last, where the fused runtime engines live; bias or the wgrad
// prologue's scale/shift in float32 first, then in the io dtype, as cuDNN's ConvBNwgrad sample has it).
std::shared_ptr<const Entry> lookup(const Spec& spec, bool channels_last_input) {
  std::vector<bool> layouts{channels_last_input};
  if (!channels_last_input) layouts.push_back(true);
  std::vector<bool> param_variants{false};
  const bool io_params = (spec.kind == Kind::kBiasAct && spec.bias) || (spec.kind == Kind::kWgrad && spec.prologue);
  if (io_params && spec.dtype != at::kFloat) param_variants.push_back(true);
  std::shared_ptr<const Entry> last;
  for (bool cl : layouts) {
    for (bool params_io : param_variants) {
      const std::string key = spec.key(cl, params_io);
      std::shared_ptr<const Entry> entry;
      {
        std::lock_guard<std::mutex> lock(cache_mutex);
        auto it = cache.find(key);
        if (it != cache.end()) entry = it->second;
      }
      if (!entry) {
        entry = build(spec, cl, params_io);
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

Spec make_spec(Kind kind, const at::Tensor& x, at::IntArrayRef w, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "fastres cuDNN graphs: stride, padding and dilation must have two entries");
  Spec s;
  s.kind = kind;
  s.dtype = x.scalar_type();
  s.device = x.get_device();
  s.x = x.sizes().vec();
  s.w = w.vec();
  s.y = conv_out_shape(x.sizes(), w, stride, padding, dilation);
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
  Spec s = make_spec(Kind::kBiasAct, x, w.sizes(), stride, padding, dilation, groups);
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
    b = operand(bias->to(entry->params_in_io_dtype ? spec.dtype : at::kFloat), cl);
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
  Spec s = make_spec(Kind::kGenstats, x, w.sizes(), stride, padding, dilation, groups);
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

namespace {

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The backward graphs' calls: dy of conv(x, W)'s output shape, W of w_sizes, both float dtypes of x.
bool backward_plausible(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef w_sizes, const OptTensor& scale,
                        const OptTensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups) {
  if (!x.is_cuda() || grad.device() != x.device() || x.dim() != 4 || grad.dim() != 4 || w_sizes.size() != 4 ||
      groups != 1 || w_sizes[1] != x.size(1) || x.numel() == 0 || grad.numel() == 0 ||
      grad.scalar_type() != x.scalar_type() || stride.size() != 2 || padding.size() != 2 || dilation.size() != 2)
    return false;
  const auto t = x.scalar_type();
  if (t != at::kHalf && t != at::kBFloat16 && t != at::kFloat) return false;
  if (grad.sizes() != at::IntArrayRef(conv_out_shape(x.sizes(), w_sizes, stride, padding, dilation))) return false;
  const bool has_scale = scale.has_value() && scale->defined(), has_shift = shift.has_value() && shift->defined();
  if (has_scale != has_shift) return false;
  if (has_scale && (scale->numel() != x.size(1) || shift->numel() != x.size(1) || scale->device() != x.device() ||
                    shift->device() != x.device()))
    return false;
  return true;
}

Spec wgrad_spec(const at::Tensor& x, at::IntArrayRef w_sizes, const OptTensor& scale, bool prologue_relu,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Spec s = make_spec(Kind::kWgrad, x, w_sizes, stride, padding, dilation, groups);
  s.prologue = scale.has_value() && scale->defined();
  s.prologue_relu = s.prologue && prologue_relu;
  return s;
}

bool dgrad_plausible(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& x, const at::Tensor& scale,
                     const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, int64_t groups) {
  return w.dim() == 4 && w.device() == x.device() && w.scalar_type() == x.scalar_type() && scale.defined() &&
         shift.defined() && backward_plausible(grad, x, w.sizes(), scale, shift, stride, padding, dilation, groups);
}

Spec dgrad_spec(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups) {
  Spec s = make_spec(Kind::kDgradDrelu, x, w.sizes(), stride, padding, dilation, groups);
  s.prologue = s.prologue_relu = true;
  return s;
}

}  // namespace

bool cudnn_conv_wgrad_supported(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef weight_size,
                                const OptTensor& scale, const OptTensor& shift, bool prologue_relu,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  if (!backward_plausible(grad, x, weight_size, scale, shift, stride, padding, dilation, groups)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  return lookup(wgrad_spec(x, weight_size, scale, prologue_relu, stride, padding, dilation, groups),
                is_channels_last(x))->graph != nullptr;
}

at::Tensor cudnn_conv_wgrad(const at::Tensor& grad_in, const at::Tensor& x_in, at::IntArrayRef weight_size,
                            const OptTensor& scale, const OptTensor& shift, bool prologue_relu, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(backward_plausible(grad_in, x_in, weight_size, scale, shift, stride, padding, dilation, groups),
              "cudnn_conv_wgrad: unsupported arguments (CUDA float16/bfloat16/float32 4-D grad and x of one dtype, "
              "grad of the conv's output shape, groups 1, scale and shift both given or both absent, of C entries)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Spec spec = wgrad_spec(x_in, weight_size, scale, prologue_relu, stride, padding, dilation, groups);
  const bool input_cl = is_channels_last(x_in);
  const auto entry = lookup(spec, input_cl);
  TORCH_CHECK(entry->graph, "cudnn_conv_wgrad: cuDNN has no engine for this call (ask cudnn_conv_wgrad_supported "
              "first): ", entry->why);
  const bool cl = entry->channels_last;
  const at::Tensor x = operand(x_in, cl), dy = operand(grad_in, cl);
  at::Tensor dw = at::empty(weight_size, x.options(), format_of(cl));
  std::unordered_map<int64_t, void*> pack{{kX, x.data_ptr()}, {kGrad, dy.data_ptr()}, {kW, dw.data_ptr()}};
  at::Tensor s, t;
  if (spec.prologue) {
    const auto param_dtype = entry->params_in_io_dtype ? spec.dtype : at::kFloat;
    s = operand(scale->to(param_dtype), false);
    t = operand(shift->to(param_dtype), false);
    pack[kScale] = s.data_ptr();
    pack[kShift] = t.data_ptr();
  }
  execute(*entry, pack, x);
  return cl == input_cl ? dw : dw.contiguous(format_of(input_cl));
}

bool cudnn_conv_dgrad_drelu_supported(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& x,
                                      const at::Tensor& scale, const at::Tensor& shift, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  if (!dgrad_plausible(grad, w, x, scale, shift, stride, padding, dilation, groups)) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  return lookup(dgrad_spec(x, w, stride, padding, dilation, groups), is_channels_last(x))->graph != nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cudnn_conv_dgrad_drelu(
    const at::Tensor& grad_in, const at::Tensor& w_in, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  TORCH_CHECK(dgrad_plausible(grad_in, w_in, x_in, scale, shift, stride, padding, dilation, groups),
              "cudnn_conv_dgrad_drelu: unsupported arguments (CUDA float16/bfloat16/float32 4-D grad, weight and x "
              "of one dtype, grad of the conv's output shape, groups 1, scale and shift of C entries)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Spec spec = dgrad_spec(x_in, w_in, stride, padding, dilation, groups);
  const bool input_cl = is_channels_last(x_in);
  const auto entry = lookup(spec, input_cl);
  TORCH_CHECK(entry->graph, "cudnn_conv_dgrad_drelu: cuDNN has no engine for this call (ask "
              "cudnn_conv_dgrad_drelu_supported first): ", entry->why);
  const bool cl = entry->channels_last;
  const at::Tensor dy = operand(grad_in, cl), w = operand(w_in, cl), x = operand(x_in, cl);
  at::Tensor gz = at::empty(x.sizes(), x.options(), format_of(cl));
  const auto per_channel = x.options().dtype(at::kFloat);
  const int64_t c = x.size(1);
  // dbn_weight normalises with (mean, invvar): 0 and 1 here, see graph_for.
  const at::Tensor zeros = at::zeros({c}, per_channel), ones = at::ones({c}, per_channel);
  const at::Tensor s = operand(scale.to(at::kFloat), false), t = operand(shift.to(at::kFloat), false);
  at::Tensor dscale = at::empty({c}, per_channel), dshift = at::empty({c}, per_channel);
  at::Tensor unused = at::empty({3, c}, per_channel);
  std::unordered_map<int64_t, void*> pack{
      {kGrad, dy.data_ptr()},    {kW, w.data_ptr()},          {kX, x.data_ptr()},           {kY, gz.data_ptr()},
      {kMean, zeros.data_ptr()}, {kInvVar, ones.data_ptr()},  {kScale, s.data_ptr()},       {kShift, t.data_ptr()},
      {kSqSum, dscale.data_ptr()}, {kSum, dshift.data_ptr()}, {kEqScaleDy, unused[0].data_ptr()},
      {kEqScaleX, unused[1].data_ptr()}, {kEqBias, unused[2].data_ptr()}};
  execute(*entry, pack, x);
  if (cl != input_cl) gz = gz.contiguous(format_of(input_cl));
  return {gz, dscale, dshift};
}

std::string cudnn_frontend_version() {
  return std::to_string(CUDNN_FRONTEND_MAJOR_VERSION) + "." + std::to_string(CUDNN_FRONTEND_MINOR_VERSION) + "." +
         std::to_string(CUDNN_FRONTEND_PATCH_VERSION);
}

int64_t cudnn_compiled_version() { return CUDNN_VERSION; }

}  // namespace fastres

#endif  // FASTRES_WITH_CUDNN_GRAPHS
