"""Workdirs, exports and teachers on a filesystem that is not POSIX (docs/reliability.md, "Workdirs on object stores").

TensorFlow's in-memory `ram://` filesystem stands in for `gs://` (its one quirk that
`emd_jax.formats.paths` does not hide: `exists` matches name prefixes, so no two sibling names
here are prefixes of one another): `emd_jax.formats.paths` sends
every URI to `tf.io.gfile`, the backend a `gs://` path takes too. Every test here patches
`tf.io.gfile.rename` to fail, so nothing passes by renaming a directory (which object stores
cannot do atomically). Orbax cannot write `ram://` (TensorStore has no driver for it), so the end
to end run keeps its checkpoints on a local path and everything else on `ram://`.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_equal, gmm_tiny, save_tiny_unet_teacher

from emd_jax import sample
from emd_jax.errors import UserError, UserInputError
from emd_jax.formats import fileio, paths
from emd_jax.formats import generator_export as export_lib
from emd_jax.formats import ud2m_export as ud2m_lib
from emd_jax.jobs import distill as train
from emd_jax.runtime import checkpoint as ckpt_lib
from emd_jax.runtime.preemption import Preempted
from emd_jax.teachers import network

SPEC = {"arch": "mlp", "dim": 2, "hidden": 8, "depth": 1, "emb_dim": 8}


@pytest.fixture
def ram(monkeypatch):
  """A fresh `ram://` root, deleted afterwards; directory renames on it fail loudly."""
  import tensorflow as tf

  def no_rename(*args, **kwargs):
    raise AssertionError(f"rename on an object store: {args}")

  monkeypatch.setattr(tf.io.gfile, "rename", no_rename)
  root = f"ram://emd-test-{uuid.uuid4().hex[:8]}"
  paths.makedirs(root)  # ram:// (unlike gs://) needs its directories made before files go in them
  yield root
  if paths.exists(root):
    paths.rmtree(root)


def _real_params(seed: int = 0):
  from emd_jax import nets

  module = nets.build(SPEC)
  return jax.device_get(module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 2)), jnp.ones((1,)))["params"])


# ----------------------------------------------------------------------------- the path helpers


def test_uri_detection_and_abspath():
  assert paths.is_remote("gs://b/run") and paths.is_remote("ram://x") and paths.is_remote("s3://b")
  assert not paths.is_remote("runs/gmm") and not paths.is_remote("/tmp/x")
  assert not paths.is_remote('{"path": "gs://b/x"}')  # inline JSON given for a --*_json flag is not a path
  assert paths.abspath("gs://b/run/") == "gs://b/run"  # never normpath'd into 'gs:/b/run'
  assert paths.abspath("runs/x") == os.path.abspath("runs/x")
  assert paths.expanduser("gs://b/~x") == "gs://b/~x"


def test_helpers_on_ram(ram):
  d = f"{ram}/a/b"
  paths.makedirs(d)
  assert paths.isdir(d) and not paths.isfile(d) and paths.exists(d)
  paths.write_text(f"{d}/x.txt", "héllo")
  paths.write_bytes(f"{ram}/a/y.bin", b"\x00\x01\x02")
  assert paths.read_text(f"{d}/x.txt") == "héllo" and paths.getsize(f"{d}/x.txt") == len("héllo".encode())
  assert paths.isfile(f"{ram}/a/y.bin") and sorted(paths.listdir(f"{ram}/a")) == ["b", "y.bin"]
  assert paths.walk_files(f"{ram}/a") == ["b/x.txt", "y.bin"]
  for missing in (paths.read_bytes, paths.getsize, paths.remove):
    with pytest.raises(FileNotFoundError):
      missing(f"{ram}/nope")
  paths.move_tree(f"{ram}/a", f"{ram}/moved")  # copy, then delete: no rename (the fixture forbids it)
  assert not paths.exists(f"{ram}/a") and paths.walk_files(f"{ram}/moved") == ["b/x.txt", "y.bin"]
  assert paths.read_bytes(f"{ram}/moved/y.bin") == b"\x00\x01\x02"
  with pytest.raises(FileExistsError):
    paths.move_tree(f"{ram}/moved", f"{ram}/moved")
  paths.rmtree(f"{ram}/moved")
  assert not paths.exists(f"{ram}/moved")


def test_npz_and_png_round_trip_on_ram(ram):
  from PIL import Image

  from emd_jax.evaluators import grids, images

  x = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16, 1)).astype(np.float32)
  fileio.write_npz(f"{ram}/out/s.npz", samples=x)
  back, as_uint8 = fileio.read_images_npz(f"{ram}/out/s.npz")
  assert not as_uint8
  np.testing.assert_array_equal(back, x)
  with pytest.raises(UserInputError, match="s.npz: is a directory"):
    paths.makedirs(f"{ram}/out/dir/s.npz")
    fileio.write_npz(f"{ram}/out/dir/s.npz", samples=x)
  paths.write_bytes(f"{ram}/out/bad.npz", b"not a zip")
  with pytest.raises(UserInputError, match="bad.npz: not a readable npz file"):
    fileio.read_images_npz(f"{ram}/out/bad.npz")
  # A sample grid written into a ram:// workdir decodes to the grid of the images.
  returned = images.write_grid(ram, 7, x, num=4, scale=2)
  with paths.open(f"{ram}/samples_step7.png", "rb") as f:
    png = np.asarray(Image.open(f))
  want = grids.image_grid(x[:4]).repeat(2, 0).repeat(2, 1)[..., 0]
  np.testing.assert_array_equal(png, want)
  np.testing.assert_array_equal(returned[0, ..., 0], want)


# ----------------------------------------------------------------------------- publication and the marker


def test_publish_writes_the_marker_last_and_readers_require_it(ram, monkeypatch):
  d = f"{ram}/runs/export"
  order = []
  write = paths.write_bytes
  monkeypatch.setattr(paths, "write_bytes", lambda p, data: (order.append(os.path.basename(p)), write(p, data)))
  export_lib.write_export(d, net_spec=SPEC, params=_real_params(), data_shape=(2,), sigma_init=1.0)
  assert order[-1] == fileio.MARKER_FILE and set(order) == {"params.msgpack", "generator.json", "_COMPLETE"}
  marker = json.loads(paths.read_text(f"{d}/{fileio.MARKER_FILE}"))
  assert marker["kind"] == "generator_export" and sorted(marker["files"]) == ["generator.json", "params.msgpack"]
  assert marker["files"]["params.msgpack"]["bytes"] == paths.getsize(f"{d}/params.msgpack")
  assert fileio.verify_complete(d) == []
  sampler = export_lib.load_sampler(d)
  np.testing.assert_array_equal(sampler.sample(jax.random.key(0), 8), sampler.sample(jax.random.key(0), 8))

  # Rewriting: the old marker goes first, so a reader during the rewrite refuses the directory.
  removed = []
  remove = paths.remove
  monkeypatch.setattr(paths, "remove", lambda p: (removed.append(p), remove(p)))
  rmtree = paths.rmtree
  monkeypatch.setattr(paths, "rmtree", lambda p, **k: (removed.append(p), rmtree(p, **k)))
  export_lib.write_export(d, net_spec=SPEC, params=_real_params(1), data_shape=(2,), sigma_init=1.0)
  assert removed[:2] == [f"{d}/{fileio.MARKER_FILE}", d]
  monkeypatch.undo()

  # A write that stopped before its marker (what a crash leaves): refused, naming the directory.
  paths.remove(f"{d}/{fileio.MARKER_FILE}")
  with pytest.raises(UserInputError, match=rf"incomplete generator export: {d} has no _COMPLETE marker"):
    export_lib.load_sampler(d)
  # A listed file gone: refused too.
  fileio.mark_complete(d, "generator_export")
  paths.remove(f"{d}/params.msgpack")
  with pytest.raises(UserInputError, match=rf"incomplete generator export: {d}: params.msgpack listed in _COMPLETE"):
    export_lib.load_sampler(d)


def test_failed_publication_leaves_nothing_readable(ram, tmp_path):
  for root in (ram, str(tmp_path)):
    d = os.path.join(root, "teacher")
    with pytest.raises(RuntimeError, match="disk full"):
      with fileio.publish(d, network.MARKER_KIND) as out:
        out.write(network.SPEC_FILE, "{}")
        raise RuntimeError("disk full")
    assert not paths.exists(d)
    assert not [n for n in paths.listdir(root) if n.startswith(".publish-")]


def test_local_exports_keep_the_rename_and_old_ones_still_load(tmp_path, ram, caplog):
  d = str(tmp_path / "export")
  export_lib.write_export(d, net_spec=SPEC, params=_real_params(), data_shape=(2,), sigma_init=1.0)
  assert os.path.isfile(os.path.join(d, fileio.MARKER_FILE)) and fileio.verify_complete(d) == []
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".export-")]
  # An export written before markers existed: a warning on a local path, an error on an object store.
  os.remove(os.path.join(d, fileio.MARKER_FILE))
  fileio._UNMARKED_WARNED.discard(d)
  with caplog.at_level("WARNING"):
    export_lib.load_sampler(d)
  assert "no _COMPLETE marker" in caplog.text
  for name in ("generator.json", "params.msgpack"):
    paths.copy_file(os.path.join(d, name), f"{ram}/old/{name}")
  with pytest.raises(UserInputError, match="python -m emd_jax.formats.fileio mark"):
    export_lib.load_sampler(f"{ram}/old")
  assert fileio.main(["mark", f"{ram}/old", "generator_export"]) == 0  # the documented fix
  export_lib.load_sampler(f"{ram}/old")
  # verify re-reads the files: an edited one is found.
  paths.write_text(f"{ram}/old/generator.json", paths.read_text(f"{ram}/old/generator.json") + " ")
  assert fileio.main(["verify", f"{ram}/old"]) == 1
  assert [p.split(":")[0] for p in fileio.verify_complete(f"{ram}/old")] == ["generator.json"]


def test_shipped_teachers_carry_markers():
  from emd_jax import teachers

  for name in ("digits_cond", "digits_uncond"):
    d = teachers.resolve_path(f"builtin:{name}")
    assert fileio.verify_complete(d) == [], name
    assert fileio.require_complete(d, "teacher checkpoint")["kind"] == network.MARKER_KIND


def test_teacher_on_ram_and_checkpointer_refuses_ram(ram):
  t = network.save(f"{ram}/teacher", SPEC, _real_params(), {"data_shape": [2]})
  assert t == f"{ram}/teacher" and network.load(t).data_shape == (2,)
  paths.remove(f"{t}/{fileio.MARKER_FILE}")
  with pytest.raises(UserInputError, match=rf"incomplete teacher checkpoint: {t} has no _COMPLETE"):
    network.load(t)
  from emd_jax.config import validation

  c = gmm_tiny(**{"teacher.kind": "checkpoint", "teacher.checkpoint": t})
  with pytest.raises(validation.ConfigError, match="teacher.checkpoint.*incomplete teacher checkpoint"):
    train.validate_distill(c)
  with pytest.raises(UserError, match="Orbax checkpoints need a local path or one of gs://"):
    ckpt_lib.Checkpointer(f"{ram}/checkpoints")


def test_quarantine_moves_a_step_without_rename_semantics(ram):
  # What Checkpointer.quarantine does on an object store: move_tree (copy, delete), then the reason.
  step = f"{ram}/ck/10"
  for name in ("state/array", "meta/metadata", "_CHECKPOINT_METADATA"):
    paths.makedirs(os.path.dirname(f"{step}/{name}"))
    paths.write_text(f"{step}/{name}", name)
  paths.move_tree(step, f"{ram}/ck/corrupt-step10-x")
  assert not paths.exists(step)
  assert paths.walk_files(f"{ram}/ck/corrupt-step10-x") == ["_CHECKPOINT_METADATA", "meta/metadata", "state/array"]


# ----------------------------------------------------------------------------- end to end


def _checkpoints_local(monkeypatch, ram_workdir: str, local: str) -> None:
  """Orbax cannot write ram://: this run's checkpoints go to `local`; every other file stays on ram://."""
  real = ckpt_lib.Checkpointer.for_run.__func__

  def for_run(cls, workdir, config):
    return real(cls, local if workdir == ram_workdir else workdir, config)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "for_run", classmethod(for_run))


