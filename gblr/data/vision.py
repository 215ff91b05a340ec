"""Image classification data: ImageNet from a local folder, and an embedded offline stand-in.

Both datasets go through one code path, `image_folder_datasets`: torchvision ImageFolder over

    root/train/<class>/*.JPEG
    root/val/<class>/*.JPEG

ImageNet uses timm's `create_transform` with the paper's fine-tuning recipe
(RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, bicubic; eval crop 0.9 bicubic).
"digits" is scikit-learn's bundled `load_digits` (1,797 8x8 grey images, 10 classes, no
download), written once as PNG files in the same layout, so that a machine with no network and
no ImageNet can still run the whole pipeline. It is named for what it is: nothing trained on it
is an ImageNet result.
"""

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torchvision import datasets, transforms

from gblr.data import default_cache_dir
from gblr.system.files import cached
from gblr.system.errors import BadInput, MissingInput

log = logging.getLogger("gblr")

# timm's default ViT-B/16 weights (augreg) normalize with mean = std = 0.5. Pass the
# model's own pretrained_cfg mean/std when it differs (e.g. DeiT weights use ImageNet mean/std).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)

IMAGENET_DESCRIPTION = "ImageNet-1k (ILSVRC 2012, local folder)"
DIGITS_DESCRIPTION = "digits (scikit-learn bundled, 8x8)"
LAYOUT = "train/<class>/*.JPEG and val/<class>/*.JPEG"

# The digits split is fixed so that every run, and every cached copy, sees the same images.
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0



def image_folder_datasets(root, train_transform, eval_transform, skip_bad_images=False):
    """(train, val) ImageFolder datasets over root/train/<class>/* and root/val/<class>/*.

    Samples are (image tensor as the transform returns it, class index). Both splits share one
    class_to_idx (sorted folder names); a val/ whose class folders differ from train/ is an error,
    because the labels would silently disagree. Every image's header is read first (``drop_bad_images``):
    a file that is not an image is an error naming it, or skipped with skip_bad_images=True.
    """
    if root is None:
        raise BadInput(f"no image folder given: set data.root=/path/to/imagenet (a folder with {LAYOUT})")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingInput(f"image folder {root} does not exist; expected {LAYOUT} under it")
    splits = {}
    for split, transform in (("train", train_transform), ("val", eval_transform)):
        path = root / split
        if not path.is_dir():
            raise MissingInput(f"{path} does not exist; expected {LAYOUT} under {root}")
        if not any(p.is_dir() for p in path.iterdir()):
            raise BadInput(
                f"{path} has no class folders; expected {split}/<class>/*.JPEG under {root} "
                "(the ILSVRC2012 val tarball is flat: sort it into val/<wnid>/ first)"
            )
        try:
            splits[split] = datasets.ImageFolder(path, transform=transform)
        except FileNotFoundError as e:
            raise MissingInput(f"{path}: {e}; expected {LAYOUT} under {root}") from None
    train, val = splits["train"], splits["val"]
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))[:5]
        only_val = sorted(set(val.classes) - set(train.classes))[:5]
        raise BadInput(
            f"{root}: train/ has {len(train.classes)} class folders and val/ has {len(val.classes)}, "
            f"not the same set (only in train: {only_train}, only in val: {only_val}); "
            "both splits need the same <class> folders"
        )
    drop_bad_images([train, val], skip_bad_images)
    return train, val


