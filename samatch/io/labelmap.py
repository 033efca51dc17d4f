"""Label maps: choose a segmentation task from a multi-class label file.

A label map sends stored label values to class indices; every value it does not name becomes 0
(background). Written as a preset name (``chaos-liver``) or as ``"SRC=DST[,SRC=DST...]"``, e.g.
``"1=1"`` (keep label 1 only) or ``"2=1,3=1"`` (merge labels 2 and 3 into class 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelMap:
    """``pairs``: ``(source value, class index)`` pairs; ``class_names``: one name per class."""

    pairs: tuple[tuple[int, int], ...]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        sources = [s for s, _ in self.pairs]
        if len(set(sources)) != len(sources):
            raise ValueError(f"label map names a source value twice: {sources}")
        for s, d in self.pairs:
            if not (0 <= s <= 255 and 0 <= d <= 255):
                raise ValueError(f"label map values must be in 0..255, got {s}={d}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"label map has {self.num_classes} classes but {len(self.class_names)} names")

    @property
    def num_classes(self) -> int:
        # Class 0 (background) always exists: unmapped values go there.
        return max([0] + [d for _, d in self.pairs]) + 1

    def apply(self, label: np.ndarray) -> np.ndarray:
        """``label``: uint8 array of stored values -> uint8 array of class indices, same shape."""
        lut = np.zeros(256, dtype=np.uint8)
        for s, d in self.pairs:
            lut[s] = d
        return lut[np.asarray(label, dtype=np.uint8)]

    def spec(self) -> str:
        """The ``"SRC=DST,..."`` form, e.g. for logs and split metadata."""
        return ",".join(f"{s}={d}" for s, d in self.pairs)


PRESETS: dict[str, LabelMap] = {
    # CHAOS MR T2-SPIR labels: 1 liver, 2 right kidney, 3 left kidney, 4 spleen.
    "chaos-liver": LabelMap(((1, 1),), ("background", "liver")),
    "chaos": LabelMap(
        ((1, 1), (2, 2), (3, 3), (4, 4)), ("background", "liver", "right kidney", "left kidney", "spleen")
    ),
}


def parse_label_map(spec: str | Mapping[int, int] | LabelMap | None) -> LabelMap | None:
    """A preset name, ``"SRC=DST,..."``, a ``{src: dst}`` dict, a LabelMap or None -> LabelMap or None.

    Classes of a parsed (non-preset) map are named ``background, class1, class2, ...``.
    Raises ValueError for a malformed spec.
    """
    if spec is None or isinstance(spec, LabelMap):
        return spec
    if isinstance(spec, Mapping):
        pairs = tuple((int(s), int(d)) for s, d in spec.items())
    else:
        text = spec.strip()
        if text in PRESETS:
            return PRESETS[text]
        pairs_list = []
        for item in text.split(","):
            src, sep, dst = item.partition("=")
            if not sep or not src.strip().isdigit() or not dst.strip().isdigit():
                raise ValueError(
                    f"bad label map {spec!r}: expected a preset ({', '.join(PRESETS)}) or 'SRC=DST[,SRC=DST]'"
                )
            pairs_list.append((int(src), int(dst)))
        pairs = tuple(pairs_list)
    n = max([0] + [d for _, d in pairs]) + 1
    return LabelMap(pairs, ("background",) + tuple(f"class{i}" for i in range(1, n)))
