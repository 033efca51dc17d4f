"""Synthetic phantoms: the embedded default and the fast tests' data, deterministic by seed.

``cardiac``: 4 classes shaped like a short-axis cardiac MRI slice: an inner disk (class 3, "LV"),
a ring around it (class 2, "myocardium") and an outer crescent beside the ring (class 1, "RV").
``lesion``: 2 classes, a dark elliptical lesion (class 1) in speckled tissue, like breast ultrasound.

Each *site* gets its own acquisition: gamma, contrast, noise level and structure size differ, so
that virtual hospitals see a domain shift. The phantom reader fulfils the reader contract of
:mod:`samatch.io.base`: split ``train`` is 2D slices (Z=1), split ``val`` is volumes (Z slices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samatch.io.base import Case, CaseMeta, CaseRef

KINDS = {"cardiac": ("background", "RV", "myocardium", "LV"), "lesion": ("background", "lesion")}


@dataclass(frozen=True)
class SiteStyle:
    """How one virtual hospital's scanner renders anatomy."""

    gamma: float = 1.0
    contrast: float = 1.0
    noise: float = 0.05
    scale: float = 1.0

    @classmethod
    def for_site(cls, site: int) -> SiteStyle:
        # Site 0 is the reference; others drift in a fixed, reproducible direction.
        table = [(1.0, 1.0, 0.04, 1.0), (1.6, 0.75, 0.08, 0.85), (0.7, 1.2, 0.12, 1.15)]
        g, c, n, s = table[site % len(table)]
        return cls(g, c, n, s)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy / size, xx / size


def cardiac_slice(rng: np.random.Generator, size: int, style: SiteStyle, phase: float):
    """One (size, size) image in [0, 1] and its label. ``phase`` in [0, 1] shrinks the heart (systole)."""
    yy, xx = _grid(size)
    cy, cx = 0.5 + rng.uniform(-0.08, 0.08, 2)
    r_lv = style.scale * (0.11 - 0.03 * phase) * rng.uniform(0.85, 1.15)
    r_myo = r_lv + style.scale * rng.uniform(0.04, 0.06)
    d = np.hypot(yy - cy, xx - cx)
    angle = rng.uniform(-0.6, 0.6) + np.pi  # RV sits to the (image) left of the LV
    ry, rx = cy + 1.25 * r_myo * np.sin(angle), cx + 1.25 * r_myo * np.cos(angle)
    d_rv = np.hypot((yy - ry) / 0.8, xx - rx)
    label = np.zeros((size, size), np.uint8)
    label[(d_rv < 1.1 * r_myo) & (d >= r_myo + 0.01)] = 1
    label[(d >= r_lv) & (d < r_myo)] = 2
    label[d < r_lv] = 3
    base = np.array([0.15, 0.75, 0.35, 0.85], np.float32)[label]
    body = np.hypot(yy - 0.5, (xx - 0.5) * 0.8) < 0.42  # a torso-like bright-ish region
    base = np.where((label == 0) & body, 0.25, base)
    return _render(rng, base, style), label


def lesion_slice(rng: np.random.Generator, size: int, style: SiteStyle, phase: float):
    """A speckled tissue image with one dark ellipse (class 1); phase varies the lesion size."""
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.35, 0.65, 2)
    a = style.scale * (0.08 + 0.06 * phase) * rng.uniform(0.8, 1.2)
    b = a * rng.uniform(0.6, 1.0)
    t = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
    label = (u**2 + v**2 < 1).astype(np.uint8)
    layers = 0.45 + 0.15 * np.sin(12 * yy + rng.uniform(0, 6))  # tissue layers
    base = np.where(label == 1, 0.1, layers).astype(np.float32)
    speckle = rng.gamma(4.0, 0.25, size=base.shape).astype(np.float32)
    return _render(rng, base * speckle, style), label


def _render(rng: np.random.Generator, base: np.ndarray, style: SiteStyle) -> np.ndarray:
    img = np.clip(base, 0, None) ** style.gamma
    img = 0.5 + style.contrast * (img - 0.5) + rng.normal(0, style.noise, base.shape)
    return np.clip(img, 0, 1).astype(np.float32)


_MAKERS = {"cardiac": cardiac_slice, "lesion": lesion_slice}


class PhantomReader:
    """Reader-contract view of phantom sites: per site ``num_patients`` train + ``num_val`` val patients.

    Train patients appear slice by slice (split ``train``, 2D cases); val patients as volumes of
    ``slices`` slices (split ``val``). Everything is regenerated from (kind, site, seed, patient).
    ``site`` is one site index or a tuple of them (a pooled, centralized view of several sites).
    """

    def __init__(
        self,
        kind: str = "cardiac",
        site: int | tuple[int, ...] = 0,
        seed: int = 0,
        size: int = 64,
        num_patients: int = 8,
        num_val: int = 2,
        slices: int = 6,
    ):
        if kind not in _MAKERS:
            raise ValueError(f"unknown phantom kind {kind!r}; choose from {sorted(_MAKERS)}")
        self.sites = (site,) if isinstance(site, int) else tuple(site)
        self.kind, self.seed, self.size = kind, seed, size
        self.num_patients, self.num_val, self.slices = num_patients, num_val, slices
        self.name = f"phantom-{kind}"
        self.root = f"phantom:{kind}:sites{','.join(map(str, self.sites))}"
        self.class_names = KINDS[kind]
        self.num_classes = len(self.class_names)

    def available_splits(self) -> list[str]:
        return ["train", "val"]

    def _volume(self, site: int, patient: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, site, patient])
        style = SiteStyle.for_site(site)
        pairs = [
            _MAKERS[self.kind](rng, self.size, style, z / max(self.slices - 1, 1)) for z in range(self.slices)
        ]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _load(self, ref: CaseRef) -> Case:
        site, patient, z = (int(v) for v in ref.paths)
        image, label = self._volume(site, patient)
        if z >= 0:
            image, label = image[z : z + 1], label[z : z + 1]
        meta = CaseMeta(ref.case_id, ref.patient_id, source=f"phantom:{self.kind}:site{site}")
        return Case(image, label, meta)

    def cases(self, split: str | None = None) -> list[CaseRef]:
        refs = []
        if split in (None, "train"):
            # Interleave sites patient by patient, so a labeled budget of N patients spreads over sites.
            for p in range(self.num_patients):
                for site in self.sites:
                    pid = f"site{site}_p{p:03d}"
                    for z in range(self.slices):
                        paths = (str(site), str(p), str(z))
                        refs.append(
                            CaseRef(f"{pid}_slice_{z}", pid, "train", paths, self._load, num_slices=1)
                        )
        if split in (None, "val"):
            for site in self.sites:
                for p in range(self.num_patients, self.num_patients + self.num_val):
                    pid = f"site{site}_p{p:03d}"
                    paths = (str(site), str(p), "-1")
                    refs.append(CaseRef(pid, pid, "val", paths, self._load, num_slices=self.slices))
        return refs
