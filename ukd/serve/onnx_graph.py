"""Converts a JAX function to an ONNX model: ukd's networks for runtimes without JAX.

`to_onnx(fn, example)` traces `fn` (one float array [N, ...] in, one out, weights closed
over) to a jaxpr and writes one ONNX node, or a few, per primitive.  Whatever does not
depend on the input (the weights, the batch norms' scale and shift computed from their
parameters and running statistics) is evaluated here once and stored as initializers.
With `batch_dynamic` the trace runs on a symbolic batch size, so every shape that
follows the batch is known to do so: the graph takes any N, and a function whose trace
would bake the example's N into the graph fails here instead of answering wrongly.

The primitives covered are those the 2D and 3D networks trace to (convolutions dilated
and transposed, max pooling, batch norm, leaky ReLU, depth-to-space, softmax) and a few
more of their kind; any other raises NotImplementedError naming it.  jax2onnx covers
far more, but pins orbax-checkpoint below 0.11.37 (ukd needs 0.12) and pulls in
equinox, huggingface-hub and netron; ukd's own two networks need only this much.
"""

from collections.abc import Callable, Sequence

import jax
import numpy as np
import onnx
from jax.extend import core as jax_core
from onnx import helper, numpy_helper

BATCH = "batch"  # the name of the symbolic first dimension of the graph's input and output
MIN_OPSET = 15  # Shape(start, end), Unsqueeze/Squeeze/ReduceSum with axes as inputs

# Primitives that call a sub-jaxpr (jax.jit, jax.checkpoint, custom derivatives), and the
# parameter that holds it; only the forward computation is exported.  A platform-dependent
# computation (`lax.platform_dependent`: `platform_index`, then `cond`) exports its default
# branch, the one meant for any platform; all its branches compute the same function.
CALLS = {
  "jit": "jaxpr",
  "remat2": "jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
}
UNARY = {
  "exp": "Exp",
  "log": "Log",
  "neg": "Neg",
  "abs": "Abs",
  "sqrt": "Sqrt",
  "tanh": "Tanh",
  "logistic": "Sigmoid",
}
BINARY = {
  "add": "Add",
  "sub": "Sub",
  "mul": "Mul",
  "div": "Div",
  "max": "Max",
  "min": "Min",
  "ge": "GreaterOrEqual",
  "gt": "Greater",
  "le": "LessOrEqual",
  "lt": "Less",
  "eq": "Equal",
}
REDUCE = {"reduce_max": "ReduceMax", "reduce_min": "ReduceMin", "reduce_sum": "ReduceSum"}


def _unsupported(eqn, why: str = "") -> NotImplementedError:
  params = {k: v for k, v in eqn.params.items() if "jaxpr" not in k}
  reason = f" ({why})" if why else ""
  return NotImplementedError(
    f"to_onnx: primitive {eqn.primitive.name!r} has no ONNX conversion{reason}; params {params}"
  )


def _concrete(shape) -> bool:
  return all(isinstance(d, int | np.integer) for d in shape)


class _Graph:
  """The ONNX graph being built: nodes, initializers and the graph input's batch size."""

  def __init__(self, opset: int, batch):
    self.opset = opset
    self.batch = batch  # the symbolic batch dimension of the trace (None: a fixed batch)
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._consts: dict[int, tuple[np.ndarray, str]] = {}
    self._batch_size = None
    self._count = 0

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def tensor(self, value) -> str:
    """The name of a value: a tensor's name as is, a constant's initializer (made once)."""
    if isinstance(value, str):
      return value
    key = id(value)
    if key not in self._consts:
      name = self.fresh("const")
      self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
      self._consts[key] = (value, name)  # holding the array keeps its id unique
    return self._consts[key][1]

  def op(self, op_type: str, inputs: Sequence, **attrs) -> str:
    out = self.fresh(op_type.lower())
    names = [self.tensor(x) for x in inputs]
    self.nodes.append(helper.make_node(op_type, names, [out], name=out, **attrs))
    return out

  def shape(self, dims) -> str | np.ndarray:
    """A shape as an int64 tensor; a symbolic entry is the input's batch size, read at run
    time."""
    if _concrete(dims):
      return np.asarray(dims, np.int64)
    if any(d != self.batch for d in dims if not isinstance(d, int | np.integer)):
      raise NotImplementedError(f"to_onnx: shape {dims} has a dimension other than {BATCH!r}")
    if self._batch_size is None:
      self._batch_size = self.op("Shape", ["input"], start=0, end=1)
    parts = [self._batch_size if d == self.batch else np.asarray([d], np.int64) for d in dims]
    return self.op("Concat", parts, axis=0)


