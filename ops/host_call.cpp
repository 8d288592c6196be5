// host_call: one MLX primitive that runs a compiled C kernel (ops/gguf_cpu.c, ops/affine_cpu.c) on MLX's CPU
// stream, as a node of the graph. Called through ctypes instead, each kernel had to evaluate its input first:
// 89 round trips to MLX's thread per SmolLM2 token, and no overlap of graph building with computation.
//
// Built on first use by applelm/native_build.py (build_module) against the installed MLX's headers and
// nanobind, in MLX's nanobind domain so that mx.array crosses over as the same type.

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

// Every kernel's entry point: the inputs' data, the outputs' data, the integer arguments.
using Entry = int (*)(const void* const* in, void* const* out, const int64_t* args);

class HostCall : public mx::Primitive {
 public:
  HostCall(mx::Stream s, Entry fn, std::vector<int64_t> args, std::vector<int> strided)
      : mx::Primitive(s), fn_(fn), args_(std::move(args)), strided_(std::move(strided)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& encoder = mx::cpu::get_command_encoder(stream());
    // Graph-free copies (as MLX's own CPU ops take): they hold the buffers, not the graph, until the task ran.
    std::vector<mx::array> in, out;
    for (const auto& a : inputs) {
      encoder.set_input_array(a);
      in.push_back(mx::array::unsafe_weak_copy(a));
    }
    for (auto& o : outputs) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
      encoder.set_output_array(o);
      out.push_back(mx::array::unsafe_weak_copy(o));
    }
    // Inputs passed as views (not made contiguous): their element strides follow the arguments.
    std::vector<int64_t> args = args_;
    for (int i : strided_)
      for (auto st : inputs[i].strides()) args.push_back(static_cast<int64_t>(st));
    encoder.dispatch([fn = fn_, args = std::move(args), in = std::move(in), out = std::move(out)]() {
      std::vector<const void*> in_data;
      std::vector<void*> out_data;
      for (const auto& a : in) in_data.push_back(a.data<void>());
      for (const auto& o : out) out_data.push_back(const_cast<void*>(o.data<void>()));
      fn(in_data.data(), out_data.data(), args.data());
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("host_call runs on the CPU only");
  }

  const char* name() const override { return "HostCall"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const HostCall&>(other);
    return fn_ == o.fn_ && args_ == o.args_ && strided_ == o.strided_;
  }

 private:
  Entry fn_;
  std::vector<int64_t> args_;
  std::vector<int> strided_;
};

// float32 outputs of `shapes` computed by the entry point at address `fn` from `inputs` and `args`; lazy, on the
// default CPU stream. Inputs are made row-contiguous, except those listed in `strided`, which the entry point
// reads through the strides appended to its arguments.
std::vector<mx::array> host_call(uintptr_t fn, const std::vector<mx::array>& inputs,
                                 const std::vector<std::vector<int>>& shapes, const std::vector<int64_t>& args,
                                 const std::vector<int>& strided) {
  if (fn == 0 || shapes.empty()) throw std::invalid_argument("host_call: no entry point or no outputs");
  for (int i : strided)
    if (i < 0 || i >= static_cast<int>(inputs.size())) throw std::invalid_argument("host_call: no such input");
  auto s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> contiguous;
  for (size_t i = 0; i < inputs.size(); i++) {
    bool view = std::find(strided.begin(), strided.end(), static_cast<int>(i)) != strided.end();
    contiguous.push_back(view ? inputs[i] : mx::contiguous(inputs[i], false, s));
  }
  std::vector<mx::Shape> out_shapes;
  for (const auto& sh : shapes) out_shapes.emplace_back(sh.begin(), sh.end());
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(out_shapes), dtypes,
                                std::make_shared<HostCall>(s, reinterpret_cast<Entry>(fn), args, strided),
                                contiguous);
}

NB_MODULE(_host_call, m) {
  nb::module_::import_("mlx.core");
  m.def("host_call", &host_call, nb::arg("fn"), nb::arg("inputs"), nb::arg("shapes"), nb::arg("args"),
        nb::arg("strided") = std::vector<int>(),
        "float32 arrays of `shapes` computed on the CPU stream by the C entry point at address `fn`.");
}
