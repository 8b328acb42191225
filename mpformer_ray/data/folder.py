"""A folder of images beside a folder of label PNGs -> semantic records (local or ``s3://``).

    python jobs/prepare_data.py --dataset folder --images DIR --masks DIR --classes FILE --out OUT

- Pairing: an image and its label share their path under the two folders, less the extension:
  ``images/site a/0001.jpg`` (any image extension, any case) pairs with ``masks/site a/0001.png``;
  sub-folders mirror each other. Hidden files and folders (a leading ``.``) are left out.
- A label PNG holds one value per pixel (8- or 16-bit grey, or a palette image's indices): value v in
  0..K-1 is class v, the v-th name of ``--classes``; ``--ignore-index`` (default 255) is ignored in
  training and evaluation; any other value is counted as ``unknown_label`` and ignored too.
- ``--classes``: a text file with one name per line (blank lines skipped), or a YAML / JSON list of
  names (or a mapping {0: name, 1: name, ...}); ``.yaml`` / ``.yml`` / ``.json`` files are read as YAML.
  Every class is stuff (``isthing: false``): label maps have no instances.

Counted, not converted (``ConversionReport``): an image without a label (``missing_label``), a label
without an image (``missing_image``), two images that would share one label (``duplicate_image``), an
image or label that does not decode (``unreadable_image``, ``unreadable_label``), a colour label image
(``rgb_label``), a label of another size than its image (``label_size_mismatch``).
"""

from __future__ import annotations

import functools
import posixpath
from collections import defaultdict

import numpy as np
import pyarrow.fs as pafs
import yaml

from mpformer_ray import storage
from mpformer_ray.data.label_files import class_segments, lookup, read_image, read_label
from mpformer_ray.data.records import ConversionReport, DataError, Work, make_row

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IGNORE = 255  # the records' ignore value (uint8 label maps)


def list_files(uri: str) -> list[str]:
    """Paths (``/``-separated, relative to ``uri``) of every file under ``uri``, recursively, sorted; hidden
    files and folders left out. Empty when ``uri`` does not exist."""
    fs, base = storage.resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list {uri}: {type(e).__name__}: {e}") from e
    files = []
    for info in infos:
        rel = posixpath.relpath(info.path, base)
        if info.type == pafs.FileType.File and not any(part.startswith(".") for part in rel.split("/")):
            files.append(rel)
    return sorted(files)


def read_class_names(uri: str) -> list[str]:
    """The class names in ``uri`` (module docstring: text lines, or a YAML / JSON list or index mapping)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"--classes {uri}: not a UTF-8 text file; give one class name per line, or a YAML / "
                        "JSON list of names") from None
    if uri.lower().endswith((".yaml", ".yml", ".json")):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(f"--classes {uri}: not valid YAML / JSON ({e})") from None
        if isinstance(data, dict) and sorted(data) == list(range(len(data))):
            data = [data[i] for i in range(len(data))]
        if not isinstance(data, list) or not all(isinstance(n, (str, int, float)) for n in data):
            raise DataError(f"--classes {uri}: expected a list of class names (index i = label value i), or a "
                            f"mapping {{0: name, 1: name, ...}}; got {type(data).__name__}")
        names = [str(n).strip() for n in data]
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(names):
        raise DataError(f"--classes {uri}: no class names (or an empty one); give one name per label value, "
                        "value 0 first")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"--classes {uri}: {repeated} named more than once; each label value needs its own name")
    return names


def value_table(num_classes: int, ignore_index: int) -> np.ndarray:
    """Label value -> train id (int64 [V]): v < K is class v, ``ignore_index`` is 255, the rest -1 (unknown)."""
    table = np.full(max(num_classes, ignore_index + 1), -1, dtype=np.int64)
    table[:num_classes] = np.arange(num_classes)
    table[ignore_index] = IGNORE
    return table


def convert_folder_item(item: dict, report: ConversionReport, *, images: str, masks: str,
                        table: np.ndarray, num_classes: int, ignore_index: int) -> dict | None:
    """One image + its label PNG -> a record row (``sem_seg`` and one segment per class present)."""
    loaded = read_image(images, item["image"], report)
    if loaded is None:
        return None
    data, height, width = loaded
    values = read_label(masks, item["label"], item["image"], (height, width), report)
    if values is None:
        return None
    what = f"label values that are neither a class (0..{num_classes - 1}) nor --ignore-index {ignore_index}"
    sem = lookup(values, table, what, item["label"], item["image"], report)
    segments = class_segments(sem, list(range(num_classes)))
    if not segments:
        report.keep("no_annotations", item["image"])
    return make_row(image_id=item["image_id"], file_name=item["image"], image_bytes=data, height=height,
                    width=width, segments=segments, sem_seg=sem)


def folder_items(images: str, masks: str, classes: str, report: ConversionReport, *,
                 ignore_index: int = IGNORE) -> Work:
    """Pair the files of ``images`` and ``masks`` (module docstring) and read the class names from ``classes``.
    Unpaired files are counted in ``report`` and left out; items hold paths relative to the two folders."""
    images, masks = storage.absolute(images), storage.absolute(masks)
    if images.rstrip("/") == masks.rstrip("/"):
        raise DataError(f"--images and --masks are the same folder {images}; keep the label PNGs in a folder of "
                        "their own, mirroring the images' sub-folders")
    names = read_class_names(classes)
    if len(names) > IGNORE:
        raise DataError(f"--classes {classes}: {len(names)} classes; records hold label maps of 8 bits with 255 "
                        "as ignore, so at most 255 classes")
    if not 0 <= ignore_index <= 65535:
        raise DataError(f"--ignore-index {ignore_index}: a label PNG value is in 0..65535")
    if ignore_index < len(names):
        raise DataError(f"--ignore-index {ignore_index} is also the value of class {names[ignore_index]!r} "
                        f"(entry {ignore_index} of --classes {classes}); give the value that marks unlabelled "
                        "pixels (often 255, or 0 with the classes numbered from 1: then drop that first name "
                        "and remap, since class i must be value i)")
    image_files = [f for f in list_files(images) if posixpath.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    if not image_files:
        raise DataError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders")
    label_files = [f for f in list_files(masks) if posixpath.splitext(f)[1].lower() == ".png"]
    if not label_files:
        raise DataError(f"--masks {masks}: no .png label files in it or its sub-folders")
    by_stem: dict[str, list[str]] = defaultdict(list)
    for f in image_files:
        by_stem[posixpath.splitext(f)[0]].append(f)
    labels = {posixpath.splitext(f)[0]: f for f in label_files}
    for stem in sorted(set(labels) - set(by_stem)):
        report.skip("missing_image", storage.join(masks, labels[stem]),
                    f"no image {stem}.* ({'/'.join(IMAGE_SUFFIXES)}) under {images}")
    items = []
    for image_id, stem in enumerate(sorted(by_stem), start=1):
        files = by_stem[stem]
        if len(files) > 1:
            for f in files:
                report.skip("duplicate_image", f, f"{files} would share the label {stem}.png; keep one of them")
            continue
        if stem not in labels:
            report.skip("missing_label", files[0], f"{storage.join(masks, stem + '.png')} does not exist")
            continue
        items.append({"image_id": image_id, "image": files[0], "label": labels[stem]})
    classes_list = [{"id": i, "name": n, "isthing": False, "source_id": i} for i, n in enumerate(names)]
    convert = functools.partial(convert_folder_item, images=images, masks=masks,
                                table=value_table(len(names), ignore_index), num_classes=len(names),
                                ignore_index=ignore_index)
    return Work(items, classes_list, convert, key="image")
