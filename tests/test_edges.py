"""Guarantees at the edges: verified exports, cache entries that heal, data checked before compute,
file modes and no leftover lock."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading

import pytest
import torch

import gblr.run.runner
import gblr.system.files
from gblr.run import export
from gblr.run.runner import run
from gblr.structure.surgery import replace_layers
from gblr.tasks.vision import VIT_TARGETS
from gblr.system.config import ROOT, compose
from gblr.system.errors import BadInput
from gblr.system.files import BadFile, Busy, cached, locked

QUICK = ["start.epochs=2", "train.epochs=1", "train.batch_size=128", "weight=lowrank"]


def command(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


def vit_export(folder, seed=0):
    """A tiny ViT with low-rank layers exported into ``folder`` (no run: seconds)."""
    from gblr.tasks.vision import build_timm

    torch.manual_seed(seed)
    model, _ = build_timm("vit_tiny")
    replace_layers(model, VIT_TARGETS, "lowrank", 0.3)
    export.save(folder, model, {"model": "vit_tiny", "weight": "lowrank", "budget": 0.3})
    return model


# 1. Verified exports


def test_a_changed_or_copied_export_is_refused_naming_the_file(tmp_path):
    vit_export(tmp_path / "a", seed=0)
    vit_export(tmp_path / "b", seed=1)  # same shapes, other weights
    weights = tmp_path / "a" / "model.safetensors"
    original = weights.read_bytes()
    assert len(json.loads((tmp_path / "a" / "model.json").read_text())["sha256"]) == 64
    export.load(tmp_path / "a")  # as written: loads

    flipped = bytearray(original)
    flipped[-5] ^= 0x01  # one byte of the last tensor
    weights.write_bytes(bytes(flipped))
    message = rf"^{re.escape(str(weights))} does not match its model.json \(sha256 .*\): the file was changed or is another run's"
    with pytest.raises(BadFile, match=message):
        export.load(tmp_path / "a")
    shutil.copy(tmp_path / "b" / "model.safetensors", weights)
    with pytest.raises(BadFile, match=message):
        export.load(tmp_path / "a")
    assert (tmp_path / "a" / "model.json").exists() and weights.exists()  # nothing removed


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"]["args"].update(embed_dim=2**20),
     r"model\.args\.embed_dim \(1048576\) gives cls_token the shape \(1, 1, 1048576\), the weights hold \(1, 1, 64\)"),
    (lambda c: c["model"]["args"].update(depth=400), r"the architecture \(model\.args\) has blocks\.4\.norm1\.weight, which the weights lack"),
    (lambda c: c["layers"][0].update(in_features=2**20), r"layers\[0\]\.in_features is 1048576, the architecture's blocks\.0\.attn\.q has 64"),
    (lambda c: c["layers"][0]["options"].update(rank=2**30), r"layers\[0\] \(blocks\.0\.attn\.q\): rank must be in \[1, 64\]"),
    (lambda c: c.update(dtype="os.system"), r"dtype 'os\.system' is not a torch dtype"),
], ids=["embed_dim", "depth", "in_features", "rank", "dtype"])
def test_a_hand_edited_size_in_model_json_is_refused_before_it_is_built(tmp_path, monkeypatch, edit, message):
    vit_export(tmp_path)
    config = json.loads((tmp_path / "model.json").read_text())
    edit(config)
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(BadFile, match=rf"^{re.escape(str(tmp_path))}/model\.json.*{message}"):
        export.load(tmp_path)


def test_an_export_without_a_sha256_loads_with_a_warning(tmp_path, caplog):
    model = vit_export(tmp_path)
    config = json.loads((tmp_path / "model.json").read_text())
    del config["sha256"]
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(BadFile, match="does not match its model.json"):  # the current format must record it
        export.load(tmp_path)
    config["format"] = export.UNVERIFIED  # as written before the sha256 was recorded
    (tmp_path / "model.json").write_text(json.dumps(config))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(export.load(tmp_path)(x), model.eval()(x))
    assert "records no sha256 (an export of an older gblr)" in caplog.text and "loaded unverified" in caplog.text


# 4. File modes and leftovers


def test_every_file_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        vit_export(tmp_path)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "model.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_a_lock_is_removed_safely_while_a_second_process_waits_for_it(tmp_path, monkeypatch):
    """B opens the lock file while A holds it and waits; A removes the file and releases it. B must then
    hold the lock of the path's file, not of the removed one: a third taker C is refused."""
    path = tmp_path / ".lock"
    b_waits, b_holds, b_done = threading.Event(), threading.Event(), threading.Event()

    class Log:
        def info(self, message):
            if message.startswith("waiting for"):
                b_waits.set()  # B has the file open and is about to wait on it

        def warning(self, message):
            pass

    monkeypatch.setattr(gblr.system.files, "log", Log())

    def second():
        with locked(path, what="B's", wait=True):
            b_holds.set()
            b_done.wait(60)

    with locked(path, what="A's"):
        b = threading.Thread(target=second)
        b.start()
        assert b_waits.wait(60)
    assert b_holds.wait(60)
    try:
        with pytest.raises(Busy, match="is in use by pid"):
            with locked(path, what="C's"):
                pass
    finally:
        b_done.set()
        b.join(60)
    assert not path.exists()  # the last holder removed it


