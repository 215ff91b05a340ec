"""The paper presets' settings and dry-run FLOP reports, as the code at hand gives them:
    python tests/data/paper_presets.py > out.txt   (the JSON after the runs' summary tables)
paper_presets.json was made so at commit c5b6a15, before model families moved into gblr/tasks/;
tests/test_presets.py checks that the presets still give the same."""
import json, sys, time, tempfile
import torch
from omegaconf import OmegaConf
from gblr.system.config import compose
from gblr.run.runner import run

torch.manual_seed(0)
out = {}
for preset in ("vit_base_imagenet_ft", "gpt2_wikitext103_ft"):
    for kind in ("dense", "lowrank", "monarch", "gblr"):
        cfg = compose(f"experiment={preset}", f"weight={kind}", "dry_run=true", f"out_dir={tempfile.mkdtemp()}")
        c = OmegaConf.to_container(cfg, resolve=True)
        settings = {k: c[k] for k in ("budget", "train", "start", "weight", "seed")}
        settings["model"] = {k: c["model"][k] for k in ("name", "task", "pretrained", "targets", "kwargs")}
        settings["data"] = c["data"]
        out[f"{preset}/{kind}"] = {"settings": settings}
        if kind not in ("dense", "lowrank") or (preset.startswith("vit") and kind != "dense"):
            continue  # the dry runs that take seconds on a CPU (a projection of 36 to 60 large layers takes minutes)
        t = time.time()
        result = run(cfg)
        flops = {k: result["flops"][k] for k in ("tokens", "macs", "dense_macs", "replaced_macs", "replaced_dense_macs",
                                                 "replaced", "model", "paper", "paper_official", "paper_convention")}
        print(preset, kind, round(time.time() - t, 1), "s", flops["replaced"], flops["paper"], file=sys.stderr)
        out[f"{preset}/{kind}"]["flops"] = flops
print(json.dumps(out, indent=1, sort_keys=True))
