"""Vision data: ImageNet folder loading and its errors, the embedded digits written as image folders."""

import collections

import numpy as np
import pytest
import torch
from PIL import Image

from gblr.data import vision


def fake_imagenet(root, classes=("n01440764", "n01443537", "n01484850"), per_class=3, splits=("train", "val")):
    """A tiny ImageNet: root/<split>/<wnid>/<i>.JPEG, small random RGB images of odd sizes."""
    rng = np.random.default_rng(0)
    for split in splits:
        for wnid in classes:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(30 + i, 41, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG")
    return root


def test_imagenet_folder_loads_with_timm_transforms(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet")
    train, val, info = vision.build_vision_data("imagenet", root=root, img_size=32)
    assert len(train) == len(val) == 9 and info["num_classes"] == 3
    assert train.class_to_idx == val.class_to_idx and train.classes[0] == "n01440764"
    image, label = val[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert torch.equal(val[4][0], image)  # eval transform is deterministic (resize + center crop)
    assert train[0][0].shape == (3, 32, 32)
    assert info["root"] == str(root) and "ImageNet" in info["description"]
    train_tf = str(train.transform)  # the paper's fine-tuning recipe
    assert "RandAugment" in train_tf and "RandomErasing(p=0.25" in train_tf and "bicubic" in train_tf
    assert "Resize(size=35" in str(val.transform)  # crop_pct 0.9: 32 / 0.9 -> 35, then center crop


def test_imagenet_errors_name_the_path_and_the_layout(tmp_path):
    with pytest.raises(ValueError, match=r"set data.root=/path/to/imagenet"):
        vision.build_vision_data("imagenet", root=None)
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; expected train/<class>/\*\.JPEG"):
        vision.build_vision_data("imagenet", root=tmp_path / "nowhere")

    only_train = fake_imagenet(tmp_path / "only_train", splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"only_train/val does not exist; expected .*val/<class>/\*\.JPEG"):
        vision.build_vision_data("imagenet", root=only_train)

    flat_val = fake_imagenet(tmp_path / "flat_val", splits=("train",))
    (flat_val / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat_val / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match=r"flat_val/val has no class folders.*val/<wnid>/"):
        vision.build_vision_data("imagenet", root=flat_val)

    empty_class = fake_imagenet(tmp_path / "empty_class")
    (empty_class / "train" / "n09999999").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_class/train: .*n09999999.*expected train/<class>"):
        vision.build_vision_data("imagenet", root=empty_class)

    mismatch = fake_imagenet(tmp_path / "mismatch", splits=("train",))
    fake_imagenet(mismatch, classes=("n01440764", "n01443537"), splits=("val",))
    with pytest.raises(ValueError, match=r"train/ has 3 class folders and val/ has 2.*only in train: \['n01484850'\]"):
        vision.build_vision_data("imagenet", root=mismatch)

    with pytest.raises(ValueError, match="unknown vision dataset 'cifar10'.*imagenet.*digits"):
        vision.build_vision_data("cifar10")


def test_digits_written_once_as_image_folders_with_a_stratified_split(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    root = vision.prepare_digits(tmp_path)
    assert root == tmp_path / "digits"
    # the temporary folder and the lock are gone; the entry's record (key, checksum) stays beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "digits.json"]
    files = {split: sorted((root / split).glob("*/*.png")) for split in ("train", "val")}
    assert len(files["train"]) == 1437 and len(files["val"]) == 360
    names = [{p.name for p in files[s]} for s in ("train", "val")]
    assert not names[0] & names[1]  # each original image lands in exactly one split
    per_class = collections.Counter(p.parent.name for p in files["val"])
    assert sorted(per_class) == [str(d) for d in range(10)] and all(35 <= n <= 37 for n in per_class.values())

    digits = load_digits()
    path = files["val"][0]
    index = int(path.stem)
    assert str(digits.target[index]) == path.parent.name
    stored = np.asarray(Image.open(path))
    assert stored.shape == (8, 8) and np.array_equal(stored, np.round(digits.images[index] * 255 / 16))

    monkeypatch.setattr("sklearn.datasets.load_digits", lambda: pytest.fail("digits written twice"))
    assert vision.prepare_digits(tmp_path) == root


def test_digits_load_through_the_image_folder_path(tmp_path):
    train, val, info = vision.build_vision_data("digits", cache_dir=tmp_path)
    assert info["num_classes"] == 10 and (info["train_size"], info["val_size"]) == (1437, 360)
    assert info["description"].startswith("digits (scikit-learn bundled, 8x8)")
    assert "ImageNet" not in info["description"] and info["root"] == str(tmp_path / "digits")
    image, label = val[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])  # grey in three channels
    assert -1.0 <= image.min() and image.max() <= 1.0  # normalized with mean = std = 0.5
    assert torch.equal(train[0][0], train[0][0])  # no augmentation unless asked

    augmented, _, _ = vision.build_vision_data("digits", cache_dir=tmp_path, img_size=16, augment=True)
    assert augmented[0][0].shape == (3, 16, 16)
    assert any(not torch.equal(augmented[0][0], augmented[0][0]) for _ in range(5))
