"""The generated default data set: a shop whose items have text and whose users click and buy.

It carries both kinds of signal so that a hybrid has something to prove:

* **text**: every item belongs to a topic, and its title/description are drawn from that topic's
  vocabulary; users prefer one or two topics. The text tells which users like an item.
* **collaborative**: every item also belongs to a hidden *taste group* that cuts across topics
  and never shows in the text; users strongly prefer items of their own group. Only
  co-occurrence (CF) can find it. Popularity is skewed (log-normal), also invisible in text.
* **time and cold start**: events are spread over time; a share of the catalogue is released
  late and is "hot" while new, so many last events (the test split) fall on items that have
  few or no training events — reachable only through their text.

Deterministic for a seed: the same arguments write byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from recsys.columns import Columns, Events
from recsys.data.dataset import Dataset
from recsys.data.files import FileDataSource

TOPICS: dict[str, list[str]] = {
    "astronomy": "telescope galaxy orbit comet nebula planet lunar eclipse star observatory meteor asteroid cosmic lens eyepiece".split(),
    "cooking": "skillet recipe oven knife spatula broth saucepan baking flour spice grill kitchen whisk simmer dough".split(),
    "gardening": "seeds soil compost shovel hose tomato fertilizer pruning shears planter mulch greenhouse tulip rake bulbs".split(),
    "fitness": "dumbbell yoga treadmill protein kettlebell stretching cardio muscle workout running sneaker barbell endurance squat mat".split(),
    "music": "guitar piano drum violin amplifier chord melody microphone headphones vinyl speaker tuner saxophone rhythm strings".split(),
    "photography": "camera tripod shutter aperture flash portrait zoom sensor lighting photo mirrorless focus exposure filter studio".split(),
    "woodworking": "chisel sawdust lumber plywood sander clamp router lathe varnish oak drill carpentry hinge workbench plane".split(),
    "travel": "luggage passport backpack suitcase itinerary hostel airline map compass tent hiking souvenir journey adapter pillow".split(),
    "chemistry": "beaker flask reagent pipette titration molecule acid catalyst burner solution compound lab centrifuge microscope ph".split(),
    "knitting": "yarn needles wool stitch crochet pattern scarf sweater skein cardigan mittens loom knit cotton cashmere".split(),
}
GENERIC = (
    "premium classic durable compact deluxe essential portable modern professional lightweight "
    "everyday sturdy reliable handy versatile original advanced simple improved elegant"
).split()
BRAND_SYLLABLES = "zor vex tal mir quo bel dra kin lum pax rio sen tov ulm yar".split()


def generate(
    n_users: int = 3000,
    n_items: int = 1500,
    n_groups: int = 4,
    mean_events: float = 14.0,
    late_item_share: float = 0.15,
    group_affinity: float = 8.0,
    topic_noise: float = 0.1,
    seed: int = 7,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return ``(interactions, items)`` frames in the schema of ``recsys.columns``."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    n_topics = len(topics)

    item_topic = rng.integers(0, n_topics, n_items)
    item_group = rng.integers(0, n_groups, n_items)
    item_pop = rng.lognormal(0.0, 1.0, n_items)
    # Late items are released over the last fifth of the time line.
    late = rng.random(n_items) < late_item_share
    release = np.where(late, rng.uniform(0.8, 1.0, n_items), 0.0)
    brands = ["".join(rng.choice(BRAND_SYLLABLES, 2)).capitalize() for _ in range(40)]

    titles, descriptions, categories = [], [], []
    for i in range(n_items):
        vocab = TOPICS[topics[item_topic[i]]]
        words = rng.choice(vocab, 2, replace=False)
        titles.append(f"{rng.choice(brands)} {rng.choice(GENERIC)} {words[0]} {words[1]}")
        body = list(rng.choice(vocab, 5, replace=True)) + list(rng.choice(GENERIC, 3))
        rng.shuffle(body)
        descriptions.append(" ".join(body))
        categories.append(topics[item_topic[i]])
    item_ids = [f"I{i:05d}" for i in range(n_items)]
    items = pl.DataFrame(
        {Columns.Item: item_ids, "title": titles, "description": descriptions, "category": categories}
    )

    # Users: one main topic, sometimes a second one; one hidden taste group.
    user_topics = np.stack([rng.integers(0, n_topics, n_users), rng.integers(0, n_topics, n_users)], 1)
    user_mix = rng.uniform(0.6, 1.0, n_users)
    user_group = rng.integers(0, n_groups, n_users)
    n_events = np.maximum(3, rng.geometric(1.0 / mean_events, n_users))

    base_ts = 1_700_000_000
    span = 180 * 24 * 3600
    by_topic = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    rows_u, rows_i, rows_t, rows_e = [], [], [], []
    for u in range(n_users):
        times = np.sort(rng.uniform(0.05, 1.0, n_events[u]))
        seen: set[int] = set()
        for t in times:
            r = rng.random()
            if r < topic_noise:
                topic = rng.integers(0, n_topics)
            else:
                topic = user_topics[u, 0] if rng.random() < user_mix[u] else user_topics[u, 1]
            cand = by_topic[topic]
            avail = release[cand] <= t
            # New items are hot for a while after release: that is what makes cold start matter.
            fresh = (release[cand] > 0) & (t - release[cand] < 0.08)
            w = item_pop[cand] * avail * np.where(item_group[cand] == user_group[u], group_affinity, 1.0)
            w = w * np.where(fresh, 6.0, 1.0)
            w[[k for k, i in enumerate(cand) if i in seen]] = 0.0
            if w.sum() <= 0:
                continue
            i = int(cand[rng.choice(len(cand), p=w / w.sum())])
            seen.add(i)
            match = item_group[i] == user_group[u]
            purchase = rng.random() < (0.35 if match else 0.1)
            rows_u.append(f"U{u:05d}")
            rows_i.append(item_ids[i])
            rows_t.append(base_ts + int(t * span))
            rows_e.append(Events.Purchase if purchase else Events.Click)
    interactions = pl.DataFrame(
        {Columns.User: rows_u, Columns.Item: rows_i, Columns.Timestamp: rows_t, Columns.Event: rows_e},
        schema={Columns.User: pl.String, Columns.Item: pl.String, Columns.Timestamp: pl.Int64, Columns.Event: pl.String},
    )
    return interactions, items


class GeneratedDataSource:
    """Generates the default data set on first use under ``directory``, then loads it like any files.

    The files are named by a hash of the generator arguments, so changing a size in config
    writes a new set instead of silently reusing a stale one.
    """

    def __init__(
        self,
        directory: str,
        n_users: int = 3000,
        n_items: int = 1500,
        n_groups: int = 4,
        mean_events: float = 14.0,
        late_item_share: float = 0.15,
        group_affinity: float = 8.0,
        seed: int = 7,
        text_fields: Sequence[str] = ("title", "category", "description"),
        event_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.spec = dict(
            n_users=n_users,
            n_items=n_items,
            n_groups=n_groups,
            mean_events=mean_events,
            late_item_share=late_item_share,
            group_affinity=group_affinity,
            seed=seed,
        )
        self.text_fields = list(text_fields)
        self.event_weights = event_weights

    def paths(self) -> tuple[Path, Path]:
        key = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode()).hexdigest()[:10]
        folder = self.directory / f"generated-{key}"
        return folder / "interactions.parquet", folder / "items.parquet"

    def ensure(self) -> tuple[Path, Path]:
        inter_path, items_path = self.paths()
        if not (inter_path.exists() and items_path.exists()):
            inter, items = generate(**self.spec)
            inter_path.parent.mkdir(parents=True, exist_ok=True)
            for frame, path in ((items, items_path), (inter, inter_path)):
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                frame.write_parquet(tmp)
                os.replace(tmp, path)  # atomic: a killed run never leaves a half file
            (inter_path.parent / "spec.json").write_text(json.dumps(self.spec, indent=2))
        return inter_path, items_path

    def load(self) -> Dataset:
        inter_path, items_path = self.ensure()
        return FileDataSource(
            interactions=str(inter_path),
            items=str(items_path),
            text_fields=self.text_fields,
            event_weights=self.event_weights,
            name="generated",
        ).load()
