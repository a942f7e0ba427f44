"""An independent check of a small-CNN model's worst case: the same weights in PyTorch, attacked by
torchattacks' AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5,000; Croce & Hein's standard version, ported by
Kim 2020), so no line of rvs_tf's attacks is involved. Run in two halves, since the GPU machines that have
PyTorch need not have TensorFlow:

  .venv/bin/python benchmarks/independent_check.py export --model_file=<run>/best_classifier.keras \
      --out=.gpucheck/model.npz                     # weights, test images, reference logits (TensorFlow)
  python3 benchmarks/independent_check.py attack --npz=.gpucheck/model.npz --eps=0.1   # PyTorch only
  python3 benchmarks/independent_check.py attack --npz=.gpucheck/model.npz --norm=L2 --eps=1.5   # L2

  .venv/bin/python benchmarks/independent_check.py compare --robust=robust.npz \
      --state_dirs='benchmarks/runs/{name}/eval/state'     # per example, against rvs-evaluate's state

`attack` first checks that the PyTorch port reproduces the Keras logits, then prints each attack's
cumulative robust accuracy (each attacks only what the ones before left standing) and its time; with
--robust_out it saves which examples survived, which `compare` sets against the examples rvs-evaluate
left standing (from its resumable state folder: every attack's finished batches).
Only `small_cnn` models (per-image standardisation, conv-ReLU blocks, max pooling, two dense layers)
are ported.
"""
import argparse
import glob
import json
import os
import time

import numpy as np


def export(options):
    import keras

    import rvs_tf.models  # noqa: F401  (registers rvs_tf's layers with Keras)
    from rvs_tf import data

    from rvs_tf.precision import float32_copy

    # A model trained in bfloat16 is checked as rvs-evaluate and the exports compute it: in float32.
    model, _ = float32_copy(keras.saving.load_model(options.model_file, compile=False))
    x, y = data.load_idx_arrays(data.DEFAULT_IDX_DIR, "test")
    x, y = x[:options.num_examples], y[:options.num_examples]
    images = np.round(x * 255).astype(np.uint8)
    if not np.array_equal(images / np.float32(255), x):
        raise SystemExit("images: expected multiples of 1/255, so that uint8 carries them exactly")
    weights = {v.path.replace("/", "__"): v.numpy() for v in model.weights}
    reference = model(x[:500], training=False).numpy()
    np.savez_compressed(options.out, x=images, y=y.astype(np.int64), ref_logits=reference, **weights)
    print(f"wrote {options.out}: {len(y)} images, {len(weights)} weight tensors")


def torch_model(weights):
    """The Keras small CNN in PyTorch, on NCHW images in [0, 1]."""
    import torch
    from torch import nn

    def tensor(name):
        return torch.tensor(weights[name])

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList()
            for name in sorted(k[:-len("__kernel")] for k in weights if k.startswith("conv") and
                               k.endswith("__kernel")):
                kernel = tensor(f"{name}__kernel")  # Keras [kh, kw, in, out] -> PyTorch [out, in, kh, kw]
                conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], padding="same")
                conv.weight.data, conv.bias.data = kernel.permute(3, 2, 0, 1).contiguous(), tensor(f"{name}__bias")
                self.convs.append(conv)
            self.features, self.logits = nn.Linear(1, 1), nn.Linear(1, 1)
            for layer, name in ((self.features, "features"), (self.logits, "logits")):
                layer.weight.data = tensor(f"{name}__kernel").T.contiguous()
                layer.bias.data = tensor(f"{name}__bias")

        def forward(self, x):
            n = x[0].numel()
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / torch.sqrt(torch.clamp(var, min=1.0 / n))
            for i, conv in enumerate(self.convs):
                x = torch.relu(conv(x))
                if i % 2 == 1:  # two convolutions per stage, then 2x2 max pooling ("same": ceil)
                    x = nn.functional.max_pool2d(x, 2, ceil_mode=True)
            x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
            return self.logits(torch.relu(self.features(x)))

    return SmallCNN().eval()


