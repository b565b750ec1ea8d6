"""Parameter-efficient finetuning on a frozen base: the trainable subset, LoRA adapters, their merge.

A finetuned model is ``base`` (the full, frozen parameter tree) overlaid with a small trained tree:

    trained = {**select(base, trainable_patterns), "lora": init_lora(key, base, targets, rank)}
    student = merge(base, trained, lora_scale)          # a plain parameter tree (inference, export)

Paths are "/"-joined module names, e.g. ``"blocks_3/mlp/w12/kernel"``; patterns are regular
expressions searched in them (LakonLab's ``freeze_exclude`` keys are substrings, which are valid
patterns). LoRA follows PEFT as the reference uses it: for a Dense kernel W (in, out),
y = x W + b + scale * dropout(x) A B with A (in, r) ~ N(0, 1/r^2), B (r, out) = 0, scale = alpha / r
(the reference sets alpha = r, so scale = 1). At initialisation the student equals the base exactly.

Training applies LoRA without touching the base kernels, through :func:`lora_interceptor` (Flax
method interception on ``nn.Dense``), so LoRA dropout works and the frozen kernels are read, never
copied. The adapters travel as the variable collection ``"lora"`` next to ``"params"`` (same
module nesting), so a Dense layer inside ``nn.scan`` sees its own layer's slice: a scanned stack
of kernels (L, in, out) gets stacked adapters A (L, in, r), B (L, r, out). Inference folds the
adapters into the kernels (:func:`merge`), so samplers and exports see a plain tree. Both agree to
float32 round-off when dropout is off (tested).

    with lora_interceptor(scale=s, dropout=0.05):
      y = model.apply({"params": base, "lora": lora}, x, rngs={"lora_dropout": key})
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

LORA = "lora"   # key of the adapter tree inside the trained tree, and its variable collection
LORA_DROPOUT = "lora_dropout"   # the rng stream of LoRA dropout


def path_str(path) -> str:
  """'a/b/c' from a jax key path or a tuple of names."""
  names = []
  for k in path:
    names.append(str(getattr(k, "key", getattr(k, "name", k))))
  return "/".join(names)


def _matches(patterns: Sequence[str], path: str) -> bool:
  return any(re.search(p, path) for p in patterns)


def _set(tree: dict, names: Sequence[str], value):
  node = tree
  for n in names[:-1]:
    node = node.setdefault(n, {})
  node[names[-1]] = value


def _get(tree, names: Sequence[str]):
  node = tree
  for n in names:
    node = node[n]
  return node


def leaf_paths(tree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def select(params, patterns: Sequence[str]) -> dict:
  """The sub-tree (same nesting) of the leaves whose path matches any pattern."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if _matches(patterns, path_str(path)):
      _set(out, path_str(path).split("/"), leaf)
  return out


def check_patterns(params, trainable: Sequence[str], lora_targets: Sequence[str]) -> None:
  """Every pattern must match something: a typo would silently freeze (or never adapt) a layer."""
  paths = leaf_paths(params)
  dense = [p.rsplit("/", 1)[0] for p in paths if p.endswith("/kernel")]
  errors = [f"trainable pattern {p!r} matches no parameter" for p in trainable
            if not any(re.search(p, q) for q in paths)]
  errors += [f"LoRA target {p!r} matches no Dense layer" for p in lora_targets
             if not any(re.search(p, q) for q in dense)]
  if errors:
    raise ValueError("; ".join(errors) + f". Parameter paths look like {paths[:4]} ...")


