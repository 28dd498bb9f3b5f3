"""EDM checkpoint conversion: restricted unpickling, crafted pickles, teacher dirs, Heun."""

import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emd_jax import convert, diffusion, teachers
from emd_jax.formats import torch_pickle
from emd_jax.nets import edm_unet
from emd_jax.teachers import network

TINY_SONG = dict(
  img_resolution=8,
  img_channels=3,
  label_dim=3,
  model_type="SongUNet",
  embedding_type="fourier",
  channel_mult_noise=2,
  encoder_type="residual",
  resample_filter=[1, 3, 3, 1],
  model_channels=16,
  channel_mult=[1, 2],
  num_blocks=1,
  attn_resolutions=[4],
  dropout=0.13,
  use_fp16=False,
)


# ----------------------------------------------------------------------------
# A tiny pickle writer for torch-free fixtures: it can name any global.


class G:
  """A global `module.name` as it appears in a pickle (callable so REDUCE accepts it)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called when pickling")


class Call:
  """Pickles as `G(*args)` followed by an optional BUILD with `state`."""

  def __init__(self, fn, args, state=None):
    self.fn, self.args, self.state = fn, tuple(args), state

  def __reduce__(self):
    return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


class Storage:
  """A float32 storage: pickled by persistent id (legacy or zip torch formats)."""

  def __init__(self, array):
    self.array = np.ascontiguousarray(array, np.float32).reshape(-1)


class _Writer(pickle._Pickler):
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, f, storages=None):
    super().__init__(f, protocol=2)
    self.storages = storages

  def _save_g(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)

  dispatch[G] = _save_g

  def persistent_id(self, obj):
    if isinstance(obj, Storage) and self.storages is not None:
      key = str(len(self.storages))
      self.storages.append((key, obj))
      return ("storage", G("torch", "FloatStorage"), key, "cpu", obj.array.size)
    return None


def dumps(obj, storages=None) -> bytes:
  f = io.BytesIO()
  _Writer(f, storages).dump(obj)
  return f.getvalue()


def legacy_storage_bytes(array) -> bytes:
  """What `torch.storage._load_from_bytes` receives: a legacy `torch.save` of one storage."""
  storages = []
  head = dumps(0x1950A86A20F9469CFC6C) + dumps(1001)
  head += dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}})
  body = dumps(Storage(array), storages)
  tail = dumps([k for k, _ in storages])
  for _, s in storages:
    tail += struct.pack("<q", s.array.size) + s.array.tobytes()
  return head + body + tail


def zip_bytes(obj) -> bytes:
  """A zip-format `torch.save` archive of `obj` (storages from `Storage` leaves)."""
  storages = []
  data = dumps(obj, storages)
  f = io.BytesIO()
  with zipfile.ZipFile(f, "w") as zf:
    zf.writestr("archive/data.pkl", data)
    zf.writestr("archive/byteorder", "little")
    for key, s in storages:
      zf.writestr(f"archive/data/{key}", s.array.tobytes())
  return f.getvalue()


def tensor(array, inline_format="legacy"):
  """A torch Parameter as pickled inside an EDM pickle (or in a zip archive)."""
  array = np.asarray(array, np.float32)
  stride = tuple(int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim))
  if inline_format == "legacy":
    storage = Call(G("torch.storage", "_load_from_bytes"), (legacy_storage_bytes(array),))
  elif inline_format == "zip-bytes":
    storage = Call(G("torch.storage", "_load_from_bytes"), (zip_bytes(Storage(array)),))
  else:  # a persistent storage of an enclosing zip archive
    storage = Storage(array)
  hooks = Call(G("collections", "OrderedDict"), ())
  t = Call(G("torch._utils", "_rebuild_tensor_v2"), (storage, 0, array.shape, stride, False, hooks))
  return Call(G("torch._utils", "_rebuild_parameter"), (t, True, hooks))


def edm_module_tree(state_dict, class_name, init_kwargs, inline_format="legacy"):
  """EDM-like persistent module tree: `enc`/`dec` are plain ModuleDicts, others persistent."""
  tree = {}
  for name, value in state_dict.items():
    node = tree
    *parents, leaf = name.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value

  def build_node(node, cls, path, kwargs=None):
    params = {k: tensor(v, inline_format) for k, v in node.items() if not isinstance(v, dict)}
    modules = {k: build_node(v, "X", path + (k,)) for k, v in node.items() if isinstance(v, dict)}
    state = {
      "training": False,
      "_parameters": Call(G("collections", "OrderedDict"), (list(params.items()),)),
      "_buffers": Call(G("collections", "OrderedDict"), ()),
      "_non_persistent_buffers_set": Call(G("builtins", "set"), ([],)),
      "_modules": Call(G("collections", "OrderedDict"), (list(modules.items()),)),
    }
    if path and path[-1] in ("enc", "dec"):
      return Call(G("torch.nn.modules.container", "ModuleDict"), (), state)
    state.update(_init_args=(), _init_kwargs=kwargs or {})
    meta = dict(
      type="class",
      version=6,
      module_src="raise SystemExit('never run')",
      class_name=cls,
      state=state,
    )
    return Call(G("torch_utils.persistence", "_reconstruct_persistent_obj"), (meta,))

  return build_node(tree, class_name, (), init_kwargs)


def _tiny_params(spec, seed=0):
  rng = np.random.default_rng(seed)
  shapes = convert.abstract_params(spec)
  return jax.tree.map(
    lambda s: (rng.standard_normal(s.shape) / np.sqrt(max(1, np.prod(s.shape[:-1])))).astype(np.float32),
    shapes,
  )


# ----------------------------------------------------------------------------
# Tests.


def test_restricted_unpickler_refuses_code_execution(tmp_path):
  marker = tmp_path / "pwned"
  for fn in (G("os", "system"), G("posix", "system"), G("builtins", "eval")):
    arg = f"touch {marker}" if fn.name == "system" else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pkl"
    path.write_bytes(dumps({"ema": Call(fn, (arg,))}))
    with pytest.raises(pickle.UnpicklingError, match=f"{fn.module}.{fn.name}"):
      torch_pickle.load_file(str(path))
    with pytest.raises(pickle.UnpicklingError):
      convert.main(["--edm", str(path), "--out", str(tmp_path / "out")])
  assert not marker.exists()

  # A real pickle of an os.system reduction is refused too.
  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with pytest.raises(pickle.UnpicklingError):
    torch_pickle._restricted_load(io.BytesIO(pickle.dumps(Evil())))
  assert not marker.exists()


def _crafted_teacher_dir(tmp_path, inline_format="legacy"):
  """Crafts an EDM pickle of a tiny NCSN++ without torch and converts it via the CLI."""
  spec = convert.spec_from_edm_kwargs("EDMPrecond", TINY_SONG)
  params = _tiny_params(spec)
  sd = convert.flax_to_edm(params)
  # EDM also stores the resampling filters as buffers; add one as EDM would.
  sd["model.enc.4x4_down.conv0.resample_filter"] = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).reshape(1, 1, 4, 4) / 64.0
  net = edm_module_tree(sd, "EDMPrecond", TINY_SONG, inline_format)
  pkl = tmp_path / "edm-tiny.pkl"
  pkl.write_bytes(dumps({"ema": net, "loss_fn": None, "dataset_kwargs": {"resolution": 8}}))
  out = tmp_path / "teacher"
  convert.main(["--edm", str(pkl), "--out", str(out)])
  return out, spec, params


def test_numpy_scalars_keep_their_byte_order():
  """A numpy scalar in a torch pickle is rebuilt from its bytes in the dtype's own byte order: a big-endian
  float64 read as native would be 1.5e-320, not 3.5; native scalars and other kinds read as pickled."""
  from numpy._core.multiarray import scalar

  class BigEndian:
    def __reduce__(self):
      return scalar, (np.dtype(">f8"), np.array(3.5, ">f8").tobytes())

  data = pickle.dumps({"be": BigEndian(), "f": np.float32(2.0), "i": np.int64(-3), "u": np.uint8(7)}, protocol=2)
  out = torch_pickle._restricted_load(io.BytesIO(data))
  assert out == {"be": 3.5, "f": 2.0, "i": -3, "u": 7}
  assert out["f"].dtype == np.float32 and out["i"].dtype == np.int64


@pytest.mark.parametrize("inline_format", ["legacy", "zip-bytes"])
def test_convert_crafted_edm_pickle_without_torch(tmp_path, inline_format):
  out, spec, params = _crafted_teacher_dir(tmp_path, inline_format)
  info = json.loads((out / "teacher.json").read_text())
  assert info["kind"] == "network" and info["format_version"] == 1
  assert info["data_shape"] == [8, 8, 3] and info["num_classes"] == 3
  assert info["net"] == spec and info["net"]["encoder_type"] == "residual"
  assert info["source"] == "edm-tiny.pkl"
  teacher = teachers.load(str(out))
  jax.tree.map(np.testing.assert_array_equal, teacher.params, params)
  assert teacher.data_shape == (8, 8, 3) and teacher.num_classes == 3


def test_convert_state_dict_zip_with_arch_json(tmp_path):
  spec = edm_unet.complete_spec(
    dict(
      arch="dhariwal_unet",
      precond="edm",
      img_resolution=8,
      in_channels=3,
      model_channels=32,
      channel_mult=[1, 2],
      num_blocks=1,
      attn_resolutions=[4],
    )
  )
  params = _tiny_params(spec, seed=5)
  sd = {k[len("model.") :]: v for k, v in convert.flax_to_edm(params).items()}
  # Tensors in a zip archive: _rebuild_tensor_v2 over persistent storages.
  entries = []
  for k, v in sd.items():
    shape = v.shape
    v = Storage(v)
    stride = tuple(int(np.prod(shape[i + 1 :])) for i in range(len(shape)))
    hooks = Call(G("collections", "OrderedDict"), ())
    entries.append((k, Call(G("torch._utils", "_rebuild_tensor_v2"), (v, 0, shape, stride, False, hooks))))
  pt = tmp_path / "net.pt"
  pt.write_bytes(zip_bytes(Call(G("collections", "OrderedDict"), (entries,))))
  arch = {
    "class_name": "EDMPrecond",
    "model_type": "DhariwalUNet",
    "img_resolution": 8,
    "img_channels": 3,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
  }
  out = tmp_path / "t"
  convert.main(["--state_dict", str(pt), "--arch_json", json.dumps(arch), "--out", str(out)])
  teacher = teachers.load(str(out))
  jax.tree.map(np.testing.assert_array_equal, teacher.params, params)
  assert teacher.spec["net"] == spec


def test_teacher_dir_errors_and_atomic_overwrite(tmp_path):
  with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
    teachers.load(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
    teachers.load(str(tmp_path / "empty"))
  spec = dict(
    arch="song_unet",
    img_resolution=8,
    in_channels=1,
    model_channels=16,
    channel_mult=[1],
    num_blocks=1,
    attn_resolutions=[],
  )
  p1 = {"a": np.ones(2, np.float32)}
  network.save(str(tmp_path / "t"), spec, p1, {"source": "one"})
  network.save(str(tmp_path / "t"), spec, {"a": np.zeros(2, np.float32)}, {"source": "two"})
  assert sorted(os.listdir(tmp_path)) == ["empty", "t"]  # no temp or old dirs left behind
  assert network.read_info(str(tmp_path / "t"))["source"] == "two"
  os.remove(tmp_path / "t" / "params.msgpack")
  with pytest.raises(FileNotFoundError, match="params.msgpack"):
    teachers.load(str(tmp_path / "t"))


def _edm_heun_numpy(denoise, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """EDM's `edm_sampler` loop (S_churn = 0) transcribed to numpy float64."""
  i = np.arange(num_steps, dtype=np.float64)
  t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  t = np.concatenate([t, [0.0]])
  x_next = latents.astype(np.float64) * t[0]
  for k, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:], strict=True)):
    x_hat = x_next
    d_cur = (x_hat - denoise(x_hat, t_cur)) / t_cur
    x_next = x_hat + (t_next - t_cur) * d_cur
    if k < num_steps - 1:
      d_prime = (x_next - denoise(x_next, t_next)) / t_next
      x_next = x_hat + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
  return x_next


