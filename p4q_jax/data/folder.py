"""A user's image folder as a dataset: `root/<class_name>/*.jpg`, or `root/{train,test}/<class>/`.

Class names are the sorted class sub-folder names (of both splits together), so label indices do
not depend on the order the file system lists them in.
"""
import os
import warnings

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_SPLIT_DIRS = ("train", "test")


def split_dirs(root):
    """The (train, test) sub-folders of `root`: ("train", "test") if both exist, else ("", "").

    Without them the whole folder serves as both splits (with a warning), so test accuracy is then
    measured on the training images.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist or is not a directory.")
    if all(os.path.isdir(os.path.join(root, split)) for split in _SPLIT_DIRS):
        return _SPLIT_DIRS
    warnings.warn(
        f"Image folder {root!r} has no 'train' and 'test' sub-folders; the whole folder is used "
        "as both the training and the test split, so test accuracy is measured on training images.",
        stacklevel=2)
    return ("", "")


def class_dirs(root, splits):
    """Sorted class sub-folder names found under `root/<split>` for any of `splits`."""
    names = set()
    for split in splits:
        split_root = os.path.join(root, split)
        names.update(
            entry.name for entry in os.scandir(split_root)
            if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise ValueError(
            f"Image folder {root!r} has no class sub-folders; expected root/<class_name>/*.jpg or "
            "root/train/<class_name>/ and root/test/<class_name>/.")
    return tuple(sorted(names))


def files(root, split, classes):
    """Image paths under `root/<split>/<class>/` (sorted) and their label indices into `classes`."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_root = os.path.join(root, split, name)
        if not os.path.isdir(class_root):
            continue
        for file_name in sorted(os.listdir(class_root)):
            if file_name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(class_root, file_name))
                labels.append(label)
    if not paths:
        raise ValueError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {os.path.join(root, split)!r}.")
    return paths, labels
