"""Can the adversarial term's discriminator tell a student from the data? (issue 16 diagnostic)

The digits `sida` runs keep `loss/disc` at chance (2 ln 2 times `fake.adv_weight`) for all 800 steps,
with or without `adv.head_lr`. This probe separates the two possible causes: a discriminator that
is too slow to learn inside a run, or inputs on which nothing can tell the two sets apart.

For each source of "fake" samples (a generator export, or the teacher's Heun samples) it trains the
term's own discriminator, `DiscHead` on the fake network's encoder features at the teacher's
weights (where the fake network starts), with the term's loss (non-saturating, noised inputs at
`adv.sigma`) for `--steps` Adam steps at `--lr`, on the real training digits against
`--num` samples, then reports its held-out accuracy (digits test split against fresh samples) at
fixed noise levels. `--train_features` also trains the encoder (the whole fake network) with the
same loss. Beside it, an independent classifier that sees clean pixels (scikit-learn logistic
regression and a small MLP on the 8x8 crop, 5-fold cross-validated) says how separable the sets
are without noise or the fake network's features.

  python benchmarks/disc_probe.py --sources export:runs/bench_digits/sida/export,teacher \
      --out benchmarks/results/disc_probe

Writes `--out`.json and `--out`.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.digits import get_config  # noqa: E402
from emd_jax import teachers  # noqa: E402
from emd_jax.data import pipeline  # noqa: E402
from emd_jax.distill import adversarial  # noqa: E402
from emd_jax.formats.generator_export import load_sampler  # noqa: E402
from emd_jax.jobs import distill as distill_lib  # noqa: E402
from emd_jax.sample import sample_teacher  # noqa: E402

LEVELS = (0.0, 0.05, 0.2, 0.5, 1.0)


def samples_of(source: str, teacher, rng, num: int) -> np.ndarray:
  if source == "teacher":
    return np.asarray(sample_teacher(teacher, rng, num, num_steps=18, batch_size=500)[0])
  if source.startswith("export:"):
    return np.asarray(load_sampler(source[len("export:") :]).sample(rng, num, batch_size=500))
  raise SystemExit(f"--sources: unknown source {source!r}; expected 'teacher' or 'export:PATH'")


def crop(x: np.ndarray) -> np.ndarray:
  """The 8x8 digit inside the padded 16x16 frame, flattened."""
  h = x.shape[1]
  o = (h - 8) // 2
  return x[:, o : o + 8, o : o + 8, 0].reshape(len(x), -1)


def pixel_classifiers(real: np.ndarray, fake: np.ndarray, seed: int) -> dict:
  """5-fold cross-validated accuracy of two clean-pixel classifiers, real vs fake (balanced sets)."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import cross_val_score
  from sklearn.neural_network import MLPClassifier

  n = min(len(real), len(fake))
  x = np.concatenate([crop(real[:n]), crop(fake[:n])])
  y = np.concatenate([np.ones(n), np.zeros(n)])
  out = {}
  for name, clf in (
    ("logistic", LogisticRegression(max_iter=2000, C=1.0)),
    ("mlp", MLPClassifier((128,), max_iter=500, random_state=seed)),
  ):
    out[name] = float(np.mean(cross_val_score(clf, x, y, cv=5)))
  return out


