"""The generated data's ceiling as a recommender, for the benchmarks (``text_ceiling.py``,
``fusion_sweep.py --oracle``): the generator's own probability of each item being a user's next
event (``recsys.data.synthetic.World.next_event_log_probs``), knowing the user's true topics,
facet and taste group, every item's popularity and its freshness at the target's time. Sorting
by that probability maximises the expected NDCG of a single held-out item, so no model of the job
can be expected to rank better."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.columns import Columns
from recsys.data import Dataset
from recsys.data.synthetic import BASE_TS, SPAN, ItemSampler, World, time_factor
from recsys.recommender import History, Recommender

USERS_PER_PASS = 256  # [users, items] float64 temporaries: ~40 MB each at 150,000 items


class GeneratorOracle(Recommender):
    """Scores a stage's users at the time of their target (the first one, where a user has several)."""

    name = "generator"

    def __init__(self, world: World, data: Dataset, targets: pl.DataFrame) -> None:
        self.world = world
        # The generated ids are "U<number>" and "I<number>"; dense indices follow their string order.
        self.user_number = np.array([int(u[1:]) for u in data.users.ids])
        self.item_number = np.array([int(i[1:]) for i in data.item_ids.ids])
        first = targets.group_by(Columns.UserIdx).agg(pl.col(Columns.Timestamp).min())
        self.when = np.zeros(data.n_users)
        self.when[first[Columns.UserIdx].to_numpy()] = (first[Columns.Timestamp].to_numpy() - BASE_TS) / SPAN

    def fit(self, history: History) -> GeneratorOracle:
        self.seen = [self.item_number[s] for s in history.sequences]
        return self

    def score_users(self, users: np.ndarray) -> np.ndarray:
        out = np.empty((len(users), len(self.item_number)), dtype=np.float32)
        for s in range(0, len(users), USERS_PER_PASS):
            block = users[s : s + USERS_PER_PASS]
            seen = [self.seen[u] for u in block]
            logp = self.world.next_event_log_probs(self.user_number[block], self.when[block], seen)
            out[s : s + len(block)] = np.maximum(logp[:, self.item_number], -1e30)  # dense item order
        return out


# The user's mix of main and second topic is drawn from U(0.75, 1): five equal bins, their midpoints.
MIX_GRID = np.array([0.775, 0.825, 0.875, 0.925, 0.975])