def test_a_finished_run_leaves_no_lock_and_all_its_files_follow_the_umask(tmp_path, cache_dir):
    old = os.umask(0o022)
    try:
        run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path}", *QUICK))
    finally:
        os.umask(old)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint.pt", "model.json", "model.safetensors", "results.json"]
    assert all(stat.S_IMODE((tmp_path / n).stat().st_mode) == 0o644 for n in names)
    export.load(tmp_path)  # the run's own export verifies


# 2. Bad cache entries heal


def test_a_folder_where_a_cache_file_belongs_is_moved_aside_and_the_entry_made_again(tmp_path, caplog):
    entry = tmp_path / "tokenizer.json"
    entry.mkdir()
    (entry / "notes.txt").write_text("the user's")  # not the cache's to delete
    made = cached(entry, "key", lambda tmp: open(tmp, "w").write("made"), lambda p: p.read_text())
    assert made == "made" and entry.is_file()
    [aside] = tmp_path.glob("tokenizer.json.bad-*")
    assert (aside / "notes.txt").read_text() == "the user's"
    assert f"warning: cache entry {entry} is a folder where a file belongs; making it again" in caplog.text
    assert f"moved it to {aside}" in caplog.text
    assert cached(entry, "key", lambda tmp: pytest.fail("made again"), lambda p: p.read_text()) == "made"


def test_a_symlinked_data_folder_without_a_record_is_replaced_not_followed(tmp_path, cache_dir, caplog):
    from gblr.data.vision import prepare_digits

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(prepare_digits(cache_dir), elsewhere)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "digits").symlink_to(elsewhere)  # a shared copy, but no record beside the link
    folder = prepare_digits(tmp_path / "cache")
    assert folder.is_dir() and not folder.is_symlink() and len(list(folder.rglob("*.png"))) == 1797
    [aside] = (tmp_path / "cache").glob("digits.bad-*")
    assert aside.is_symlink() and len(list(elsewhere.rglob("*.png"))) == 1797  # the target untouched
    assert "has no readable record" in caplog.text and "moved it to" in caplog.text
    caplog.clear()
    assert prepare_digits(tmp_path / "cache") == folder and "warning" not in caplog.text  # healed for good


def test_a_folder_in_place_of_the_dense_start_is_moved_aside_before_training(tmp_path, caplog):
    cache = tmp_path / "cache"
    first = run(compose(f"cache_dir={cache}", f"out_dir={tmp_path / 'a'}", *QUICK))
    [start] = list((cache / "starts").glob("*.pt"))
    start.unlink()
    start.mkdir()
    (start / "notes.txt").write_text("the user's")
    second = run(compose(f"cache_dir={cache}", f"out_dir={tmp_path / 'b'}", *QUICK))
    assert second["metrics"]["start_top1"] == first["metrics"]["start_top1"] and start.is_file()
    assert f"warning: the cached dense start {start} is a folder where a file belongs; training it again" in caplog.text
    [aside] = (cache / "starts").glob(start.name + ".bad-*")
    assert (aside / "notes.txt").read_text() == "the user's"