def _literal(atom) -> np.ndarray:
  return np.asarray(atom.val, atom.aval.dtype)


def _run(g: _Graph, jaxpr, consts: Sequence, args: Sequence) -> list:
  """Evaluates `jaxpr` with values that are numpy arrays (constants) or tensor names."""
  env = {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda atom: _literal(atom) if isinstance(atom, jax_core.Literal) else env[atom]
  for eqn in jaxpr.eqns:
    outs = _eqn(g, eqn, [read(a) for a in eqn.invars])
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


def _fold(eqn, ins: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Computes a primitive (not a call) of constants with JAX itself (transfers explicit)."""
  outs = eqn.primitive.bind(*jax.device_put(list(ins)), **eqn.params)
  outs = outs if eqn.primitive.multiple_results else [outs]
  return [np.asarray(o) for o in jax.device_get(list(outs))]


def _inline(g: _Graph, sub, ins: list) -> list:
  """A called jaxpr (closed or not) translated in place, on the caller's inputs."""
  if isinstance(sub, jax_core.ClosedJaxpr):
    return _run(g, sub.jaxpr, [np.asarray(c) for c in jax.device_get(sub.consts)], ins)
  return _run(g, sub, [], ins)


def _eqn(g: _Graph, eqn, ins: list) -> list:
  name = eqn.primitive.name
  if name in CALLS:  # a call of constants folds equation by equation inside
    return _inline(g, eqn.params[CALLS[name]], ins)
  if name == "platform_index":  # `lax.platform_dependent`: the graph takes the default branch
    if None not in eqn.params["platforms"]:
      raise _unsupported(eqn, "no default branch")
    return [np.asarray(eqn.params["platforms"].index(None), np.int32)]
  if name == "cond" and isinstance(ins[0], np.ndarray):  # a known branch: inlined
    return _inline(g, eqn.params["branches"][int(ins[0])], ins[1:])
  constant = all(isinstance(x, np.ndarray) for x in ins)
  if constant and all(_concrete(v.aval.shape) for v in eqn.outvars):
    return _fold(eqn, ins)
  if name == "stop_gradient":
    return ins
  if name in UNARY:
    return [g.op(UNARY[name], ins)]
  if name in BINARY:
    return [g.op(BINARY[name], ins)]
  if name in REDUCE:
    return [_reduce(g, eqn, ins[0])]
  if name == "split":
    return _split(g, eqn, ins[0])
  if name not in RULES:
    raise _unsupported(eqn)
  return [RULES[name](g, eqn, *ins)]


def _reduce(g: _Graph, eqn, x) -> str:
  op = REDUCE[eqn.primitive.name]
  axes = np.asarray(eqn.params["axes"], np.int64)
  if op == "ReduceSum" or g.opset >= 18:  # axes became an input in opset 13 / 18
    return g.op(op, [x, axes], keepdims=0)
  return g.op(op, [x], axes=axes.tolist(), keepdims=0)


def _rsqrt(g, eqn, x):
  return g.op("Reciprocal", [g.op("Sqrt", [x])])


def _integer_pow(g, eqn, x):
  return g.op("Pow", [x, np.asarray(eqn.params["y"], eqn.invars[0].aval.dtype)])


def _convert_element_type(g, eqn, x):
  dtype = np.dtype(eqn.params["new_dtype"])
  if dtype == eqn.invars[0].aval.dtype:
    return x
  return g.op("Cast", [x], to=helper.np_dtype_to_tensor_dtype(dtype))


def _select_n(g, eqn, which, *cases):
  if len(cases) != 2:
    raise _unsupported(eqn, f"{len(cases)} cases; only 2 are")
  if eqn.invars[0].aval.dtype != np.bool_:
    which = g.op("Cast", [which], to=onnx.TensorProto.BOOL)
  return g.op("Where", [which, cases[1], cases[0]])


def _broadcast_in_dim(g, eqn, x):
  shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
  new = [i for i in range(len(shape)) if i not in kept]
  if new:
    x = g.op("Unsqueeze", [x, np.asarray(new, np.int64)])
  have = [1] * len(shape)
  for i, d in zip(kept, eqn.invars[0].aval.shape):
    have[i] = d
  # Expand broadcasts like numpy: 1 keeps a dimension the operand already has.
  target = [1 if h == t else t for h, t in zip(have, shape)]
  if all(t == 1 for t in target):
    return x
  return g.op("Expand", [x, g.shape(target)])


def _reshape(g, eqn, x):
  if eqn.params.get("dimensions") is not None:
    raise _unsupported(eqn, "reshape with dimensions")
  sizes = list(eqn.params["new_sizes"])
  symbolic = [i for i, d in enumerate(sizes) if not isinstance(d, int | np.integer)]
  if len(symbolic) == 1:  # the batch (or a multiple of it): inferred from the element count
    sizes[symbolic[0]] = -1
  return g.op("Reshape", [x, g.shape(sizes)])


def _transpose(g, eqn, x):
  return g.op("Transpose", [x], perm=list(eqn.params["permutation"]))


def _squeeze(g, eqn, x):
  return g.op("Squeeze", [x, np.asarray(eqn.params["dimensions"], np.int64)])


def _rev(g, eqn, x):
  """Reversal (jnp.flip, mirroring TTA) as a Slice with step -1 along each axis."""
  axes = np.asarray(eqn.params["dimensions"], np.int64)
  starts = np.full(len(axes), -1, np.int64)
  ends = np.full(len(axes), np.iinfo(np.int64).min, np.int64)
  return g.op("Slice", [x, starts, ends, axes, np.full(len(axes), -1, np.int64)])


def _slice(g, eqn, x):
  """A static slice (the im2col windows of `ukd.models.conv_grads`), on the axes it cuts."""
  starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
  steps = eqn.params["strides"] or (1,) * len(starts)
  shape = eqn.invars[0].aval.shape
  axes = [
    a
    for a, (lo, hi, n, st) in enumerate(zip(starts, limits, shape, steps))
    if (lo, hi, st) != (0, n, 1)
  ]
  if any(not _concrete((starts[a], limits[a])) for a in axes):
    raise _unsupported(eqn, "a symbolic bound")
  cut = lambda values: np.asarray([values[a] for a in axes], np.int64)
  return g.op("Slice", [x, cut(starts), cut(limits), np.asarray(axes, np.int64), cut(steps)])


def _split(g, eqn, x) -> list[str]:
  """jnp.split: equal parts (as ONNX splits without sizes) or fixed sizes."""
  sizes = list(eqn.params["sizes"])
  outs = [g.fresh("split") for _ in sizes]
  inputs = [g.tensor(x)]
  if _concrete(sizes):
    inputs.append(g.tensor(np.asarray(sizes, np.int64)))
  elif any(d != sizes[0] for d in sizes):
    raise _unsupported(eqn, "unequal symbolic sizes")
  attrs = {"num_outputs": len(sizes)} if g.opset >= 18 and len(inputs) == 1 else {}
  g.nodes.append(
    helper.make_node("Split", inputs, outs, name=outs[0], axis=eqn.params["axis"], **attrs)
  )
  return outs


def _concatenate(g, eqn, *xs):
  return g.op("Concat", xs, axis=eqn.params["dimension"])


def _pad(g, eqn, x, value):
  config = eqn.params["padding_config"]
  if any(interior for _, _, interior in config):
    raise _unsupported(eqn, "interior padding")
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]  # negative: crops
  return g.op("Pad", [x, np.asarray(pads, np.int64), value], mode="constant")


def _dot_general(g, eqn, lhs, rhs):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  preferred = eqn.params.get("preferred_element_type")
  if preferred is not None and np.dtype(preferred) != eqn.invars[0].aval.dtype:
    raise _unsupported(eqn, "an output dtype other than the operands'")
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  left = [next(letters) for _ in eqn.invars[0].aval.shape]
  right = [next(letters) for _ in eqn.invars[1].aval.shape]
  for i, j in zip((*lc, *lb), (*rc, *rb)):
    right[j] = left[i]
  free_l = [c for i, c in enumerate(left) if i not in (*lc, *lb)]
  free_r = [c for j, c in enumerate(right) if j not in (*rc, *rb)]
  out = [left[i] for i in lb] + free_l + free_r
  equation = f"{''.join(left)},{''.join(right)}->{''.join(out)}"
  return g.op("Einsum", [lhs, rhs], equation=equation)


def _conv_general_dilated(g, eqn, x, kernel):
  """JAX's convolution in any layout -> Transpose to N,C,spatial; Conv or ConvTranspose;
  Transpose back."""
  p = eqn.params
  if not isinstance(kernel, np.ndarray):
    raise _unsupported(eqn, "a kernel computed from the input")
  if p["batch_group_count"] != 1:
    raise _unsupported(eqn, "batch_group_count > 1")
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  x = g.op("Transpose", [x], perm=list(lhs_spec))
  kernel = kernel.transpose(rhs_spec)  # [out features, in features, *spatial]
  lo, hi = (list(side) for side in zip(*p["padding"]))
  strides, dilations = list(p["window_strides"]), list(p["rhs_dilation"])
  base = list(p["lhs_dilation"])
  if all(b == 1 for b in base):
    if min(lo + hi) < 0:
      raise _unsupported(eqn, "negative padding")
    y = g.op(
      "Conv",
      [x, kernel],
      strides=strides,
      pads=lo + hi,
      dilations=dilations,
      group=p["feature_group_count"],
    )
  else:
    y = _dilated_input_conv(g, eqn, x, kernel, base, lo, hi)
  return g.op("Transpose", [y], perm=np.argsort(out_spec).tolist())


def _dilated_input_conv(g, eqn, x, kernel, base, lo, hi):
  """A convolution of the input dilated by `base` (a transposed convolution, as Flax's
  ConvTranspose traces to) as an ONNX ConvTranspose.

  JAX correlates the dilated, padded input with the kernel: y[o] = sum_k x[(o + k d - lo)
  / s] w[k].  ConvTranspose scatters: y[i s + k d - begin] += x[i] w[k], so the kernel is
  flipped and begin = (K - 1) d - lo; an end that would be negative (JAX pads more than
  the kernel reaches) becomes output_padding, the zeros ONNX appends at the end."""
  p = eqn.params
  dilations = list(p["rhs_dilation"])
  if any(s != 1 for s in p["window_strides"]) or p["feature_group_count"] != 1:
    raise _unsupported(eqn, "input dilation with window strides or feature groups")
  reach = [(k - 1) * d for k, d in zip(kernel.shape[2:], dilations)]
  begin = [r - low for r, low in zip(reach, lo)]
  end = [r - high for r, high in zip(reach, hi)]
  extra = [max(0, -e) for e in end]
  if min(begin) < 0 or any(e >= s for e, s in zip(extra, base)):
    raise _unsupported(eqn, "input dilation with padding beyond the kernel's reach")
  spatial = tuple(range(2, kernel.ndim))
  weights = np.ascontiguousarray(np.flip(kernel, spatial).swapaxes(0, 1))  # [in, out, ...]
  return g.op(
    "ConvTranspose",
    [x, weights],
    strides=base,
    pads=begin + [max(0, e) for e in end],
    output_padding=extra,
    dilations=dilations,
  )


def _reduce_window_max(g, eqn, x):
  """Max pooling over the axes between the first (batch) and the last (channels)."""
  p = eqn.params
  window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
  ends = (0, len(window) - 1)
  if (
    any(d != 1 for d in p["base_dilation"])
    or any(window[i] != 1 or strides[i] != 1 or padding[i] != (0, 0) for i in ends)
    or len(window) < 3
  ):
    raise _unsupported(eqn, "a window over the batch or channel axis, or base dilation")
  channels_first = [0, len(window) - 1, *range(1, len(window) - 1)]
  x = g.op("Transpose", [x], perm=channels_first)
  y = g.op(
    "MaxPool",
    [x],
    kernel_shape=list(window[1:-1]),
    strides=list(strides[1:-1]),
    pads=[lo for lo, _ in padding[1:-1]] + [hi for _, hi in padding[1:-1]],
    dilations=list(p["window_dilation"][1:-1]),
  )
  return g.op("Transpose", [y], perm=np.argsort(channels_first).tolist())


RULES: dict[str, Callable] = {
  "rsqrt": _rsqrt,
  "integer_pow": _integer_pow,
  "convert_element_type": _convert_element_type,
  "select_n": _select_n,
  "broadcast_in_dim": _broadcast_in_dim,
  "reshape": _reshape,
  "transpose": _transpose,
  "squeeze": _squeeze,
  "concatenate": _concatenate,
  "rev": _rev,
  "slice": _slice,
  "pad": _pad,
  "dot_general": _dot_general,
  "conv_general_dilated": _conv_general_dilated,
  "reduce_window_max": _reduce_window_max,
}


def _value_info(name: str, aval, batch) -> onnx.ValueInfoProto:
  dims = [BATCH if batch is not None and d == batch else d for d in aval.shape]
  dims = [d if isinstance(d, str | int | np.integer) else str(d) for d in dims]
  return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(aval.dtype), dims)


