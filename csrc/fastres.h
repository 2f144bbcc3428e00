// Declarations shared by the registration file and the kernel files of fastres._C.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastres {

// relu(x + residual), CPU. Same shape, dtype and memory format out as x.
at::Tensor add_relu_cpu(const at::Tensor& x, const at::Tensor& residual);

}  // namespace fastres