# 3. Data checked before compute


def image_folder(root, classes, bad=()):
    """root/{train,val}/<class>/<i>.png, 3 tiny images each; the names in ``bad`` hold bytes that are no image."""
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i).save(root / split / c / f"{i}.png")
    for name in bad:
        (root / name).write_bytes(b"\x89PNG not really")
    return root


BAD_DATA = [
    (["model=gpt2_tiny", "data=pydoc", "data.eval_stride=0"], "data.eval_stride must be null or an integer >= 1, got 0"),
    (["model=gpt2_tiny", "data=pydoc", "data.eval_stride=abc"], "data.eval_stride must be null or an integer >= 1, got 'abc'"),
    (["model=gpt2_tiny", "data=pydoc", "data.eval_stride=64"],
     "data.eval_stride must be null or less than data.block_size (64), got 64"),
    (["seed=18446744073709551616"], "seed must be an integer from 0 to 18446744073709551615, got 18446744073709551616"),
    (["start.seed=18446744073709551616"], "start.seed must be an integer from 0 to 18446744073709551615"),
    (["data=imagenet", "data.root=ONE"],
     "data.num_classes is 1000, but ONE/train has 1 class folders; set data.num_classes=1 or point data.root"),
    (["data=imagenet", "data.root=BAD", "data.num_classes=2"],
     "image file BAD/train/b/1.png cannot be read (cannot identify image file"),
]


@pytest.mark.parametrize("overrides, message", BAD_DATA, ids=["stride-0", "stride-abc", "stride-block", "seed",
                                                              "start.seed", "classes", "corrupt-image"])
def test_bad_data_is_one_error_before_the_dense_start(tmp_path, cache_dir, monkeypatch, overrides, message):
    monkeypatch.setattr(gblr.run.runner, "train", lambda *a, **k: pytest.fail("trained before the data was checked"))
    one = image_folder(tmp_path / "one", ["a"])
    bad = image_folder(tmp_path / "bad", ["a", "b"], bad=["train/b/1.png"])
    paths = {"ONE": str(one), "BAD": str(bad)}
    overrides = [re.sub("ONE|BAD", lambda m: paths[m.group()], o) for o in overrides]
    with pytest.raises(BadInput, match="^" + re.escape(re.sub("ONE|BAD", lambda m: paths[m.group()], message))):
        run(compose(f"cache_dir={cache_dir}", f"out_dir={tmp_path / 'out'}", *overrides))
    assert not (tmp_path / "out" / "results.json").exists() and (bad / "train/b/1.png").exists()


def test_skip_bad_images_skips_them_with_one_warning(tmp_path, caplog):
    from gblr.data.vision import build_vision_data

    root = image_folder(tmp_path, ["a", "b"], bad=["train/b/1.png", "val/a/0.png"])
    train, val, info = build_vision_data("imagenet", root=root, img_size=32, num_classes=2, skip_bad_images=True)
    assert (len(train), len(val), info["train_size"]) == (5, 5, 5)
    assert [r.message for r in caplog.records if "skip_bad_images" in r.message] == [
        f"warning: data.skip_bad_images=true: skipped 2 image file(s) that cannot be read: {root}/train/b/1.png, "
        f"{root}/val/a/0.png"]
    assert all(train[i][0].shape == (3, 32, 32) for i in range(len(train)))  # what is left loads
    assert (root / "train/b/1.png").exists()  # skipped, not deleted


def test_a_corrupt_image_exits_2_with_one_line_naming_it(tmp_path):
    root = image_folder(tmp_path / "data", ["a", "b"], bad=["val/a/2.png"])
    done = command(f"out_dir={tmp_path / 'out'}", "data=imagenet", f"data.root={root}", "data.num_classes=2",
                   f"cache_dir={tmp_path / 'cache'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: image file {root}/val/a/2.png cannot be read (")
    assert not (tmp_path / "out" / "results.json").exists() and not (tmp_path / "cache" / "starts").exists()
