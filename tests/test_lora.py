"""LoRA over Flax param trees: selection, exact zero init, low-rank merge, frozen base."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from emd_jax.nets import lora


class TinyNet(nn.Module):
  """Dense 'hidden' (not adapted), Dense 'qkv' and Conv 'out_conv' (adapted by default)."""

  @nn.compact
  def __call__(self, x):  # x [B, 6, 6, 3]
    h = nn.Dense(4, name="hidden")(x)
    h = nn.Dense(5, name="qkv")(jnp.tanh(h))
    return nn.Conv(2, (3, 3), name="out_conv")(h)


@functools.cache
def _setup():
  net = TinyNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  params = jax.jit(net.init)(jax.random.PRNGKey(1), x)["params"]
  return net, x, params


def _randomise_b(adapter, rng):
  """Gives every B factor random values (as after training)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(adapter)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if path[-1].key == "lora_b":
      leaf = jax.random.normal(jax.random.fold_in(rng, i), leaf.shape)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def test_default_targets_select_attention_and_output():
  _, _, params = _setup()
  paths = lora.select_targets(params)
  assert sorted(paths) == ["out_conv/kernel", "qkv/kernel"]
  only_hidden = lora.select_targets(params, [r"^hidden/"])
  assert only_hidden == ["hidden/kernel"]
  by_fn = lora.select_targets(params, lambda path, leaf: leaf.ndim == 4)
  assert by_fn == ["out_conv/kernel"]
  every = lora.select_targets(params, lora.ALL_TARGETS)  # every kernel, no bias or scale
  kernels = [
    k for k, v in traverse_util.flatten_dict(params, sep="/").items() if k.endswith("kernel") and v.ndim in (2, 4)
  ]
  assert sorted(every) == sorted(kernels) and len(every) > 2


def test_zero_init_merge_is_exactly_base():
  net, x, params = _setup()
  adapter = lora.init_lora(jax.random.PRNGKey(2), params, rank=2)
  assert adapter["qkv"]["kernel"]["lora_a"].shape == (4, 2)
  assert adapter["out_conv"]["kernel"]["lora_a"].shape == (3 * 3 * 5, 2)
  assert adapter["out_conv"]["kernel"]["lora_b"].shape == (2, 2)
  assert lora.lora_param_count(adapter) == 4 * 2 + 2 * 5 + 45 * 2 + 2 * 2
  merged = jax.jit(lora.merge)(params, adapter)
  for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(net.apply({"params": merged}, x), net.apply({"params": params}, x))


def test_merged_forward_is_base_plus_low_rank_update():
  net, x, params = _setup()
  adapter = _randomise_b(lora.init_lora(jax.random.PRNGKey(2), params, rank=2), jax.random.PRNGKey(3))
  scale = 0.7
  merged = lora.merge(params, adapter, scale)
  # Weights: the update has rank <= 2 over (fan_in, out).
  for name in ("qkv", "out_conv"):
    delta = merged[name]["kernel"] - params[name]["kernel"]
    s = np.linalg.svd(np.asarray(delta).reshape(-1, delta.shape[-1]), compute_uv=False)
    assert s[2:].max(initial=0.0) < 1e-5 * s[0]
    f = adapter[name]["kernel"]
    np.testing.assert_allclose(delta, scale * (f["lora_a"] @ f["lora_b"]).reshape(delta.shape), atol=1e-6)
  np.testing.assert_array_equal(merged["hidden"]["kernel"], params["hidden"]["kernel"])
  # Forward: the conv layer is linear in its kernel, so adapting only out_conv
  # gives base output + conv(h, delta) (bias counted once).
  only_out = {"out_conv": adapter["out_conv"]}
  merged_out = lora.merge(params, only_out, scale)
  h = nn.Dense(5).apply({"params": params["qkv"]}, jnp.tanh(nn.Dense(4).apply({"params": params["hidden"]}, x)))
  delta = lora.lora_delta(only_out["out_conv"]["kernel"], params["out_conv"]["kernel"].shape, scale)
  conv_delta = nn.Conv(2, (3, 3), use_bias=False).apply({"params": {"kernel": delta}}, h)
  np.testing.assert_allclose(
    net.apply({"params": merged_out}, x), net.apply({"params": params}, x) + conv_delta, atol=1e-5
  )
  # Dense: x W' = x W + scale (x A) B.
  qkv = adapter["qkv"]["kernel"]
  hin = jax.random.normal(jax.random.PRNGKey(5), (7, 4))
  dense = lambda p: nn.Dense(5).apply({"params": p["qkv"]}, hin)
  np.testing.assert_allclose(dense(merged), dense(params) + scale * (hin @ qkv["lora_a"]) @ qkv["lora_b"], atol=1e-5)


def test_frozen_base_optimizer_updates_only_adapter():
  net, x, params = _setup()
  adapter = lora.init_lora(jax.random.PRNGKey(2), params, rank=2)
  tree = {"base": params, "lora": adapter, "unfolded": {"log_lam": jnp.zeros(3)}}
  labels = lora.trainable_labels(tree)
  tx = lora.frozen_base_optimizer(optax.adamw(1e-2, weight_decay=0.1), labels)
  opt_state = tx.init(tree)
  target = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 6, 2))

  def loss(p):
    out = net.apply({"params": lora.merge(p["base"], p["lora"])}, x)
    return jnp.mean((out - target) ** 2) + jnp.sum(p["unfolded"]["log_lam"] ** 2 - p["unfolded"]["log_lam"])

  @jax.jit
  def step(p, s):
    g = jax.grad(loss)(p)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  new = tree
  for _ in range(3):
    new, opt_state = step(new, opt_state)
  for a, b in zip(jax.tree_util.tree_leaves(new["base"]), jax.tree_util.tree_leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(new["lora"]["qkv"]["kernel"]["lora_b"]).max()) > 0
  assert float(jnp.abs(new["lora"]["out_conv"]["kernel"]["lora_b"]).max()) > 0
  assert float(jnp.abs(new["unfolded"]["log_lam"]).max()) > 0
  assert float(loss(new)) < float(loss(tree))