@pytest.mark.slow  # two tiny GMM runs and a resume: 30 s on 2 idle cores, 70 s when shared; --runslow
def test_gmm_run_on_ram_preempt_resume_export_sample(ram, tmp_path, monkeypatch):
  """Train on ram://, SIGTERM at step 25, resume: bit-identical to an uninterrupted local run; export, sample."""
  cfg = dict(total_steps=40, checkpoint_every=20, eval_every=20, log_every=10)
  reference = train.train_and_evaluate(gmm_tiny(**cfg), str(tmp_path / "reference"))["state"]
  w = f"{ram}/run"
  _checkpoints_local(monkeypatch, w, str(tmp_path / "ckpt"))
  with pytest.raises(Preempted) as e:
    train.train_and_evaluate(gmm_tiny(**cfg, **{"debug.sigterm_at_step": 25}), w)
  assert e.value.step == 25
  assert sorted(os.listdir(tmp_path / "ckpt" / "checkpoints")) == ["20", "25"]
  assert not paths.exists(f"{w}/export")  # stopped before the end: nothing published
  resumed = train.train_and_evaluate(gmm_tiny(**cfg), w)["state"]
  assert int(resumed.step) == 40
  assert_trees_equal(reference, resumed)
  # TensorBoard events and the export are on ram://; the export loads and samples from there.
  files = paths.walk_files(w)
  assert any("events.out.tfevents" in f for f in files), files
  assert {"export/generator.json", "export/params.msgpack", "export/_COMPLETE"} <= set(files)
  sampler = export_lib.load_sampler(f"{w}/export")
  local = export_lib.load_sampler(str(tmp_path / "reference" / "export"))
  np.testing.assert_array_equal(sampler.sample(jax.random.key(3), 64), local.sample(jax.random.key(3), 64))
  # The sample command, reading the export from ram:// and writing its npz there.
  out = f"{w}/samples/s.npz"
  assert sample.run_in_process(["--generator", f"{w}/export", "--num", "50", "--seed", "1", "--out", out]) == 0
  with paths.open(out, "rb") as f:
    data = np.load(io.BytesIO(f.read()))
    assert data["samples"].shape == (50, 2) and np.isfinite(data["samples"]).all()


