"""The bad-input campaign: every command answers malformed and hostile files with one line.

For each command (`main`, `sample`, `restore`, `replay`, `convert`) at least five
malformed or hostile inputs: garbage bytes, truncated files, wrong keys, wrong
shapes, NaN values, pickles whose `__reduce__` calls `os.system` /
`builtins.eval` / `subprocess.Popen`, a teacher directory from another
architecture, an architecture JSON missing a field. Each case asserts exit status
2, exactly one `error: ...` line naming the file or flag (no traceback) and that
nothing was written to the output path. The commands run in-process through their
`run_in_process` / `cli.run_argv` (the real parsers and error mapping); two run as
subprocesses to cover the entry points and `--debug`. Counted in docs/reliability.md.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from emd_jax import cli, convert, nets, replay, restore, sample
from emd_jax import main as main_lib
from emd_jax.formats import generator_export as export_lib
from emd_jax.formats import torch_pickle
from emd_jax.teachers import network

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = {"arch": "mlp", "dim": 2, "hidden": 8, "depth": 1, "emb_dim": 8}
COUNTS: dict[str, int] = {}


@functools.cache
def _init(hidden):
  module = nets.build({**SPEC, "hidden": hidden})
  return module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.ones((1,)))["params"]


def _params(hidden=8, nan=False):
  p = jax.tree.map(np.array, _init(hidden))  # writable copies
  if nan:
    leaf = jax.tree.leaves(p)[0]
    leaf.flat[0] = np.nan
  return p


class _Reduce:
  """Pickles as `fn(*args)`: what a hostile file would run on a plain `pickle.load`."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _hostile_pickles(marker: str) -> dict[str, bytes]:
  """EDM-shaped pickles whose network entry runs a command that would create `marker`."""
  return {
    "posix.system": pickle.dumps({"ema": _Reduce(os.system, f"touch {marker}")}),
    "builtins.eval": pickle.dumps({"ema": _Reduce(eval, f"open({marker!r}, 'w')")}),
    "subprocess.Popen": pickle.dumps({"ema": _Reduce(subprocess.Popen, ["touch", marker])}),
  }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Good and bad inputs shared by the cases; `{root}` in a case's argv is this directory."""
  root = tmp_path_factory.mktemp("bad_inputs")
  r = lambda *p: str(root.joinpath(*p))
  # Generator exports: a good one, then one damaged copy per case.
  export_lib.write_export(r("gen"), net_spec=SPEC, params=_params(), data_shape=(2,), sigma_init=1.0)
  for name in ("gen_garbage", "gen_nosigma", "gen_trunc", "gen_otherarch", "gen_nan"):
    export_lib.write_export(r(name), net_spec=SPEC, params=_params(), data_shape=(2,), sigma_init=1.0)
  root.joinpath("gen_garbage", export_lib.SPEC_FILE).write_bytes(os.urandom(256))
  meta = root.joinpath("gen_nosigma", export_lib.SPEC_FILE).read_text().replace('"sigma_init"', '"sigma_x"')
  root.joinpath("gen_nosigma", export_lib.SPEC_FILE).write_text(meta)
  blob = root.joinpath("gen_trunc", export_lib.PARAMS_FILE).read_bytes()
  root.joinpath("gen_trunc", export_lib.PARAMS_FILE).write_bytes(blob[: len(blob) // 2])
  root.joinpath("gen_otherarch", export_lib.PARAMS_FILE).write_bytes(serialization.msgpack_serialize(_params(16)))
  root.joinpath("gen_nan", export_lib.PARAMS_FILE).write_bytes(serialization.msgpack_serialize(_params(nan=True)))
  # Teacher directories.
  meta = {"data_shape": [2]}
  network.save(r("t_otherarch"), SPEC, _params(16), meta)  # teacher.json says hidden 8, params are hidden 16
  network.save(r("t_nan"), SPEC, _params(nan=True), meta)
  network.save(r("t_garbage"), SPEC, _params(), meta)
  root.joinpath("t_garbage", network.PARAMS_FILE).write_bytes(os.urandom(300))
  network.save(r("t_trunc"), SPEC, _params(), meta)
  blob = root.joinpath("t_trunc", network.PARAMS_FILE).read_bytes()
  root.joinpath("t_trunc", network.PARAMS_FILE).write_bytes(blob[:40])
  network.save(r("t_nonet"), SPEC, _params(), meta)
  text = root.joinpath("t_nonet", network.SPEC_FILE).read_text().replace('"net"', '"nett"')
  root.joinpath("t_nonet", network.SPEC_FILE).write_text(text)
  network.save(r("t_binary"), SPEC, _params(), meta)
  root.joinpath("t_binary", network.SPEC_FILE).write_bytes(b"\xff\xfe\x00garbage" + os.urandom(64))
  # Image npz files for restore.
  good = np.zeros((2, 16, 16, 1), np.uint8)
  np.savez(r("garbage.npz"), x=1)
  root.joinpath("garbage.npz").write_bytes(os.urandom(1000))
  np.savez(r("good.npz"), images=good)
  blob = root.joinpath("good.npz").read_bytes()
  root.joinpath("trunc.npz").write_bytes(blob[: len(blob) // 2])
  np.savez(r("wrongkeys.npz"), pixels=good)
  np.savez(r("float_images.npz"), images=good.astype(np.float32))
  np.savez(r("rank2.npz"), images=np.zeros((16, 16), np.uint8))
  np.savez(r("nan.npz"), samples=np.full((2, 16, 16, 1), np.nan, np.float32))
  np.savez(r("range.npz"), samples=np.full((2, 16, 16, 1), 255.0, np.float32))
  np.savez(r("empty.npz"), images=np.zeros((0, 16, 16, 1), np.uint8))
  # An npz whose array is a pickle calling os.system (np.load must refuse object arrays).
  with zipfile.ZipFile(r("pickled.npz"), "w") as zf:
    header = b"\x93NUMPY\x01\x00" + b"v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(118) + b"\n"
    zf.writestr("images.npy", header + pickle.dumps([_Reduce(os.system, f"touch {r('pwned')}")]))
  # UD2M sampler exports (damaged before any teacher is read).
  os.makedirs(r("ud2m_garbage"))
  root.joinpath("ud2m_garbage", "sampler.json").write_bytes(os.urandom(100))
  os.makedirs(r("ud2m_notask"))
  root.joinpath("ud2m_notask", "sampler.json").write_text(
    '{"kind": "ud2m_sampler", "format_version": 1, "teacher": {"path": "teacher"}, "lora": {}, "unfolded": {},'
    ' "sampler": {}}'
  )
  # Pickles and state dicts for convert.
  for name, blob in _hostile_pickles(r("pwned")).items():
    root.joinpath(f"{name}.pkl").write_bytes(blob)
  root.joinpath("garbage.pkl").write_bytes(os.urandom(2048))
  good_pickle = pickle.dumps({"ema": None, "loss_fn": None}, protocol=2)
  root.joinpath("trunc.pkl").write_bytes(pickle.dumps({"ema": {"a": list(range(100))}})[:-30])
  root.joinpath("noema.pkl").write_bytes(good_pickle)
  root.joinpath("notazip.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
  root.joinpath("arch_nochannels.json").write_text('{"class_name": "EDMPrecond", "img_resolution": 8}')
  root.joinpath("arch_good.json").write_text(
    '{"class_name": "EDMPrecond", "model_type": "SongUNet", "img_resolution": 8, "img_channels": 1}'
  )
  root.joinpath("arch_bad.json").write_text('{"img_resolution": 8,')
  return root


def _one_line_error(code: int, text: str, message: str) -> None:
  lines = [ln for ln in text.splitlines() if ln.strip()]
  errors = [ln for ln in lines if ln.startswith("error: ")]
  assert code == 2, text[-2000:]
  assert len(errors) == 1 and message in errors[0], text[-2000:]
  assert "Traceback" not in text, text[-2000:]


def _run(fn, argv, capsys) -> tuple[int, str]:
  capsys.readouterr()
  code = fn(argv)
  out = capsys.readouterr()
  return code, out.out + out.err


def _fmt(argv, root):
  return [a.format(root=root) for a in argv]


# ----------------------------------------------------------------------------
# sample


SAMPLE_CASES = [
  (["--generator={root}/nope"], "not a generator export"),
  (["--generator={root}/gen_garbage"], "gen_garbage/generator.json: not"),
  (["--generator={root}/gen_nosigma"], "gen_nosigma/generator.json: missing field 'sigma_init'"),
  (["--generator={root}/gen_trunc"], "gen_trunc/params.msgpack: not a readable generator parameter file"),
  (["--generator={root}/gen_otherarch"], "gen_otherarch/params.msgpack (net 'mlp' of generator.json): does not match"),
  (["--generator={root}/gen_nan"], "holds non-finite values"),
  (["--generator={root}/gen", "--labels=3"], "--labels: given, but the model is unconditional"),
  (["--generator={root}/gen", "--grid={root}/g.png"], "--grid: needs image samples"),
  (["--generator={root}/gen", "--num=0"], "--num: must be >= 1"),
  (
    [
      "--config=configs/gmm.py:tiny",
      "--teacher",
      "--config.teacher.kind=checkpoint",
      "--config.teacher.checkpoint={root}/t_otherarch",
    ],
    "t_otherarch/params.msgpack (net 'mlp' of teacher.json): does not match its spec",
  ),
]


@pytest.mark.parametrize(
  "case, message", SAMPLE_CASES, ids=[c[0][-30:] + str(i) for i, (c, _) in enumerate(SAMPLE_CASES)]
)
def test_sample(files, capsys, case, message):
  out = files / "s_out" / "samples.npz"
  code, text = _run(sample.run_in_process, [*_fmt(case, files), f"--out={out}"], capsys)
  _one_line_error(code, text, message.format(root=files))
  assert not out.parent.exists() and not (files / "g.png").exists()


def test_sample_good_export_still_works(files, capsys):
  out = files / "ok.npz"
  code, text = _run(sample.run_in_process, [f"--generator={files}/gen", "--num=4", f"--out={out}"], capsys)
  assert code == 0, text
  assert np.load(out)["samples"].shape == (4, 2)
  os.remove(out)


# ----------------------------------------------------------------------------
# restore (a baseline on the shipped teacher: bad inputs are refused before it is loaded)

BASE = ["--baseline=ddrm_2", "--task=deblur"]
RESTORE_CASES = [
  ([*BASE, "--input={root}/missing.npz"], "missing.npz: --input npz does not exist"),
  ([*BASE, "--input={root}/garbage.npz"], "garbage.npz: not a readable npz file"),
  ([*BASE, "--input={root}/trunc.npz"], "trunc.npz: not a readable npz file"),
  ([*BASE, "--input={root}/wrongkeys.npz"], "wrongkeys.npz: needs an 'images' (uint8) or 'samples'"),
  ([*BASE, "--input={root}/float_images.npz"], "float_images.npz: 'images' must be uint8"),
  ([*BASE, "--input={root}/rank2.npz"], "rank2.npz: 'images' must be [N, H, W, C]"),
  ([*BASE, "--input={root}/nan.npz"], "nan.npz: 'samples' holds 512 non-finite values"),
  ([*BASE, "--input={root}/range.npz"], "range.npz: 'samples' values span [255, 255]"),
  ([*BASE, "--input={root}/empty.npz"], "empty.npz: 'images' holds no images"),
  ([*BASE, "--input={root}/pickled.npz"], "pickled.npz: 'images' cannot be read"),
  ([*BASE, "--input={root}/good.npz", "--settings={{not json"], "--settings: not valid JSON"),
  ([*BASE, "--input={root}/good.npz", "--teacher={root}/t_otherarch"], "t_otherarch/params.msgpack"),
  (["--sampler={root}/ud2m_garbage", "--input={root}/good.npz"], "ud2m_garbage/sampler.json: not"),
  (["--sampler={root}/ud2m_notask", "--input={root}/good.npz"], "ud2m_notask/sampler.json: missing field 'task'"),
]


@pytest.mark.parametrize("case, message", RESTORE_CASES, ids=[c[-1][-28:] for c, _ in RESTORE_CASES])
def test_restore(files, capsys, case, message):
  out = files / "r_out.npz"
  code, text = _run(restore.run_in_process, [*_fmt(case, files), f"--out={out}"], capsys)
  _one_line_error(code, text, message.format(root=files))
  assert not out.exists() and not (files / "pwned").exists()
  assert not [n for n in os.listdir(files) if n.startswith(".r_out")]  # no temporary file left


# ----------------------------------------------------------------------------
# main (training) and replay: a bad teacher leaves no workdir behind

TINY = ["--config", "configs/gmm.py:tiny", "--config.teacher.kind=checkpoint"]
TEACHER_CASES = [
  ("t_otherarch", "t_otherarch/params.msgpack (net 'mlp' of teacher.json): does not match its spec"),
  ("t_nan", "t_nan/params.msgpack (net 'mlp' of teacher.json): does not match its spec"),
  ("t_garbage", "t_garbage/params.msgpack: not a readable teacher parameter file"),
  ("t_trunc", "t_trunc/params.msgpack: not a readable teacher parameter file"),
  ("t_nonet", "t_nonet/teacher.json: missing field 'net'"),
  ("t_binary", "t_binary/teacher.json: not"),
]


@pytest.mark.parametrize("name, message", TEACHER_CASES, ids=[n for n, _ in TEACHER_CASES])
def test_main_bad_teacher(files, tmp_path, capsys, name, message):
  workdir = tmp_path / "w"
  argv = [*TINY, f"--config.teacher.checkpoint={files}/{name}", "--workdir", str(workdir)]
  code, text = _run(main_lib.run_in_process, argv, capsys)
  _one_line_error(code, text, f"teacher.checkpoint: {files}/{message}")
  assert not workdir.exists()


REPLAY_CASES = [
  (["--workdir={tmp}/nope", "--step=1"], "--workdir {tmp}/nope: no such run directory"),
  (["--workdir={tmp}/w", "--step=0"], "--step: update numbers start at 1, got 0"),
  (["--workdir={tmp}/w"], "--step is required"),
  (["--workdir={tmp}/w", "--step=x"], "--step=x"),
  (
    ["--workdir={tmp}/w", "--step=1", "--config.teacher.checkpoint={root}/t_otherarch"],
    "teacher.checkpoint: {root}/t_otherarch/params.msgpack",
  ),
  (["--workdir={tmp}/w", "--step=1", "--config.teacher.checkpoint={root}/t_nonet"], "missing field 'net'"),
  (["--workdir={tmp}/w", "--step=1", "--config.teacher.checkpoint={root}/t_trunc"], "t_trunc/params.msgpack: not"),
]


@pytest.mark.parametrize("case, message", REPLAY_CASES, ids=[c[-1][-28:] for c, _ in REPLAY_CASES])
def test_replay(files, tmp_path, capsys, case, message):
  (tmp_path / "w").mkdir()
  case = [a.format(root=files, tmp=tmp_path) for a in case]
  if any(a.startswith("--config.teacher.checkpoint") for a in case):
    case = ["--config.teacher.kind=checkpoint", *case]
  code, text = _run(replay.run_in_process, ["--config", "configs/gmm.py:tiny", *case], capsys)
  _one_line_error(code, text, message.format(root=files, tmp=tmp_path))
  assert os.listdir(tmp_path) == ["w"] and not os.listdir(tmp_path / "w")  # nothing created or written


# ----------------------------------------------------------------------------
# convert

CONVERT_CASES = [
  (["--edm={root}/posix.system.pkl"], "posix.system.pkl: refusing to load global posix.system"),
  (["--edm={root}/builtins.eval.pkl"], "builtins.eval.pkl: refusing to load global builtins.eval"),
  (["--edm={root}/subprocess.Popen.pkl"], "subprocess.Popen.pkl: refusing to load global subprocess.Popen"),
  (["--edm={root}/garbage.pkl"], "garbage.pkl: not a readable pickle or torch file"),
  (["--edm={root}/trunc.pkl"], "trunc.pkl: not a readable pickle or torch file"),
  (["--edm={root}/noema.pkl"], "noema.pkl: no 'ema' entry"),
  (["--edm={root}/missing.pkl"], "missing.pkl: --edm file does not exist"),
  (
    ["--state_dict={root}/notazip.pt", "--arch_json={root}/arch_good.json"],
    "notazip.pt: not a readable pickle or torch file",
  ),
  (["--state_dict={root}/noema.pkl", "--arch_json={{}}"], "--arch_json: missing field 'img_resolution'"),
  (["--state_dict={root}/noema.pkl", "--arch_json={root}/arch_nochannels.json"], "missing field 'img_channels'"),
  (["--state_dict={root}/noema.pkl", "--arch_json={root}/arch_bad.json"], "arch_bad.json: not valid JSON"),
  (["--state_dict={root}/noema.pkl"], "--arch_json: --state_dict needs it"),
  (["--edm={root}/noema.pkl", "--state_dict={root}/noema.pkl"], "--edm/--state_dict: give exactly one"),
  (["--edm={root}/noema.pkl", "--bogus=1"], "emd_jax.convert: unrecognized arguments: --bogus=1"),
]


@pytest.mark.parametrize(
  "case, message", CONVERT_CASES, ids=[c[0][-28:] + str(i) for i, (c, _) in enumerate(CONVERT_CASES)]
)
def test_convert(files, capsys, case, message):
  out = files / "teacher_out"
  argv = ["emd_jax.convert", *_fmt(case, files), f"--out={out}"]
  code, text = _run(lambda a: cli.run_argv(convert.main, a), argv, capsys)
  _one_line_error(code, text, message.format(root=files))
  assert not out.exists() and not (files / "pwned").exists()
  assert not [n for n in os.listdir(files) if n.startswith(".teacher-")]


def _state_dict_zip(entries) -> bytes:
  """A zip `torch.save` archive whose data.pkl is `entries` (pickled with test_convert's writer)."""
  from test_convert import zip_bytes

  return zip_bytes(entries)


def test_convert_tensor_bombs_and_wrong_keys(files, tmp_path, capsys, monkeypatch):
  from test_convert import Call, G, Storage

  out = tmp_path / "t"
  arch = '{"class_name": "EDMPrecond", "model_type": "SongUNet", "img_resolution": 8, "img_channels": 1}'
  cases = {
    # A zero-stride tensor claiming 10^12 elements from a 1-element storage.
    "bomb.pt": (
      {"w": Call(G("torch._utils", "_rebuild_tensor_v2"), (Storage(np.zeros(1)), 0, (10**12,), (0,), False, None))},
      "bomb.pt: refusing to allocate 4,000,000,000,000 bytes",
    ),
    "wrongkeys.pt": ({"w": 3, "b": "x"}, "wrongkeys.pt: entries that are not named tensors"),
  }
  for name, (obj, message) in cases.items():
    (tmp_path / name).write_bytes(_state_dict_zip(obj))
    argv = ["convert", f"--state_dict={tmp_path / name}", f"--arch_json={arch}", f"--out={out}"]
    code, text = _run(lambda a: cli.run_argv(convert.main, a), argv, capsys)
    _one_line_error(code, text, message)
  # Real tensors, but of a network other than the arch JSON's.
  t = Call(G("torch._utils", "_rebuild_tensor_v2"), (Storage(np.ones(6)), 0, (2, 3), (3, 1), False, None))
  (tmp_path / "other.pt").write_bytes(_state_dict_zip({"model.foo.weight": t}))
  argv = ["convert", f"--state_dict={tmp_path / 'other.pt'}", f"--arch_json={arch}", f"--out={out}"]
  code, text = _run(lambda a: cli.run_argv(convert.main, a), argv, capsys)
  _one_line_error(code, text, "other.pt: does not fit the song_unet spec: missing parameters")
  # The file-size limit.
  monkeypatch.setattr(torch_pickle, "MAX_FILE_BYTES", 100)
  argv = ["convert", f"--edm={files}/garbage.pkl", f"--out={out}"]
  code, text = _run(lambda a: cli.run_argv(convert.main, a), argv, capsys)
  _one_line_error(code, text, "garbage.pkl: refusing to read 2,048 bytes: over the file size limit of 100")
  assert not out.exists()


def test_entry_points_as_subprocesses(files, tmp_path):
  """The real `python -m` entry points: one line and status 2; `--debug` shows the traceback."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "t"
  cmd = [sys.executable, "-m", "emd_jax.convert", "--edm", f"{files}/posix.system.pkl", "--out", str(out)]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
    f"error: {files}/posix.system.pkl: refusing to load global posix.system (not an allowlisted type)"
  ], r.stderr
  r = subprocess.run([*cmd, "--debug"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and "Traceback" in r.stderr and "UnsafePickleError" in r.stderr
  cmd = [sys.executable, "-m", "emd_jax.sample", f"--generator={files}/gen_otherarch", f"--out={tmp_path}/s.npz"]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
  assert r.returncode == 2 and len(lines) == 1 and "does not match its spec" in lines[0], r.stderr
  assert not out.exists() and not (files / "pwned").exists() and not (tmp_path / "s.npz").exists()


def test_campaign_size():
  """At least five bad inputs per command (docs/reliability.md counts them)."""
  counts = {
    "sample": len(SAMPLE_CASES),
    "restore": len(RESTORE_CASES),
    "main": len(TEACHER_CASES),
    "replay": len(REPLAY_CASES),
    "convert": len(CONVERT_CASES) + 4,  # + test_convert_tensor_bombs_and_wrong_keys
  }
  assert min(counts.values()) >= 5, counts


def test_hostile_pickles_would_run_under_plain_pickle(tmp_path):
  """The payloads are real: a plain `pickle.loads` of the eval one creates the marker."""
  marker = tmp_path / "ran"
  pickle.loads(_hostile_pickles(str(marker))["builtins.eval"])
  assert marker.exists()