def attack(options):
    import torch
    import torchattacks

    torch.backends.cuda.matmul.allow_tf32 = False  # attack the model's float32 function, not TF32's
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = np.load(options.npz)
    weights = {k: data[k] for k in data.files if "__" in k}
    model = torch_model(weights).to(device)
    x = torch.tensor(data["x"][:options.num_examples], dtype=torch.float32).div(255).permute(0, 3, 1, 2)
    y = torch.tensor(data["y"][:options.num_examples])
    with torch.no_grad():
        ported = model(x[:len(data["ref_logits"])].to(device)).cpu().numpy()
    gap = float(np.abs(ported - data["ref_logits"]).max())
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torchattacks "
          f"{torchattacks.__version__}; port max |logit difference| on {len(ported)} images: {gap:.2e}")
    if gap > 1e-3:
        raise SystemExit("the PyTorch port does not reproduce the Keras model's logits")

    def predict(images):
        with torch.no_grad():
            return torch.cat([model(b.to(device)).argmax(1).cpu() for b in images.split(options.batch_size)])

    robust = predict(x) == y
    print(f"clean: {robust.float().mean() * 100:.2f}% of {len(y)}", flush=True)
    if options.robust_in:  # start from a set of survivors (e.g. another run's, or rvs-evaluate's state)
        given = torch.tensor(np.load(options.robust_in)[:len(y)])
        print(f"starting from {options.robust_in}: {int(given.sum())} examples, of which "
              f"{int((given & robust).sum())} classified correctly here", flush=True)
        robust &= given
    eps, norm = options.eps, options.norm
    attacks = [
        ("APGD-CE 100", torchattacks.APGD(model, norm=norm, eps=eps, steps=100, loss="ce", seed=0)),
        ("APGD-T 100 x 9 targets", torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_classes=10,
                                                      seed=0)),
        ("FAB-T 100 x 9 targets", torchattacks.FAB(model, norm=norm, eps=eps, steps=100, n_classes=10,
                                                  multi_targeted=True, seed=0)),
        ("Square 5000", torchattacks.Square(model, norm=norm, eps=eps, n_queries=5000, seed=0)),
    ]

    chosen = options.attacks.split(",")
    unknown = sorted(set(chosen) - {"apgd-ce", "apgd-t", "fab-t", "square"})
    if unknown:
        raise SystemExit(f"--attacks: unknown {unknown}; expected some of apgd-ce, apgd-t, fab-t, square")
    attacks = [a for a, key in zip(attacks, ("apgd-ce", "apgd-t", "fab-t", "square")) if key in chosen]

    def size(delta):  # per example, in the attack's norm
        flat = delta.flatten(1)
        return (flat.abs().amax(1) if norm == "Linf" else flat.norm(dim=1)).max()

    start = time.perf_counter()
    for name, attacker in attacks:
        t0 = time.perf_counter()
        idx = torch.nonzero(robust).flatten()
        for chunk in idx.split(options.batch_size):
            adv = attacker(x[chunk].to(device), y[chunk].to(device)).cpu()
            if size(adv - x[chunk]) > eps * (1 + 1e-5) + 1e-6 or adv.min() < 0 or adv.max() > 1:
                raise SystemExit(f"{name}: left the {norm} eps-ball or [0, 1]")
            robust[chunk] &= predict(adv) == y[chunk]
        print(f"{name}: attacked {len(idx)}, robust after it {robust.float().mean() * 100:.2f}% "
              f"({int(robust.sum())}), {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"worst case (AutoAttack standard, {norm} eps {eps}): {robust.float().mean() * 100:.2f}% "
          f"({int(robust.sum())}/{len(y)}), {time.perf_counter() - start:.1f} s")
    if options.robust_out:
        np.save(options.robust_out, robust.numpy())


def _state_attacks(folder):
    """rvs-evaluate's state: each attack's index (the examples it attacked and those it broke), in order."""

    return [json.load(open(os.path.join(d, "index.json"), encoding="utf-8"))
            for d in sorted(glob.glob(os.path.join(folder, "[0-9][0-9]-*")))]


def state_mask(options):
    """The examples rvs-evaluate left standing after `--after` (and every attack before it), as a mask."""
    robust = np.zeros(options.num_examples, bool)
    attacks = _state_attacks(options.state_dir)
    robust[attacks[0]["examples"]] = True  # the first attack runs on every correctly classified example
    for index in attacks:
        robust[index["broken"]] = False
        if index["attack"] == options.after:
            break
    else:
        raise SystemExit(f"--after: no attack {options.after!r} in {options.state_dir}")
    np.save(options.out, robust)
    print(f"wrote {options.out}: {int(robust.sum())} of {options.num_examples} standing after {options.after}")


def compare(options):
    """Per example: what each implementation broke that the other did not, and the worst case of both."""
    masks = np.load(options.robust)
    masks = {"model": masks} if isinstance(masks, np.ndarray) else dict(masks)
    print("| model | rvs_tf ensemble | AutoAttack (torchattacks) | broken by rvs_tf only | by AutoAttack only "
          "| both together |")
    print("|---|---|---|---|---|---|")
    for name, theirs in sorted(masks.items()):
        folder = options.state_dirs.format(name=name)
        attacks = _state_attacks(folder)
        if not attacks:
            print(f"| {name} | (no state in {folder}) | {100 * theirs.mean():.1f} | | | |")
            continue
        ours = np.zeros(len(theirs), bool)
        ours[attacks[0]["examples"]] = True  # the first attack runs on every correctly classified example
        for attack in attacks:
            ours[attack["broken"]] = False
        print(f"| {name} | {100 * ours.mean():.1f} | {100 * theirs.mean():.1f} | {int(np.sum(theirs & ~ours))} "
              f"| {int(np.sum(ours & ~theirs))} | {100 * np.mean(ours & theirs):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    out = sub.add_parser("export")
    out.add_argument("--model_file", required=True, help="a small_cnn .keras file (a run's best_classifier.keras)")
    out.add_argument("--out", required=True)
    out.add_argument("--num_examples", type=int, default=10000)
    run = sub.add_parser("attack")
    run.add_argument("--npz", required=True)
    run.add_argument("--eps", type=float, default=0.1)
    run.add_argument("--norm", choices=("Linf", "L2"), default="Linf")
    run.add_argument("--num_examples", type=int, default=10000)
    run.add_argument("--batch_size", type=int, default=2500)
    run.add_argument("--robust_out", default=None, help="where to save the per-example robust mask (.npy)")
    run.add_argument("--robust_in", default=None, help="attack only these examples (a robust mask, .npy)")
    run.add_argument("--attacks", default="apgd-ce,apgd-t,fab-t,square", help="which of AutoAttack's four")
    mask = sub.add_parser("state_mask")
    mask.add_argument("--state_dir", required=True, help="rvs-evaluate's state folder")
    mask.add_argument("--after", required=True, help="the attack (e.g. APGD-T) whose survivors to keep")
    mask.add_argument("--num_examples", type=int, required=True)
    mask.add_argument("--out", required=True)
    both = sub.add_parser("compare")
    both.add_argument("--robust", required=True, help="attack's --robust_out: one .npy, or an .npz of several")
    both.add_argument("--state_dirs", required=True, help="rvs-evaluate's state folder; {name}: the .npz key")
    options = parser.parse_args()
    {"export": export, "attack": attack, "compare": compare, "state_mask": state_mask}[options.command](options)


if __name__ == "__main__":
    main()