def image_problem(path: str) -> str | None:
    """Why the image file at ``path`` cannot be read (its header and, where the format has one, its
    checksum: PIL's ``verify``), or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many kinds: UnidentifiedImageError, OSError, SyntaxError, ...
        return str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    return None


def drop_bad_images(splits: list, skip: bool) -> None:
    """Check every file of the ImageFolders ``splits`` before any compute (threads: the files are read,
    not decoded). A bad one is BadInput naming it, or with ``skip`` removed from its dataset, all of
    them listed in one warning."""
    paths = [path for dataset in splits for path, _ in dataset.samples]
    with ThreadPoolExecutor(max_workers=16) as pool:
        problems = {path: problem for path, problem in zip(paths, pool.map(image_problem, paths)) if problem}
    if not problems:
        return
    first, reason = next(iter(problems.items()))
    if not skip:
        more = f" (and {len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        raise BadInput(f"image file {first} cannot be read ({reason}){more}; remove or replace it, or set "
                       f"data.skip_bad_images=true to skip bad files")
    for dataset in splits:
        dataset.samples = [s for s in dataset.samples if s[0] not in problems]
        dataset.imgs, dataset.targets = dataset.samples, [label for _, label in dataset.samples]
    log.warning(f"warning: data.skip_bad_images=true: skipped {len(problems)} image file(s) that cannot be read: "
                f"{', '.join(problems)}")


def imagenet_transforms(
    img_size=224,
    mean=DEFAULT_MEAN,
    std=DEFAULT_STD,
    auto_augment="rand-m9-mstd0.5-inc1",
    re_prob=0.25,
    crop_pct=0.9,
    interpolation="bicubic",
):
    """(train, eval) timm transforms, the paper's ViT-B fine-tuning recipe.

    Train: RandomResizedCrop(img_size) + flip + RandAugment + normalize + random erasing
    (per-pixel noise, DeiT style). Eval: resize to img_size / crop_pct, center crop img_size.
    Both give float tensors (3, img_size, img_size), normalized by mean/std.
    """
    from timm.data import create_transform

    train = create_transform(
        img_size,
        is_training=True,
        auto_augment=auto_augment,
        re_prob=re_prob,
        re_mode="pixel",
        interpolation=interpolation,
        mean=mean,
        std=std,
    )
    evaluation = create_transform(
        img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std
    )
    return train, evaluation


def imagenet_datasets(root, img_size=224, mean=DEFAULT_MEAN, std=DEFAULT_STD, skip_bad_images=False,
                      **transform_kwargs):
    """(train, val) ImageNet datasets from root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG.

    transform_kwargs go to `imagenet_transforms` (auto_augment, re_prob, crop_pct, interpolation).
    """
    train_tf, eval_tf = imagenet_transforms(img_size, mean, std, **transform_kwargs)
    return image_folder_datasets(root, train_tf, eval_tf, skip_bad_images)


def prepare_digits(cache_dir=None) -> Path:
    """Write scikit-learn's digits as PNG folders once; return the folder (cache_dir/digits).

    Layout: train/<digit>/<index>.png and val/<digit>/<index>.png, 8x8 8-bit grey, pixel value
    round(v * 255 / 16) of the original 0..16 intensity; <index> is the row in load_digits().
    Split: stratified by class, DIGITS_VAL_FRACTION to val, seed DIGITS_SPLIT_SEED (1,437 train /
    360 val). A checksummed cache entry (``gblr.system.files.cached``): a crash or a concurrent run never
    leaves a half-written dataset behind, and a damaged one is written again.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = Path(cache_dir or default_cache_dir()).expanduser() / "digits"

    def write_pngs(tmp):
        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype("uint8")  # (1797, 8, 8)
        labels = digits.target
        train_idx, val_idx = train_test_split(
            range(len(labels)), test_size=DIGITS_VAL_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED
        )
        for split, indices in (("train", train_idx), ("val", val_idx)):
            for i in indices:
                folder = Path(tmp) / split / str(labels[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(folder / f"{i:04d}.png")

    return cached(target, {"version": 1, "val_fraction": DIGITS_VAL_FRACTION, "seed": DIGITS_SPLIT_SEED},
                  write_pngs, lambda path: path, directory=True)


def digits_transforms(img_size=32, mean=DEFAULT_MEAN, std=DEFAULT_STD, augment=False):
    """(train, eval) transforms for the digits: grey -> 3 channels, bicubic upscale to img_size.

    Output: float tensors (3, img_size, img_size), normalized by mean/std. ImageFolder's loader
    already converts to RGB (three equal channels), so a ViT patch embedding sees a standard input.
    augment=True adds a small random affine (rotation 10 degrees, shift 10%) to training only.
    """
    common = [
        transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ]
    train = ([transforms.RandomAffine(degrees=10, translate=(0.1, 0.1))] if augment else []) + common
    return transforms.Compose(train), transforms.Compose(common)


def digits_datasets(cache_dir=None, img_size=32, mean=DEFAULT_MEAN, std=DEFAULT_STD, augment=False,
                    skip_bad_images=False):
    """(train, val) digits datasets, through the same ImageFolder path as ImageNet."""
    root = prepare_digits(cache_dir)
    train_tf, eval_tf = digits_transforms(img_size, mean, std, augment)
    return image_folder_datasets(root, train_tf, eval_tf, skip_bad_images)


VISION_DATASETS = ("imagenet", "digits")


def build_vision_data(
    name,
    root=None,
    cache_dir=None,
    img_size=None,
    mean=DEFAULT_MEAN,
    std=DEFAULT_STD,
    augment=False,
    num_classes=None,
    skip_bad_images=False,
    **imagenet_transform_kwargs,
):
    """(train_ds, val_ds, info) for name in VISION_DATASETS.

    img_size: side in pixels of the model input; None -> 224 for imagenet, 32 for digits.
    root: the ImageNet folder (data.root); ignored for digits, which live in cache_dir/digits.
    augment: digits only. imagenet_transform_kwargs: see `imagenet_transforms`.
    num_classes: the classes the model's head has (data.num_classes); a folder with another number
    of class folders is BadInput (a 1-class folder against a 1000-way head would score 100% top-1).
    skip_bad_images: skip image files that cannot be read (with one warning) instead of refusing them.
    info: name, description (says which data it really is), num_classes, root, img_size,
    mean, std, train_size, val_size.
    """
    if name == "imagenet":
        img_size = img_size or 224
        train, val = imagenet_datasets(root, img_size, mean, std, skip_bad_images, **imagenet_transform_kwargs)
        description = f"{IMAGENET_DESCRIPTION} at {img_size}px"
    elif name == "digits":
        img_size = img_size or 32
        train, val = digits_datasets(cache_dir, img_size, mean, std, augment, skip_bad_images)
        description = f"{DIGITS_DESCRIPTION}, upscaled to {img_size}x{img_size}, 3 channels"
    else:
        raise BadInput(f"unknown vision dataset {name!r}; choose one of {VISION_DATASETS}")
    if num_classes is not None and len(train.classes) != num_classes:
        raise BadInput(f"data.num_classes is {num_classes}, but {Path(train.root)} has {len(train.classes)} class "
                       f"folders; set data.num_classes={len(train.classes)} or point data.root at a folder with "
                       f"{num_classes} classes")
    info = {
        "name": name,
        "description": description,
        "num_classes": len(train.classes),
        "root": str(Path(train.root).parent),
        "img_size": img_size,
        "mean": list(mean),
        "std": list(std),
        "train_size": len(train),
        "val_size": len(val),
    }
    return train, val, info