@pytest.mark.slow  # a tiny SongUNet teacher, three loads and one restore: 15-55 s; --runslow
def test_ud2m_sampler_export_on_ram_loads_and_restores(ram, tmp_path):
  """A UD2M sampler export (teacher copied in, or referenced by its ram:// path) loads and restores from ram://."""
  from emd_jax.nets import lora as lora_lib
  from emd_jax.posterior.unfolded import default_unfolded_params

  teacher_dir = save_tiny_unet_teacher(f"{ram}/teacher")
  teacher = network.load(teacher_dir)
  lora = lora_lib.init_lora(jax.random.PRNGKey(1), teacher.params, 2, ("conv",))
  lora = jax.tree.map(lambda v: v + 0.01, lora)  # non-zero B: the LoRA changes the denoiser
  n_outer, n_inner = 2, 1
  unfolded = default_unfolded_params(n_outer, n_inner)
  kwargs = dict(
    teacher_info=teacher.spec,
    lora_params=lora,
    lora_meta={"rank": 2, "scale": 1.0, "targets": ["conv"]},
    unfolded=unfolded,
    task={
      "task": "deblur",
      "operator": "gaussian_blur",
      "settings": {"kernel_size": 5, "std": 1.0},
      "sigma_y": 0.05,
      "image_shape": [16, 16, 1],
    },
    sampler={
      "num_outer": n_outer,
      "num_inner": n_inner,
      "nfe": 2,
      "timesteps": [999, 444],
      "eta": 1.0,
      "xt_likelihood": False,
      "init": "backproject",
    },
  )
  copied = ud2m_lib.write_sampler(f"{ram}/run/export", teacher_path=teacher_dir, copy_teacher=True, **kwargs)
  by_ref = ud2m_lib.write_sampler(f"{ram}/run/byref", teacher_path=teacher_dir, copy_teacher=False, **kwargs)
  local = ud2m_lib.write_sampler(str(tmp_path / "export"), teacher_path=teacher_dir, copy_teacher=True, **kwargs)
  assert paths.walk_files(copied) == [
    "_COMPLETE",
    "lora.msgpack",
    "sampler.json",
    "teacher/_COMPLETE",
    "teacher/params.msgpack",
    "teacher/teacher.json",
  ]
  assert fileio.verify_complete(copied) == [] and fileio.verify_complete(f"{copied}/teacher") == []
  samplers = [ud2m_lib.load_sampler(d) for d in (copied, by_ref, local)]
  for other in samplers[1:]:  # the same model, whichever way it was stored
    assert_trees_equal(samplers[0].teacher.params, other.teacher.params)
    assert_trees_equal(samplers[0].lora_params, other.lora_params)
    assert samplers[0].meta["unfolded"] == other.meta["unfolded"]
  assert_trees_equal(samplers[0].teacher.params, teacher.params)
  assert_trees_equal(samplers[0].lora_params, lora)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  s = samplers[0]
  restored = np.asarray(s.restore(s.observe(jax.random.PRNGKey(2), x), jax.random.PRNGKey(3)))
  assert restored.shape == (2, 16, 16, 1) and np.isfinite(restored).all()
  paths.remove(f"{copied}/teacher/params.msgpack")
  with pytest.raises(UserInputError, match="incomplete UD2M sampler export"):
    ud2m_lib.load_sampler(copied)


@pytest.mark.slow  # a tiny image distillation (network teacher), about 40 s; --runslow
def test_digits_run_on_ram_writes_grid_and_export(ram, tmp_path, monkeypatch):
  from PIL import Image

  from configs import digits as digits_config

  c = digits_config.get_config("tiny")
  c.teacher.checkpoint = save_tiny_unet_teacher(f"{ram}/teacher")
  w = f"{ram}/digits"
  _checkpoints_local(monkeypatch, w, str(tmp_path / "ckpt"))
  out = train.train_and_evaluate(c, w)
  step = int(out["state"].step)
  with paths.open(f"{w}/samples_step{step}.png", "rb") as f:
    assert Image.open(f).size[0] > 16
  assert export_lib.load_sampler(f"{w}/export").data_shape == (16, 16, 1)