class PosteriorOracle(GeneratorOracle):
    """The generator's probabilities with the user's side inferred from the history: every item's
    topic, taste group, facet, popularity and release known exactly, as are the generator's
    parameters, but each user's topics, topic mix, taste group and facet are not. They are
    integrated over their posterior given the user's history events (uniform priors as drawn).
    This is what the history can tell about a user, so it bounds what a model that learns the
    item side perfectly could reach: tighter than ``GeneratorOracle``, which knows the user's
    hidden state.

    Approximations, both small: a history event's likelihood normalises each class's weight over
    its topic's items without removing the items the user had already, nor those released later;
    the predictive does remove them (as ``GeneratorOracle`` does) at the target's time."""

    name = "posterior"

    def __init__(
        self,
        world: World,
        data: Dataset,
        targets: pl.DataFrame,
        counted_popularity: bool = False,
        pmi: bool = False,
        clock: bool = True,
        groups: bool = True,
    ) -> None:
        """``counted_popularity``: each item's popularity estimated from its events in the history
        (``counted``), as a model must, instead of the generator's own. ``pmi``: the score less the
        item's log popularity, ``log p(item | user) - log p(item)`` up to a per-user constant: what
        a tower trained with ``text.module.popularity_debias=1`` learns, so its ceiling (ties inside
        a class, the same release and popularity-free weight, broken at random). ``clock=False``:
        the score less the item's freshness at the target's time (a model without a clock, as the
        text tower is; items not yet released stay out). ``groups=False``: the user's taste group
        unknown (integrated out), as for a model that cannot tell the items' groups apart, which
        the text does not show."""
        super().__init__(world, data, targets)
        self.counted_popularity, self.pmi, self.clock, self.groups = counted_popularity, pmi, clock, groups

    def fit(self, history: History) -> PosteriorOracle:
        super().fit(history)
        w = self.world
        self.item_pop = self.counted(history) if self.counted_popularity else w.item_pop
        self.jitter = np.random.default_rng(0).random(len(self.item_pop))  # pmi's ties, at random
        n_topics, n_groups = w.n_topics, w.n_groups
        # Events per user by item topic, taste group and facet: the posterior's sufficient statistics.
        counts = np.zeros((history.n_users, n_topics * n_groups * 3))
        users = np.repeat(np.arange(history.n_users), [len(s) for s in self.seen])
        items = np.concatenate(self.seen) if len(users) else np.zeros(0, dtype=np.int64)
        cls = (w.item_topic[items] * n_groups + w.item_group[items]) * 3 + w.item_facet[items]
        np.add.at(counts, (users, cls), 1.0)
        counts = counts.reshape(history.n_users, n_topics, n_groups, 3)
        by_topic = counts.sum(axis=(2, 3))
        # Taste group and facet: sum over events of log(class weight / its topic's mass for the class).
        g_eye, f_eye = np.eye(n_groups), np.eye(3)
        # mass[k, g, f]: the topic's total weight for a user of group g and facet f.
        pop_by = np.zeros((n_topics, n_groups, 3))
        np.add.at(pop_by, (w.item_topic, w.item_group, w.item_facet), self.item_pop)
        ga, fa = np.log(w.group_affinity), np.log(w.facet_affinity)
        aff = np.exp(ga * g_eye[:, None, :, None] + fa * f_eye[None, :, None, :])  # [g, f, grp, fac]
        mass = np.einsum("kab,gfab->kgf", pop_by, aff)
        ll = (
            ga * counts.sum(axis=(1, 3))[:, :, None]
            + fa * counts.sum(axis=(1, 2))[:, None, :]
            - np.einsum("uk,kgf->ugf", by_topic, np.log(mass))
        )
        self.post_gf = softmax(ll.reshape(len(ll), -1)).reshape(ll.shape)  # [user, g, f]
        if not self.groups:  # the facet's posterior, spread evenly over the groups
            self.post_gf = np.broadcast_to(self.post_gf.mean(axis=1, keepdims=True), ll.shape).copy()
        # Topics: main t1, second t2, mix m; an event's topic is noise / n_topics + (1 - noise) x
        # (m [k = t1] + (1 - m) [k = t2]).
        t_eye = np.eye(n_topics)
        p_topic = w.topic_noise / n_topics + (1 - w.topic_noise) * (
            MIX_GRID[None, None, :, None] * t_eye[:, None, None, :]
            + (1 - MIX_GRID)[None, None, :, None] * t_eye[None, :, None, :]
        )  # [t1, t2, m, k]
        p_topic = p_topic.reshape(-1, n_topics)
        post_t = softmax(by_topic @ np.log(p_topic).T)  # [user, t1 x t2 x m]
        self.topic_share = post_t @ p_topic  # [user, k]: the expected topic probabilities
        self.aff = aff.reshape(n_groups * 3, n_groups * 3)  # [(g, f), (grp, fac)]
        self.item_class = (w.item_topic * n_groups + w.item_group) * 3 + w.item_facet
        # [item, (topic, group, facet) class]: sums a block's item weights by class in one product.
        n_items = len(self.item_class)
        self.in_class = sp.csr_matrix(
            (np.ones(n_items), (np.arange(n_items), self.item_class)), shape=(n_items, n_topics * n_groups * 3)
        )
        return self

    def counted(self, history: History) -> np.ndarray:
        """Each item's popularity from its history events per unit of exposure (the share of the
        history's events that happened while it was listed, freshness included: an item listed
        last week had little chance to be picked yet), shrunk toward the mean rate by one event."""
        w = self.world
        counts = np.zeros(len(w.item_pop))
        counts[self.item_number] = history.item_counts
        t = np.sort((history.interactions[Columns.Timestamp].to_numpy() - BASE_TS) / SPAN)
        after = lambda x: 1.0 - np.searchsorted(t, x) / max(len(t), 1)  # noqa: E731
        late = w.release > 0
        exposure = np.ones(len(counts))
        # time_factor averaged over the history's events: FRESH_BOOST while fresh, then 1.
        r, fresh_for = w.release[late], ItemSampler.FRESH_FOR
        exposure[late] = ItemSampler.FRESH_BOOST * (after(r) - after(r + fresh_for)) + after(r + fresh_for)
        rate = counts.sum() / exposure.sum()  # events per unit of exposure, over all items
        return (counts + 1.0) / (exposure + 1.0 / rate)

    def score_users(self, users: np.ndarray) -> np.ndarray:
        w = self.world
        n_topics, n_classes = w.n_topics, w.n_groups * 3
        out = np.empty((len(users), len(self.item_number)), dtype=np.float32)
        for s in range(0, len(users), USERS_PER_PASS):
            block = users[s : s + USERS_PER_PASS]
            base = self.item_pop[None, :] * time_factor(w.release, self.when[block][:, None])
            for r, u in enumerate(block):
                base[r, self.seen[u]] = 0.0
            # Released, unseen weight per (topic, group, facet) class, then per topic for each
            # user class (g, f): mass[b, k, (g, f)].
            by_class = np.asarray(self.in_class.T @ base.T).T.reshape(len(block), n_topics, n_classes)
            mass = by_class @ self.aff.T
            post = self.post_gf[block].reshape(len(block), 1, n_classes)
            # coef[b, k, (grp, fac)] = sum over (g, f) of post x affinity / mass.
            coef = (post / np.maximum(mass, 1e-300)) @ self.aff
            coef *= self.topic_share[block][:, :, None]
            p = base * np.take_along_axis(coef.reshape(len(block), -1), self.item_class[None, :], axis=1)
            with np.errstate(divide="ignore"):
                logp = np.log(p)
            if self.pmi:
                logp = logp - np.log(self.item_pop)[None, :] + 1e-6 * self.jitter[None, :]
            if not self.clock:
                fresh = time_factor(w.release, self.when[block][:, None])
                logp = logp - np.log(np.where(fresh > 0, fresh, 1.0))
            out[s : s + len(block)] = np.maximum(logp[:, self.item_number], -1e30)  # dense item order
        return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of log-likelihoods."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