def test_heun_sampler_on_converted_teacher_matches_edm_loop(tmp_path):
  out, _, _ = _crafted_teacher_dir(tmp_path)
  teacher = teachers.load(str(out))
  labels = jnp.eye(3)[jnp.array([0, 2])]
  f = jax.jit(lambda x, s: teacher.denoise(x, s, labels))  # scalar sigma, broadcast

  def denoise_np(x, t):  # float32 network, float64 sampler state, as EDM
    return np.asarray(f(jnp.asarray(x, jnp.float32), jnp.float32(t))).astype(np.float64)

  noise = np.random.default_rng(3).standard_normal((2, 8, 8, 3)).astype(np.float32)
  ref = _edm_heun_numpy(denoise_np, noise, num_steps=6)
  assert np.all(np.isfinite(ref)) and ref.shape == noise.shape
  sample = jax.jit(lambda z: diffusion.heun_sample(teacher.bind(), z, labels, num_steps=6))
  np.testing.assert_allclose(sample(noise), ref, rtol=0, atol=2e-4 * np.abs(ref).max())


def test_torch_saved_tensors_load_without_torch_code(tmp_path):
  torch = pytest.importorskip("torch")
  g = torch.Generator().manual_seed(0)
  lin = torch.nn.Linear(5, 3)
  with torch.no_grad():
    lin.weight.copy_(torch.randn(3, 5, generator=g))
  # Legacy storage bytes, as inside EDM pickles (plain pickle of a module's tensors).
  obj = {"w": lin.weight, "t": torch.arange(12.0).reshape(3, 4).t(), "h": torch.ones(2).half()}
  got = torch_pickle._restricted_load(io.BytesIO(pickle.dumps(obj)))
  np.testing.assert_array_equal(got["w"], lin.weight.detach().numpy())
  np.testing.assert_array_equal(got["t"], np.arange(12.0).reshape(3, 4).T)
  assert got["h"].dtype == np.float16
  # A zip-format state dict written by torch.save.
  torch.save(lin.state_dict(), tmp_path / "lin.pt")
  sd = torch_pickle.load_file(str(tmp_path / "lin.pt"))
  assert isinstance(sd, collections.OrderedDict) and set(sd) == {"weight", "bias"}
  np.testing.assert_array_equal(sd["bias"], lin.bias.detach().numpy())