def dense_kernels(params, targets: Sequence[str]) -> dict[str, Any]:
  """{module path: kernel} of every Dense kernel (in, out), or stack of them (L..., in, out) from
  ``nn.scan``, whose module path matches a target."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    p = path_str(path)
    if p.endswith("/kernel") and getattr(leaf, "ndim", 0) >= 2 and _matches(targets, p.rsplit("/", 1)[0]):
      out[p.rsplit("/", 1)[0]] = leaf
  return out


def init_lora(key, params, targets: Sequence[str], rank: int) -> dict:
  """Adapters {module path nested: {"a": (..., in, r), "b": (..., r, out)}} for the targeted Dense
  layers (leading axes of a scanned kernel stack are kept).

  A ~ N(0, (1/r)^2) (PEFT's "gaussian" init), B = 0: the adapted model starts equal to the base.
  Each layer's A uses ``fold_in(key, crc32(path))``, so the init does not depend on which other
  layers are targeted.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
  out: dict = {}
  for mod, kernel in dense_kernels(params, targets).items():
    *lead, d_in, d_out = kernel.shape
    k = jax.random.fold_in(key, zlib.crc32(mod.encode()))
    a = jax.random.normal(k, (*lead, d_in, rank), jnp.float32) / rank
    _set(out, mod.split("/"), dict(a=a, b=jnp.zeros((*lead, rank, d_out), jnp.float32)))
  return out


def _adapters(lora) -> dict[str, dict]:
  """{module path: {"a", "b"}} from the nested adapter tree."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict) and set(node) == {"a", "b"} and not isinstance(node["a"], dict):
      out["/".join(prefix)] = node
      return
    for k, v in node.items():
      walk(v, prefix + [k])
  walk(lora or {}, [])
  return out


def overlay(base, trained) -> Any:
  """``base`` with the leaves of ``trained`` (same nesting, any subset; the "lora" key ignored) put in."""
  flat = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(
      {k: v for k, v in trained.items() if k != LORA})}

  def pick(path, leaf):
    return flat.pop(path_str(path), leaf)
  out = jax.tree_util.tree_map_with_path(pick, base)
  if flat:
    raise ValueError(f"trained leaves {sorted(flat)[:5]} do not exist in the base parameters.")
  return out


def merge(base, trained, scale: float) -> Any:
  """A plain parameter tree: the base with the trained leaves and every adapter folded in
  (kernel + scale * A B, in float32)."""
  params = overlay(base, trained)
  for mod, ad in _adapters(trained.get(LORA)).items():
    names = mod.split("/") + ["kernel"]
    kernel = _get(params, names)
    delta = scale * jnp.matmul(ad["a"], ad["b"], precision=jax.lax.Precision.HIGHEST)
    _set(params, names, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
  return params


def lora_interceptor(*, scale: float, dropout: float = 0.0):
  """A context manager adding ``scale * dropout(x) A B`` to every adapted ``nn.Dense`` call.

  The adapters are read from the applied variables' ``"lora"`` collection (pass
  ``{"params": ..., "lora": adapters}`` to ``model.apply``); Dense layers without one are left
  alone. Works at any depth, inside jit, ``nn.remat`` and ``nn.scan`` (scan the "lora" collection
  with the params). Dropout > 0 draws from the ``"lora_dropout"`` rng stream (give
  ``rngs={"lora_dropout": key}``; each layer gets its own fold of it).
  """
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if (context.method_name != "__call__" or not isinstance(mod, nn.Dense)
        or not mod.has_variable(LORA, "a")):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    a, b = mod.get_variable(LORA, "a"), mod.get_variable(LORA, "b")
    x = args[0]
    if dropout > 0:
      keep = jax.random.bernoulli(mod.make_rng(LORA_DROPOUT), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    h = jnp.matmul(x, a.astype(x.dtype))
    return y + (scale * jnp.matmul(h, b.astype(x.dtype))).astype(y.dtype)

  return nn.intercept_methods(interceptor)


def lora_variables(lora) -> dict:
  """The extra variable collections of an adapted apply: ``{"lora": lora}``, or {} without adapters."""
  return {LORA: lora} if lora else {}


def lr_labels(trained, lr_mults: Iterable[tuple[str, float]]) -> Any:
  """A label tree ("x1" or "x<mult>") for optax.multi_transform: the first matching pattern wins."""
  lr_mults = tuple(lr_mults)

  def label(path, _):
    p = path_str(path)
    for pattern, mult in lr_mults:
      if re.search(pattern, p):
        return f"x{float(mult):g}"
    return "x1"
  return jax.tree_util.tree_map_with_path(label, trained)
