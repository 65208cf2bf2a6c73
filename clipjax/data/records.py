"""Fast parsing of the serialized records our tfds builders write.

tfds stores each example as a `tf.train.Example` proto. Its generic numpy
decoder (`features.deserialize_example_np`) costs ~70 us per record in Python,
which would make a 256-example batch take ~20 ms. Reading only the fields the
pipeline needs straight from the proto costs ~10 us per record.

Only the feature kinds used by our builders are handled: scalar ints (stored as
int64_list) and byte strings (Text features and Tensor(encoding='bytes')).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import dtype_utils
from tensorflow_datasets.proto import tf_example_pb2

from clipjax.schema import ConfigError

_Example = tf_example_pb2.Example


def parse(
    raw_records: Sequence[bytes],
    int_fields: Iterable[str],
    bytes_fields: Iterable[str],
    float_vector_fields: Iterable[str] = (),
) -> dict[str, list]:
    """{field: list of values} for the requested fields of every record.

    Ints come back as Python ints, byte fields as `bytes`, float vectors (a box) as tuples of
    floats; a field missing from a record gives None (treated as a bad record by the caller).
    """
    int_fields, bytes_fields, float_vector_fields = (
        tuple(int_fields),
        tuple(bytes_fields),
        tuple(float_vector_fields),
    )
    out: dict[str, list] = {k: [] for k in int_fields + bytes_fields + float_vector_fields}
    for raw in raw_records:
        feature = _Example.FromString(raw).features.feature
        for k in int_fields:
            values = feature[k].int64_list.value if k in feature else ()
            out[k].append(values[0] if values else None)
        for k in bytes_fields:
            values = feature[k].bytes_list.value if k in feature else ()
            out[k].append(values[0] if values else None)
        for k in float_vector_fields:
            out[k].append(tuple(feature[k].float_list.value) if k in feature else None)
    return out


def ints(values: list, default: int = -1) -> np.ndarray:
    return np.array([default if v is None else v for v in values], dtype=np.int32)


def pair_record(
    image: bytes | None, caption: bytes | None, index: int, text_id: int = -1, label: int = -1
) -> bytes:
    """One image-caption record as the pipeline parses it (fields image, caption, text_id, index,
    label); a missing image or caption is left out, which the decoder counts as missing_image or
    bad_caption."""
    example = _Example()
    feature = example.features.feature
    if image is not None:
        feature["image"].bytes_list.value.append(image)
    if caption is not None:
        feature["caption"].bytes_list.value.append(caption)
    feature["text_id"].int64_list.value.append(text_id)
    feature["index"].int64_list.value.append(index)
    feature["label"].int64_list.value.append(label)  # -1: no concept labels, retrieval is strict
    return example.SerializeToString()


# ----------------------------------------------------------------------------
# Which proto keys of a prepared tfds dataset hold the image, the captions and the label
# (`data.name=tfds`, and the caption retrieval evaluator).


def _leaves(feature, path: str = "", depth: int = 0):
    """(flat key, leaf feature, Sequence nesting) of every leaf, keyed as tfds serializes them.

    tfds flattens nested features into proto keys joined by '/', and a Sequence of a feature is
    that feature's key holding a list. A top-level key may itself contain '/' ("image/id").
    """
    if isinstance(feature, tfds.features.FeaturesDict):
        for name, sub in feature.items():
            yield from _leaves(sub, f"{path}/{name}" if path else name, depth)
    elif isinstance(feature, tfds.features.Sequence):
        yield from _leaves(feature.feature, path, depth + 1)
    else:
        yield path, feature, depth


def _string_leaves(features) -> dict[str, tuple[object, int]]:
    """{key: (feature, values per record: 0 one, 1 a list)} of the features stored as bytes."""
    out = {}
    for key, feature, depth in _leaves(features):
        info = feature.get_serialized_info()
        if not isinstance(info, tfds.features.TensorInfo) or not dtype_utils.is_string(info.np_dtype):
            continue
        rank = depth + len(info.shape)
        if rank <= 1:  # deeper nesting is stored ragged (flat values + row lengths): not a caption list
            out[key] = (feature, rank)
    return out


def _is_encoded_image(feature) -> bool:
    if isinstance(feature, tfds.features.Image):
        return np.dtype(feature.np_dtype) == np.uint8  # float images are stored otherwise
    return isinstance(feature, tfds.features.Tensor) and not isinstance(feature, tfds.features.Text)


def feature_keys(builder, image_key: str, caption_key: str, label_key: str = "") -> tuple[str, str]:
    """Checks the two feature paths against the dataset's features; one line naming the choices.

    The caption key may be "" when there is a label key: captions are then the class names.
    """
    strings = _string_leaves(builder.info.features)
    images = [k for k, (f, rank) in strings.items() if rank == 0 and _is_encoded_image(f)]
    name = builder.info.full_name
    if image_key not in images:
        raise ConfigError(
            f"data.tfds_image_key: {image_key!r} is not an encoded image feature of {name}; "
            f"its image features: {images or 'none'}"
        )
    texts = [k for k in strings if k not in images]
    if caption_key not in texts and not (label_key and not caption_key):
        hint = "; empty: captions are the label's class names" if label_key else ""
        raise ConfigError(
            f"data.tfds_caption_key: {caption_key!r} is not a text feature of {name}; "
            f"its text features: {texts or 'none'} (a nested one as 'outer/inner', e.g. captions/text{hint})"
        )
    return image_key, caption_key


def _int_leaves(features) -> dict[str, object]:
    """{key: feature} of the features stored as one integer per record (ClassLabel, int scalars)."""
    out = {}
    for key, feature, depth in _leaves(features):
        info = feature.get_serialized_info()
        if (
            depth == 0
            and isinstance(info, tfds.features.TensorInfo)
            and not info.shape
            and dtype_utils.is_integer(info.np_dtype)
        ):
            out[key] = feature
    return out


def label_feature(builder, label_key: str) -> tuple[str, tuple[str, ...] | None]:
    """(label key, its class names, None for an int feature without them), checked against the
    dataset's features; one line naming its integer features when wrong."""
    ints = _int_leaves(builder.info.features)
    feature = ints.get(label_key)
    if feature is None:
        raise ConfigError(
            f"data.tfds_label_key: {label_key!r} is not an integer feature (a ClassLabel or int scalar) "
            f"of {builder.info.full_name}; its integer features: {sorted(ints) or 'none'}"
        )
    names = None
    # A ClassLabel of `num_classes` only names its classes by number itself; one of unknown size
    # cannot list them, and takes the numbers as for an int feature.
    if isinstance(feature, tfds.features.ClassLabel) and feature.num_classes is not None:
        names = tuple(feature.names)
    return label_key, names


def read_record(
    raw: bytes, image_key: str, caption_key: str, label_key: str = ""
) -> tuple[bytes | None, list[bytes], int]:
    """The image bytes (None when missing), the non-blank captions and the label (-1 when there
    is no label key or the record lacks it) of a serialized record."""
    feature = _Example.FromString(raw).features.feature
    image = feature[image_key].bytes_list.value if image_key in feature else ()
    texts = feature[caption_key].bytes_list.value if caption_key in feature else ()
    label = -1
    if label_key in feature:  # "" never is: no label key costs one dict probe
        values = feature[label_key].int64_list.value
        if len(values) == 1:
            label = values[0]
    return (image[0] if len(image) == 1 else None), [t for t in texts if t.strip()], label


def read_pairs(raw_records, image_key: str, caption_key: str) -> tuple[list, list[list[bytes]]]:
    """The image bytes (None when missing) and the non-blank captions of each serialized record."""
    pairs = [read_record(raw, image_key, caption_key) for raw in raw_records]
    return [image for image, _, _ in pairs], [texts for _, texts, _ in pairs]