EDM_DIR = os.environ.get("EMD_JAX_EDM_DIR")


@pytest.mark.skipif(not EDM_DIR, reason="set EMD_JAX_EDM_DIR to an NVlabs/edm checkout")
def test_parity_with_original_edm_networks(tmp_path):
  torch = pytest.importorskip("torch")
  sys.path.insert(0, EDM_DIR)
  from training import networks as edm_networks

  torch.manual_seed(0)
  net = edm_networks.EDMPrecond(**TINY_SONG).eval()
  with torch.no_grad():
    for p in net.parameters():
      p.copy_(torch.randn_like(p) / max(1.0, float(np.sqrt(p[0].numel() if p.ndim > 1 else 1))))
  pkl = tmp_path / "edm.pkl"
  with open(pkl, "wb") as fh:
    pickle.dump({"ema": net}, fh)
  convert.main(["--edm", str(pkl), "--out", str(tmp_path / "t")])
  teacher = teachers.load(str(tmp_path / "t"))
  x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
  sigma = np.array([0.2, 5.0], np.float32)
  labels = np.eye(3, dtype=np.float32)[[0, 2]]
  with torch.no_grad():
    ref = net(torch.from_numpy(x), torch.from_numpy(sigma), torch.from_numpy(labels)).numpy()
  ours = np.asarray(teacher.denoise(jnp.asarray(x.transpose(0, 2, 3, 1)), sigma, labels))
  np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_unsupported_or_malformed_pickles_are_named(tmp_path):
  with pytest.raises(ValueError, match="iDDPMPrecond"):
    convert.spec_from_edm_kwargs("training.networks.iDDPMPrecond", dict(TINY_SONG))
  with pytest.raises(ValueError, match="model_type"):
    convert.spec_from_edm_kwargs("EDMPrecond", dict(TINY_SONG, model_type="UNet2D"))
  path = tmp_path / "noema.pkl"
  path.write_bytes(dumps({"loss_fn": None}))
  with pytest.raises(ValueError, match="no 'ema' entry"):
    convert.read_edm_pickle(str(path))
  # A tensor whose geometry overruns its storage is refused, not read out of bounds.
  bad = Call(G("torch._utils", "_rebuild_tensor_v2"), (Storage(np.zeros(4)), 2, (3,), (1,), False, None))
  path.write_bytes(zip_bytes({"w": bad}))
  with pytest.raises(pickle.UnpicklingError, match="overruns"):
    torch_pickle.load_file(str(path))