def to_onnx(
  fn: Callable[[jax.Array], jax.Array],
  example: np.ndarray,
  *,
  batch_dynamic: bool = True,
  opset: int = 17,
  name: str = "ukd",
) -> onnx.ModelProto:
  """The ONNX model of `fn`: input 'input' shaped like `example`, output 'output'.

  Args:
    fn: one array [N, ...] to one array [N, ...]; whatever else it uses (the weights) is
      closed over and becomes initializers.
    example: an input of the right shape and dtype past the batch axis (its values are
      not used).
    batch_dynamic: axis 0 of the input and output is the symbolic 'batch'; else fixed at
      the example's N.
    opset: the ONNX opset (at least 15).
    name: the graph's name.

  Raises:
    NotImplementedError: `fn` uses a primitive, or parameters of one, with no conversion.
  """
  if opset < MIN_OPSET:
    raise ValueError(f"opset {opset} is below the {MIN_OPSET} this converter emits")
  example = np.asarray(example)
  batch = jax.export.symbolic_shape(BATCH)[0] if batch_dynamic else None
  shape = (batch, *example.shape[1:]) if batch_dynamic else example.shape
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, example.dtype))
  if len(closed.jaxpr.invars) != 1 or len(closed.jaxpr.outvars) != 1:
    raise ValueError("to_onnx: fn must take one array and return one array")
  g = _Graph(opset, batch)
  consts = [np.asarray(c) for c in jax.device_get(closed.consts)]
  (out,) = _run(g, closed.jaxpr, consts, ["input"])
  g.nodes.append(helper.make_node("Identity", [g.tensor(out)], ["output"], name="output"))
  graph = helper.make_graph(
    g.nodes,
    name,
    [_value_info("input", closed.jaxpr.invars[0].aval, batch)],
    [_value_info("output", closed.jaxpr.outvars[0].aval, batch)],
    g.initializers,
  )
  return helper.make_model(
    graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ukd"
  )
