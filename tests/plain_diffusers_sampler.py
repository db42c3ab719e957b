"""Run by test_export.py in a clean interpreter: load exported folders with diffusers alone and sample.

Usage: python -I plain_diffusers_sampler.py OUT.json SEED STEPS FOLDER...
The project must not be importable here: every route to it (an editable install's finder, a path
entry holding it) is taken away first, and whether that worked is reported.
"""

import importlib.util
import json
import os
import sys

out, seed, steps, folders = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "diffprune_bench"))]
importable = importlib.util.find_spec("diffprune_bench") is not None

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

results = {}
for folder in folders:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  eta=0.0, output_type="np").images
    zeros = sum(int((p == 0).sum()) for n, p in pipe.unet.named_parameters() if n.endswith("weight") and p.dim() > 1)
    results[folder] = {"unet_class": type(pipe.unet).__name__, "scheduler": type(pipe.scheduler).__name__,
                       "zero_weights": zeros, "images": images.tolist()}
loaded = sorted(name for name in sys.modules if name.startswith("diffprune"))
with open(out, "w") as handle:
    json.dump({"importable": importable, "project_modules": loaded, "folders": results}, handle)
