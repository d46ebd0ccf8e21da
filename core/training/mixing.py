"""Training on damaged posts: a feature source that shows each post intact or under one of its damaged variants.

The paper trains clean and only tests damaged.  A product that will see damaged posts may also train on them: the
``product`` regime of the cross-validated evaluation draws, every time a post is put in a batch, whether it is intact (probability ``intact``) or which of its damaged variants it is (uniformly).  The
variants are feature tables of the *same* posts in the same order (cached features of the paper's C and D and of
the realistic damage kinds), so the mix costs no encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from core.data.damage import damaged_variants
from core.data.records import Sample
from core.model.drf_model import DRFModel, FeatureTable
from core.training.features import FeatureCache, encode_samples

#: The name of the undamaged variant in a mix.
INTACT = "clean"
#: The column of ``FeatureTable.intact`` a damaged variant's modality clears.
MODALITY_COLUMN = {"image": 0, "text": 1}
#: The product regime's default chance that a post is shown intact.
PRODUCT_INTACT = 0.5


class DamageMix:
    """A ``FeatureSource`` (core.training.loop) over aligned variants of the same posts.

    ``variants`` maps a condition name to a labelled table of the same posts; it must hold ``"clean"``.  Each call
    of ``features`` draws afresh (seeded), so every epoch sees other damage; ``fixed`` draws once, for dev.
    """

    def __init__(
        self, variants: Mapping[str, FeatureTable], intact: float = PRODUCT_INTACT, seed: int = 0
    ) -> None:
        if INTACT not in variants or len(variants) < 2:
            raise ValueError(f"a damage mix needs {INTACT!r} and at least one damaged variant")
        if not 0.0 <= intact <= 1.0:
            raise ValueError(f"intact must be a probability, got {intact}")
        sizes = {name: len(table) for name, table in variants.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"variants must hold the same posts, got sizes {sizes}")
        clean = variants[INTACT]
        if clean.labels is None:
            raise ValueError("training needs labelled tables")
        self.names = [INTACT, *(name for name in variants if name != INTACT)]
        self.tables = [variants[name] for name in self.names]
        self.labels: Tensor = clean.labels
        self.intact = intact
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def draw(self, count: int) -> Tensor:
        """Which variant each of ``count`` rows shows: 0 (intact) with probability ``intact``, else 1..V-1."""
        damaged = torch.rand(count, generator=self.generator) >= self.intact
        which = torch.randint(1, len(self.tables), (count,), generator=self.generator)
        return torch.where(damaged, which, torch.zeros_like(which))

    def features(self, index: Tensor) -> FeatureTable:
        return self._gather(index, self.draw(len(index)))

    def fixed(self) -> FeatureTable:
        """One draw of every post: a fixed damaged dev set for model selection."""
        return self._gather(torch.arange(len(self)), self.draw(len(self)))

    def _gather(self, index: Tensor, which: Tensor) -> FeatureTable:
        """The rows ``index``, each from the variant ``which`` names; ``intact`` marks the modalities left
        undamaged (a variant named ``image/...`` damages the image only), for the queues and the recovery."""
        out = self.tables[0].rows(index)
        out.intact = torch.ones(len(index), 2, dtype=torch.bool)
        for variant in range(1, len(self.tables)):
            rows = which == variant
            if bool(rows.any()):
                part = self.tables[variant].rows(index[rows])
                out.image[rows], out.text[rows] = part.image, part.text
                out.image_present[rows], out.text_present[rows] = part.image_present, part.text_present
                out.intact[rows, MODALITY_COLUMN[self.names[variant].partition("/")[0]]] = False
        return out


def damage_mix(
    model: DRFModel,
    samples: Sequence[Sample],
    clean: FeatureTable,
    cache: FeatureCache,
    intact: float = PRODUCT_INTACT,
    seed: int = 0,
    disruption_seed: int = 0,
    progress: bool = False,
) -> DamageMix:
    """The product regime's source for ``samples`` (whose clean features are ``clean``): every damaged variant of
    them (``core.data.damage.damaged_variants``) encoded through ``cache`` and mixed."""
    variants = {
        name: encode_samples(model, damaged, cache, progress=progress)
        for name, (damaged, _) in damaged_variants(samples, disruption_seed).items()
    }
    return DamageMix({INTACT: clean, **variants}, intact, seed)
