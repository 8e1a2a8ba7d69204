"""A user's image folder as a dataset: `root/<class_name>/*.jpg`, or `root/{train,test}/<class>/`.

Class names are the sorted class sub-folder names (of both splits together), so label indices do
not depend on the order the file system lists them in. Hidden files and folders (".DS_Store",
macOS's "._photo.jpg") are skipped, and so are files without an image extension (a README.txt).

Every listed image is checked before any is decoded (`check`), because a file that `tf.data`
fails to decode stops the pipeline with an error that does not say which file it was. The check
reads a file's first bytes (its format, as tf.io.decode_image tells it), looks for a JPEG's
end-of-image marker and checks a PNG's chunks (their CRCs); it decodes no pixels (see
`check_images` for its cost). Symbolic links whose targets are gone are named in a warning and
skipped. `data.coop` checks its lists' images with the same `check_images`.
"""
import functools
import os
import warnings
import zlib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Image formats that are skipped (tf.io.decode_image does not read them): named in a warning,
# because a user who put them there expects them to be used. Other files are skipped silently.
_UNREAD_IMAGE_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2")
# How a file of each format that tf.io.decode_image reads begins (WebP: see `_image_format`).
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (_PNG_SIGNATURE, "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))
_FORMATS = "JPEG, PNG, GIF, BMP or WebP"
_TAIL_BYTES = 4096  # where a file's end marker is looked for first
_NAMED = 10  # bad files or classes named in one message
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


def _dangling_links(directory):
    """Paths of the symbolic links in `directory` whose targets do not exist (neither a class
    nor an image: the listing skips them), sorted; hidden ones are left out."""
    return sorted(entry.path for entry in os.scandir(directory)
                  if not entry.name.startswith(".") and entry.is_symlink()
                  and not os.path.exists(entry.path))


def class_dirs(root, splits):
    """Sorted class sub-folder names found under `root/<split>` for any of `splits`.

    Refuses fewer than two: with one class every image is classified right, whatever the model.
    A symbolic link to a folder that is gone is no class (named in that refusal).
    """
    names = set()
    for split in splits:
        split_root = os.path.join(root, split)
        names.update(
            entry.name for entry in os.scandir(split_root)
            if entry.is_dir() and not entry.name.startswith("."))
    layout = ("expected root/<class_name>/*.jpg or root/train/<class_name>/ and "
              "root/test/<class_name>/.")
    links = [link for split in dict.fromkeys(splits)
             for link in _dangling_links(os.path.join(root, split))]
    links = f" (dangling symbolic links: {_some(links)})" if links else ""
    if not names:
        raise ValueError(f"Image folder {root!r} has no class sub-folders{links}; {layout}")
    if len(names) < 2:
        raise ValueError(
            f"Image folder {root!r} has a single class sub-folder ({names.pop()!r}){links}; "
            f"classification needs at least 2 classes: {layout}")
    return tuple(sorted(names))


def _listing(class_root):
    """(image file names, skipped image-like file names) in a class folder, sorted."""
    names = sorted(entry.name for entry in os.scandir(class_root)
                   if entry.is_file() and not entry.name.startswith("."))
    return ([name for name in names if name.lower().endswith(IMAGE_EXTENSIONS)],
            [name for name in names if name.lower().endswith(_UNREAD_IMAGE_EXTENSIONS)])


def _some(items):
    """The first `_NAMED` of `items`, joined, and how many more there are."""
    items = list(items)
    more = f" and {len(items) - _NAMED} more" if len(items) > _NAMED else ""
    return ", ".join(items[:_NAMED]) + more


def _scan(root, split, classes):
    """(image paths, labels, class folders without images, skipped image-like files) of a split."""
    paths, labels, empty, unread = [], [], [], []
    for label, name in enumerate(classes):
        class_root = os.path.join(root, split, name)
        if not os.path.isdir(class_root):
            empty.append(f"{class_root} (missing)")
            continue
        images, skipped = _listing(class_root)
        if not images:
            empty.append(class_root)
        paths.extend(os.path.join(class_root, file_name) for file_name in images)
        labels.extend([label] * len(images))
        unread.extend(os.path.join(class_root, file_name) for file_name in skipped)
    return paths, labels, empty, unread


def files(root, split, classes):
    """Image paths under `root/<split>/<class>/` (sorted) and their label indices into `classes`.

    Lists only: `check` vets the folder first.
    """
    paths, labels, _, _ = _scan(root, split, classes)
    return paths, labels


def check(root, splits, classes):
    """Refuses what would go wrong later in the (train, test) `splits`, before any image is decoded.

    Every class needs a training image (the model could never learn one without it); a class
    without test images only warns (its accuracy is not measured). Raises naming every file of
    either split that would not decode (`check_images`): a bad test image stops the run before
    training, not after it. Warns naming files in image formats that are not read.
    """
    kinds = ", ".join(IMAGE_EXTENSIONS)
    all_paths, links = [], []
    for split in dict.fromkeys(splits):
        split_root = os.path.join(root, split)
        links += _dangling_links(split_root)
        links += [link for name in classes if os.path.isdir(os.path.join(split_root, name))
                  for link in _dangling_links(os.path.join(split_root, name))]
        paths, _, empty, unread = _scan(root, split, classes)
        if empty and split == splits[0]:
            raise ValueError(
                f"Image folder {root!r}: {len(empty)} of {len(classes)} classes have no training "
                f"images ({kinds}), and every class needs some; add images to or remove "
                f"{_some(empty)}.")
        if not paths:
            raise ValueError(f"No images ({kinds}) under {os.path.join(root, split)!r}.")
        if empty:
            warnings.warn(
                f"Image folder {root!r}: {len(empty)} of {len(classes)} classes have no test "
                f"images, so their accuracy is not measured: {_some(empty)}.", stacklevel=2)
        if unread:
            warnings.warn(
                f"Image folder {root!r}: {len(unread)} files are skipped because only {kinds} "
                f"files are read: {_some(unread)}.", stacklevel=2)
        all_paths.extend(paths)
    if links:
        warnings.warn(
            f"Image folder {root!r}: {len(links)} dangling symbolic links (their targets do not "
            f"exist) are skipped, as neither images nor classes: {_some(links)}.", stacklevel=2)
    check_images(tuple(all_paths))


def _jpeg_data_start(file):
    """Offset of the first scan's entropy-coded data, found by walking the JPEG's marker segments
    (so an EXIF thumbnail's end marker is not taken for the image's); None for a broken header."""
    position = 2
    while True:
        file.seek(position)
        head = file.read(4)
        if len(head) < 4 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # a fill byte
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            position += 2
        else:
            position += 2 + int.from_bytes(head[2:], "big")
            if marker == 0xDA:  # start of scan
                return position


def _has_end_marker(file, start, marker):
    """Whether `marker` occurs in `file` after byte `start`: looked for in its last bytes first, and
    only where it is not there (data appended after the image, as in a phone's motion photo) in the
    whole rest."""
    size = file.seek(0, os.SEEK_END)
    tail_start = max(start, size - _TAIL_BYTES)
    file.seek(tail_start)
    if marker in file.read():
        return True
    if tail_start == start:
        return False
    file.seek(start)
    return marker in file.read()


def _png_problem(file):
    """Why a PNG's chunks would not decode, or None: a chunk cut short (no IEND chunk at the
    end), or a critical chunk whose CRC does not match its bytes (damaged data, which libpng
    refuses; damaged ancillary chunks it skips, and so does this check)."""
    position = len(_PNG_SIGNATURE)
    while True:
        file.seek(position)
        head = file.read(8)
        length = int.from_bytes(head[:4], "big")
        body = file.read(length + 4)
        if len(head) < 8 or len(body) < length + 4:
            return "truncated (its PNG data has no end marker)"
        kind = head[4:]
        critical = not kind[0] & 0x20  # an upper-case first letter
        if critical and zlib.crc32(kind + body[:length]) != int.from_bytes(body[length:], "big"):
            return (f"its PNG chunk {kind.decode('latin-1')!r} at byte {position} is damaged "
                    "(its CRC does not match)")
        if kind == b"IEND":
            return None
        position += 12 + length


def _image_format(head):
    """The format that tf.io.decode_image would take a file starting with `head` for, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _problem(path):
    """Why `path` would not decode, or None, from its bytes, not its pixels.

    Catches what is not an image (an empty file, text or HTML saved as .jpg), formats that
    tf.io.decode_image does not read (it too goes by these first bytes), JPEG and PNG files cut
    short (an interrupted download or copy) and PNG data damaged inside (its chunks' CRCs). Not
    caught: damage inside a JPEG's compressed data (which TensorFlow's decoder mostly decodes
    anyway, with a warning).
    """
    try:
        with open(path, "rb") as file:
            head = file.read(12)
            image_format = _image_format(head)
            if image_format is None:
                return (f"not a {_FORMATS} file (it starts with {head!r})" if head
                        else "an empty file")
            if image_format == "JPEG":
                start, marker = _jpeg_data_start(file), b"\xff\xd9"
                if start is None:
                    return "a JPEG whose header is cut short or broken"
            elif image_format == "PNG":
                return _png_problem(file)
            else:
                return None
            if not _has_end_marker(file, start, marker):
                return f"truncated (its {image_format} data has no end marker)"
    except OSError as error:
        return f"unreadable ({error})"
    return None


@functools.lru_cache(maxsize=8)
def check_images(paths):
    """Raises naming every file of `paths` (a tuple) that would not decode (see `_problem`).

    Cached: a listing is checked once per process. It reads a few bytes per file, a small
    fraction of decoding it; it runs in one thread because it is Python-bound (a thread pool
    made it slower; docs/results.md, "Smaller measurements behind design choices").
    """
    problems = [f"{path}: {problem}" for path in paths if (problem := _problem(path)) is not None]
    if problems:
        raise ValueError(
            f"{len(problems)} image files cannot be decoded; remove or replace them: "
            f"{_some(problems)}.")