def probe(setup, teacher, real, real_test, fake, fake_test, args, key) -> dict:
  """Trains the term's discriminator on (real, fake); held-out accuracy per noise level."""
  spec = setup.step_cfg.adv
  if spec.features != "shared":
    raise SystemExit("disc_probe: adv.features='own' is --train_features here (the encoder the head reads, trained)")
  disc = adversarial.make_disc_apply(setup.net_features, spec.head_hidden, spec.head_readout)
  head = adversarial.init_head(
    key,
    setup.net_features,
    teacher.params,
    teacher.data_shape,
    teacher.num_classes,
    spec.head_hidden,
    spec.head_readout,
  )
  params = {"fake": teacher.params, "head": head}
  tx = optax.adam(args.lr)
  opt = tx.init(params)

  def loss_fn(p, xr, xf, k):
    k1, k2, k3, k4 = jax.random.split(k, 4)
    sr, sf = spec.sigma.sample(k1, (len(xr),)), spec.sigma.sample(k2, (len(xf),))
    xr_t = adversarial.noised(xr, sr, jax.random.normal(k3, xr.shape))
    xf_t = adversarial.noised(xf, sf, jax.random.normal(k4, xf.shape))
    fake_params = p["fake"] if args.train_features else jax.lax.stop_gradient(p["fake"])
    lr_, lf = disc(fake_params, p["head"], xr_t, sr, None), disc(fake_params, p["head"], xf_t, sf, None)
    return adversarial.disc_loss_from_logits(lr_, lf)

  @jax.jit
  def step(p, o, xr, xf, k):
    loss, g = jax.value_and_grad(loss_fn)(p, xr, xf, k)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  @jax.jit
  def logits(p, x, s, k):
    sig = jnp.full((len(x),), s)
    xt = adversarial.noised(x, sig, jax.random.normal(k, x.shape))
    return disc(p["fake"], p["head"], xt, jnp.maximum(sig, 2e-3), None)  # sigma 0: the net at sigma_min

  rng = np.random.default_rng(args.seed)
  losses = []
  for i in range(args.steps):
    xr = jnp.asarray(real[rng.integers(0, len(real), args.batch)])
    xf = jnp.asarray(fake[rng.integers(0, len(fake), args.batch)])
    params, opt, loss = step(params, opt, xr, xf, jax.random.fold_in(key, i))
    losses.append(float(loss))
  acc = {}
  for j, s in enumerate(LEVELS):
    k = jax.random.fold_in(key, 10_000 + j)
    lr_ = np.asarray(logits(params, jnp.asarray(real_test), s, k))
    lf = np.asarray(logits(params, jnp.asarray(fake_test), s, jax.random.fold_in(k, 1)))
    acc[str(s)] = float((np.mean(lr_ > 0) + np.mean(lf < 0)) / 2)
  tail = max(1, args.steps // 10)
  return {"loss_first": float(np.mean(losses[:tail])), "loss_last": float(np.mean(losses[-tail:])), "held_out_acc": acc}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sources", required=True, help="comma-separated: teacher, export:PATH")
  ap.add_argument("--teacher", default="builtin:digits_uncond")
  ap.add_argument("--num", type=int, default=1500, help="training samples per source (the real train split: 1,500)")
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--train_features", action="store_true", help="train the encoder too, not only the head")
  ap.add_argument("--overrides", default="{}", help="JSON {dotted config key: value} (e.g. adv.sigma.p_mean)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="benchmarks/results/disc_probe")
  args = ap.parse_args()

  from benchmarks.digits_sweep import apply_overrides  # dotted keys; unknown ones raise

  config = get_config()
  config.method = "sida"
  config.teacher.checkpoint = args.teacher
  apply_overrides(config, json.loads(args.overrides))
  sources = [s for s in args.sources.split(",") if s]
  for s in sources:  # bad input before any compute
    if s != "teacher" and not (s.startswith("export:") and os.path.isdir(s[len("export:") :])):
      raise SystemExit(f"--sources: {s!r} is neither 'teacher' nor export:<an existing export directory>")
  distill_lib.validate_distill(config)  # resolves the method preset; config errors before any compute
  teacher = teachers.load(args.teacher)
  setup = distill_lib.build_setup(config, teacher)
  real = pipeline.load_arrays(config.data, "train")["image"]
  real_test = pipeline.load_arrays(config.data, "test")["image"]
  rows = []
  for i, source in enumerate(sources):
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(args.seed), i)
    x = samples_of(source, teacher, key, args.num + len(real_test))
    fake, fake_test = x[: args.num], x[args.num :]
    row = {"source": source, **probe(setup, teacher, real, real_test, fake, fake_test, args, key)}
    row["pixel_cv_acc"] = pixel_classifiers(np.concatenate([real, real_test]), x, args.seed)
    row["seconds"] = time.perf_counter() - t0
    rows.append(row)
    print(json.dumps(row), flush=True)
  settings = {k: getattr(args, k) for k in ("teacher", "num", "steps", "batch", "lr", "train_features", "seed")}
  settings.update(overrides=json.loads(args.overrides), adv_sigma=dict(config.adv.sigma), cpu_count=os.cpu_count())
  with open(f"{args.out}.json", "w") as f:
    json.dump({"settings": settings, "rows": rows}, f, indent=2)
  lines = [
    "# Can the discriminator tell the samples from real digits? (benchmarks/disc_probe.py)",
    "",
    f"Settings: {json.dumps(settings)}",
    "",
    "Held-out accuracy of the term's discriminator (0.5 = chance) at each input noise level, its training loss",
    "(2 ln 2 = 1.386 at chance), and clean-pixel classifiers' 5-fold accuracy on the 8x8 crop.",
    "",
    "| source | "
    + " | ".join(f"acc @ sigma {s}" for s in LEVELS)
    + " | loss first / last | pixel logistic | pixel MLP |",
    "|---|" + "---|" * (len(LEVELS) + 3),
  ]
  for r in rows:
    a = r["held_out_acc"]
    lines.append(
      f"| {r['source']} | "
      + " | ".join(f"{a[str(s)]:.3f}" for s in LEVELS)
      + f" | {r['loss_first']:.3f} / {r['loss_last']:.3f}"
      + f" | {r['pixel_cv_acc']['logistic']:.3f} | {r['pixel_cv_acc']['mlp']:.3f} |"
    )
  with open(f"{args.out}.md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
