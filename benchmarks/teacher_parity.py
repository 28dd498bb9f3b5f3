"""Parity and speed of emd_jax's EDM networks against NVlabs/edm's originals.

    python benchmarks/teacher_parity.py --edm_dir /path/to/edm --size tiny --out parity.json
    python benchmarks/teacher_parity.py --edm_dir /path/to/edm --size paper --batch 8

Needs torch (`pip install emd_jax[convert]`) and an EDM checkout (its
`training/networks.py` is imported from `--edm_dir`; nothing of EDM is
vendored here). Per architecture (DDPM++/VP, NCSN++/VE, ADM/EDM) it builds
EDM's network with random weights (every layer, including EDM's zero-initialised
ones, gets a random value so that no path is hidden), pickles it as EDM does,
converts the pickle with `emd_jax.convert` (the torch-free reader), and reports:

- `max_rel_denoiser`: max |D_flax - D_edm| / max |D_edm| over a batch of noise
  levels from 0.002 to 80 (class labels and augmentation labels where the
  architecture has them);
- `max_rel_raw`: the same for the raw network `F` at random noise labels,
  which is not dominated by the skip path `c_skip x`;
- `max_rel_heun` (tiny size only): EDM's `edm_sampler` (18 steps, float64
  state) against `emd_jax.diffusion.heun_sample` on the converted teacher;
- `ms_per_image_flax` / `ms_per_image_edm`: forward time per image (jitted
  Flax on JAX's default device vs eager torch on `--torch_device`, after warm-up).

Without torch or `--edm_dir` it still times the Flax networks. Results go to a
JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from emd_jax import convert, diffusion
from emd_jax.formats import torch_pickle
from emd_jax.nets import build

# EDM's published configurations (train.py) and tiny versions of them.
ARCHS = {
  "ddpmpp_vp": (
    "VPPrecond",
    dict(
      img_resolution=32,
      img_channels=3,
      label_dim=0,
      model_type="SongUNet",
      embedding_type="positional",
      encoder_type="standard",
      decoder_type="standard",
      channel_mult_noise=1,
      resample_filter=[1, 1],
      model_channels=128,
      channel_mult=[2, 2, 2],
      augment_dim=9,
      dropout=0.13,
    ),
    dict(
      img_resolution=16,
      model_channels=16,
      channel_mult=[1, 2, 2],
      num_blocks=1,
      attn_resolutions=[8],
      label_dim=10,
    ),
  ),
  "ncsnpp_ve": (
    "VEPrecond",
    dict(
      img_resolution=32,
      img_channels=3,
      label_dim=0,
      model_type="SongUNet",
      embedding_type="fourier",
      encoder_type="residual",
      decoder_type="standard",
      channel_mult_noise=2,
      resample_filter=[1, 3, 3, 1],
      model_channels=128,
      channel_mult=[2, 2, 2],
      augment_dim=9,
      dropout=0.13,
    ),
    dict(
      img_resolution=16,
      model_channels=16,
      channel_mult=[1, 2, 2],
      num_blocks=1,
      attn_resolutions=[8],
    ),
  ),
  "adm_edm": (
    "EDMPrecond",
    dict(
      img_resolution=64,
      img_channels=3,
      label_dim=1000,
      model_type="DhariwalUNet",
      model_channels=192,
      channel_mult=[1, 2, 3, 4],
      augment_dim=0,
      dropout=0.10,
    ),
    dict(
      img_resolution=16,
      model_channels=32,
      channel_mult=[1, 2, 2],
      num_blocks=1,
      attn_resolutions=[8, 4],
      label_dim=10,
    ),
  ),
}


def _time(fn, reps: int) -> float:
  fn()  # warm-up (and compile)
  t = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t) / reps


def _inputs(kwargs, batch, rng):
  res, ch = kwargs["img_resolution"], kwargs["img_channels"]
  x = rng.standard_normal((batch, ch, res, res)).astype(np.float32)
  sigma = np.exp(np.linspace(np.log(0.002), np.log(80.0), batch)).astype(np.float32)
  ld = kwargs.get("label_dim", 0)
  labels = np.eye(ld, dtype=np.float32)[rng.integers(0, ld, batch)] if ld else None
  ad = kwargs.get("augment_dim", 0)
  aug = rng.standard_normal((batch, ad)).astype(np.float32) if ad else None
  return x, sigma, labels, aug


def run_one(name, size, batch, reps, edm_networks, torch, torch_device="cpu"):
  cls_name, paper, tiny = ARCHS[name]
  kwargs = dict(paper, **(tiny if size == "tiny" else {}))
  rng = np.random.default_rng(0)
  x, sigma, labels, aug = _inputs(kwargs, batch, rng)
  row = {"arch": name, "size": size, "batch": batch}
  if edm_networks is not None:
    torch.manual_seed(0)
    net = getattr(edm_networks, cls_name)(**kwargs).eval().requires_grad_(False)
    for p in net.parameters():  # random values everywhere, incl. zero-initialised layers
      fan = p[0].numel() if p.ndim > 1 else 1
      p.copy_(torch.randn_like(p) / max(1.0, float(np.sqrt(fan))))
    buf = io.BytesIO()
    pickle.dump({"ema": net}, buf)
    path = f"/tmp/_teacher_parity_{name}.pkl"
    with open(path, "wb") as f:
      f.write(buf.getvalue())
    spec, sd = convert.read_edm_pickle(path)
    os.remove(path)
    params = convert.edm_to_flax(sd, spec)
  else:
    spec = convert.spec_from_edm_kwargs(cls_name, kwargs)
    shapes = convert.abstract_params(spec)
    params = jax.tree.map(lambda s: 0.02 * np.ones(s.shape, np.float32), shapes)
  module = build(spec)
  row["num_params"] = int(sum(np.prod(v.shape) for v in jax.tree.leaves(params)))
  fwd = jax.jit(lambda p, x, s, lab, a: module.apply({"params": p}, x, s, lab, augment_labels=a))
  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  out = lambda: fwd(params, xj, sigma, labels, aug).block_until_ready()
  row["ms_per_image_flax"] = 1e3 * _time(out, reps) / batch
  if edm_networks is None:
    return row

  net = net.to(torch_device)
  t = lambda a: None if a is None else torch.from_numpy(a).to(torch_device)

  def torch_forward():
    y = net(t(x), t(sigma), t(labels), augment_labels=t(aug))
    if torch_device.startswith("cuda"):
      torch.cuda.synchronize()
    return y

  with torch.no_grad():
    ref = torch_forward().cpu().numpy()
    row["ms_per_image_edm"] = 1e3 * _time(torch_forward, reps) / batch
    cn = rng.standard_normal(batch).astype(np.float32)
    raw_ref = net.model(t(x), t(cn), t(labels), augment_labels=t(aug)).cpu().numpy()
  ours = np.asarray(out()).transpose(0, 3, 1, 2)
  row["max_rel_denoiser"] = float(np.abs(ours - ref).max() / np.abs(ref).max())
  raw = module.model.clone(parent=None)
  raw_out = jax.jit(lambda p: raw.apply({"params": p}, xj, cn, labels, augment_labels=aug))
  raw_ours = np.asarray(raw_out(params["model"])).transpose(0, 3, 1, 2)
  row["max_rel_raw"] = float(np.abs(raw_ours - raw_ref).max() / np.abs(raw_ref).max())
  if size == "tiny":
    row["max_rel_heun"] = heun_parity(net, module, params, kwargs, labels, torch, torch_device)
  return row


def load_edm_sampler(edm_dir: str):
  """EDM's `edm_sampler` from `generate.py`, without its CLI imports (click, tqdm)."""
  import ast

  import torch

  path = os.path.join(edm_dir, "generate.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "edm_sampler"]
  namespace = {"np": np, "torch": torch}
  exec(compile(ast.Module(body=fn, type_ignores=[]), path, "exec"), namespace)
  return namespace["edm_sampler"]


def heun_parity(net, module, params, kwargs, labels, torch, torch_device="cpu") -> float:
  """EDM's `edm_sampler` vs `emd_jax.diffusion.heun_sample`, same noise, 18 steps."""
  edm_sampler = load_edm_sampler(os.path.dirname(os.path.dirname(sys.modules["training"].__file__)))

  res, ch = kwargs["img_resolution"], kwargs["img_channels"]
  n = labels.shape[0] if labels is not None else 4
  latents = np.random.default_rng(1).standard_normal((n, ch, res, res)).astype(np.float32)
  with torch.no_grad():
    t = lambda a: None if a is None else torch.from_numpy(a).to(torch_device)
    ref = edm_sampler(net, t(latents), t(labels)).cpu().numpy()
  # EDM clamps the sampler's range to the network's supported noise levels.
  s_min = max(0.002, float(net.sigma_min))
  s_max = min(80.0, float(net.sigma_max))
  denoise = lambda x, s, lab: module.apply({"params": params}, x, s, lab)
  ours = jax.jit(lambda z, lab: diffusion.heun_sample(denoise, z, lab, num_steps=18, sigma_min=s_min, sigma_max=s_max))(
    jnp.asarray(latents.transpose(0, 2, 3, 1)), labels
  )
  ours = np.asarray(ours).transpose(0, 3, 1, 2)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--edm_dir", help="NVlabs/edm checkout (needs torch)")
  parser.add_argument("--size", choices=["tiny", "paper"], default="tiny")
  parser.add_argument("--archs", default=",".join(ARCHS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--torch_device", default="cpu", help="device for EDM's network, e.g. cuda")
  parser.add_argument("--out", default="teacher_parity.json")
  args = parser.parse_args(argv)
  edm_networks = torch = None
  if args.edm_dir:
    import torch

    sys.path.insert(0, args.edm_dir)
    from training import networks as edm_networks
  rows = []
  for name in args.archs.split(","):
    row = run_one(name, args.size, args.batch, args.reps, edm_networks, torch, args.torch_device)
    print(json.dumps(row))
    rows.append(row)
  result = {
    "rows": rows,
    "jax_backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "torch": None if torch is None else torch.__version__,
    "machine": platform.platform(),
    "torch_pickle_reader": torch_pickle.__name__,
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
