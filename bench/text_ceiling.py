"""How far can a text tower get on the generated data, and how far can any model get? The
zero-shot tower and ALS against scorers that know the generator's hidden variables.

    python bench/text_ceiling.py                      # the default job's data and split
    python bench/text_ceiling.py split=global_time    # any Hydra override of the job
    python bench/text_ceiling.py --scorers als,generator --base als data.n_users=30000 data.n_items=15000
    python bench/text_ceiling.py --scorers als,generator --base als data.n_users=300000 \
        data.n_items=150000 eval.max_users=20000   # 100x, 20,000 users a stage (~20 min, 13 GB)

The generator (``recsys.data.synthetic``) draws each event's topic from the user's topic mix and
then an item of that topic with weight ``popularity x group x facet x freshness``. Only the topic
and the facet show in an item's text (its category and its facet words); popularity, taste group
and freshness do not. A text model scored on its own (no popularity) can at best rank the items of
the user's likely (topic, facet) classes first, in no particular order inside a class. This script
decodes every item's topic and facet from its title and scores users by their history's shares
(the last ``text.max_history`` items, recency-weighted like the zero-shot tower), ties broken at
random:

* ``oracle: topic``: the topic share only;
* ``oracle: topic + facet``: the topic share times the user's facet share, the best any
  popularity-free text scorer can do here;
* ``oracle: topic + facet + popularity``: the same, ties broken by training popularity (what the
  text tower learns when it is trained without ``text.module.popularity_debias``);
* ``oracle: topic + facet x popularity`` (``oracle_facet_logpop``): the topic and facet shares
  times the item's popularity, ``log shares + log(1 + training events)``, across classes too, as
  a popularity-debiased tower's score plus the item's log popularity would rank (at 100x each
  class holds 5,000 items, so inside a class popularity decides);
* ``generator``: the generator's own probability of each item being the user's next event
  (``World.next_event_log_probs``: the user's true topics, facet and taste group, every item's
  popularity and freshness at the target's time). No model can be expected to rank better, so it
  is the ceiling for every model of the job, the fused ranker included.
* ``posterior``: the same probabilities with the user's hidden state (topics, mix, taste group,
  facet) integrated over its posterior given the user's history (``PosteriorOracle``): every item's
  hidden variables known, the user's inferred as well as the history allows. A model that learned
  the item side perfectly could reach it; what lies between it and ``generator`` no model can
  learn from the histories. ``posterior_counts``: the same with each item's popularity counted
  from its training events per unit of exposure, as a model must estimate it, and
  ``posterior_counts_static`` that without the items' freshness. ``posterior_pmi``:
  ``posterior`` less each item's log popularity, what a tower trained with
  ``text.module.popularity_debias=1`` learns (``log p(item | user) - log p(item)``): its ceiling.
  ``posterior_pmi_static``: the same without the items' freshness (the tower has no clock);
  ``posterior_pmi_text``: without freshness nor taste groups, what the text shows (topic, facet).

Beside them: the job's zero-shot text tower (``text_zeroshot``), ALS as the job configures it
(``cf.als``) and popularity. Each stage is scored as the job scores it: validation targets from
the training history, test targets from training + validation, full ranking, seen and
not-yet-listed items removed, on at most ``eval.max_users`` users a stage (the job's seeded
sample). Prints NDCG@10 and Recall@10 per scorer and stage, and the paired 95 % interval of each
scorer minus the base (``--base``, the zero-shot tower by default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from recsys.errors import run_script

ROOT = Path(__file__).resolve().parents[1]
K = 10
SCORERS = [
    "text_zeroshot", "als", "popularity", "oracle_topic", "oracle_facet", "oracle_facet_pop",
    "oracle_facet_logpop", "posterior", "posterior_counts",
    "posterior_counts_static", "posterior_pmi", "posterior_pmi_static", "posterior_pmi_text", "generator",
]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the default job")
    p.add_argument("--scorers", default=",".join(SCORERS), help=f"comma-separated subset of {','.join(SCORERS)}")
    p.add_argument("--base", default="text_zeroshot", help="the scorer the paired intervals subtract")
    a = p.parse_args()
    chosen = a.scorers.split(",")
    unknown = sorted(set(chosen + [a.base]) - set(SCORERS))
    if unknown or a.base not in chosen:
        p.error(f"unknown scorer(s) {unknown} (choose from {', '.join(SCORERS)}); --base must be among --scorers")
    torch.set_num_threads(1)
    from generator_oracle import GeneratorOracle, PosteriorOracle

    import recsys.config  # noqa: F401  (registers the config resolvers)
    from recsys.cf.models import Popularity
    from recsys.columns import Columns
    from recsys.data.synthetic import TOPICS
    from recsys.evaluation.bootstrap import PairedBootstrap
    from recsys.evaluation.metrics import ranking_metrics, relevance_matrix
    from recsys.evaluation.sampling import sample_test_users, sample_users
    from recsys.pipeline import stage_exclusion, stage_history
    from recsys.recommender import History, Recommender
    from recsys.text.recommender import TextRecommender

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=bert_ranker", f"paths.root_dir={ROOT}", *a.overrides])
    if cfg.data.get("_target_", "").rsplit(".", 1)[-1] != "GeneratedDataSource":
        sys.exit("text_ceiling.py decodes the generated data's topics and facets: use the generated data")
    source = instantiate(cfg.data)
    data = source.load()
    split = instantiate(cfg.split).split(data.interactions)

    # Each topic's 15 words are its 3 facets of 5; a title ends with two words of the item's facet.
    word = {w: (t, j // 5) for t, name in enumerate(TOPICS) for j, w in enumerate(TOPICS[name])}
    last = [word[title.split()[-1]] for title in data.items["title"].to_list()]
    topic, facet = (np.array(x) for x in zip(*last, strict=True))
    n_topics = len(TOPICS)

    class Oracle(Recommender):
        name = "oracle"

        def __init__(self, use_facet: bool, popularity: str | None, decay: float, max_history: int) -> None:
            # popularity: None (random ties), "tie" (breaks ties inside a class), "prior" (log
            # popularity added to the class shares, so it ranks across classes too).
            self.use_facet, self.popularity = use_facet, popularity
            self.decay, self.max_history = decay, max_history

        def fit(self, history: History) -> Oracle:
            # Per user, the log shares of the topics and facets (users x items is 360 GB at 100x).
            t_log, f_log = [], []
            for seq in history.sequences:
                h = seq[-self.max_history :]
                w = np.exp(-self.decay * np.arange(len(h))[::-1]) if len(h) else np.ones(0)
                total = max(w.sum(), 1e-12)
                t_log.append(np.log(np.bincount(topic[h], weights=w, minlength=n_topics) / total + 1e-3))
                f_log.append(np.log(np.bincount(facet[h], weights=w, minlength=3) / total + 1e-3))
            self.topic_log, self.facet_log = np.array(t_log), np.array(f_log)
            # Popularity as the job's popularity model counts it (up to each user's cut); ties
            # without it at random (a seeded jitter), far below a class's gap.
            self.counts = Popularity().fit(history) if self.popularity else None
            self.jitter = np.random.default_rng(0).random(history.n_items)
            return self

        def score_users(self, users: np.ndarray) -> np.ndarray:
            if self.counts is None:
                tie = np.broadcast_to(self.jitter, (len(users), len(self.jitter)))
            else:
                tie = np.log1p(self.counts.score_users(users).astype(np.float64))
            if self.popularity != "prior":
                tie = 1e-4 * tie / np.maximum(tie.max(axis=1, keepdims=True), 1e-12)
            prefs = self.topic_log[users][:, topic]
            if self.use_facet:
                prefs = prefs + self.facet_log[users][:, facet]
            return (prefs + tie).astype(np.float32)

    world = source.world() if any(n.startswith(("generator", "posterior")) for n in chosen) else None

    def scorers_for(targets) -> dict[str, Recommender]:
        make = {
            "text_zeroshot": lambda: zero,
            "als": lambda: instantiate(cfg.cf.als),
            "popularity": Popularity,
            "oracle_topic": lambda: Oracle(False, None, decay, max_history),
            "oracle_facet": lambda: Oracle(True, None, decay, max_history),
            "oracle_facet_pop": lambda: Oracle(True, "tie", decay, max_history),
            "oracle_facet_logpop": lambda: Oracle(True, "prior", decay, max_history),
            "posterior": lambda: PosteriorOracle(world, data, targets),
            "posterior_counts": lambda: PosteriorOracle(world, data, targets, counted_popularity=True),
            "posterior_counts_static": lambda: PosteriorOracle(world, data, targets, True, clock=False),
            "posterior_pmi": lambda: PosteriorOracle(world, data, targets, pmi=True),
            "posterior_pmi_static": lambda: PosteriorOracle(world, data, targets, pmi=True, clock=False),
            "posterior_pmi_text": lambda: PosteriorOracle(world, data, targets, pmi=True, clock=False, groups=False),
            "generator": lambda: GeneratorOracle(world, data, targets),
        }
        return {name: make[name]() for name in chosen}

    decay, max_history = float(cfg.text.recency_decay), int(cfg.text.max_history)
    if "text_zeroshot" in chosen:
        enc = instantiate(cfg.encoder)
        ids, lens = enc.tokenize(data.texts)
        net = instantiate(cfg.text.net)(enc)  # untrained: the job's zero-shot tower
        zero = TextRecommender.from_tokens(net, ids, lens)
    as_of = bool(cfg.eval.get("as_of_cut", True))
    train = History(split.train, data.n_users, data.n_items)
    # As the job evaluates: past eval.max_users users, a stage is scored on a seeded sample of them
    # (the job's own test sample), since full ranking costs users x items.
    max_users, seed = cfg.eval.get("max_users"), int(cfg.seed)
    test = sample_test_users(split, max_users, seed)[0].test  # checks eval.max_users
    val = sample_users(split.val, max_users, seed)[0]
    stages = {"validation": (train, val), "test": (train.extend(split.val), test)}
    print(f"generated data, split={cfg.split._target_.rsplit('.', 1)[-1]}, NDCG@{K} / Recall@{K}, full ranking")
    for stage, (history, targets) in stages.items():
        history = stage_history(history, targets) if as_of else history
        users = np.unique(targets[Columns.UserIdx].to_numpy())
        exclude = stage_exclusion(history, data.items, targets)
        relevant = relevance_matrix(targets, users, data.n_items)
        per_user = {}
        for name, model in scorers_for(targets).items():
            recs, _ = model.fit(history).recommend(users, K, exclude=exclude)
            per_user[name] = ranking_metrics(recs, relevant, ks=(K,))
        boot = PairedBootstrap(len(users), seed=0)
        base = per_user[a.base][f"ndcg_at_{K}"]
        print(f"\n{stage}: {len(users)} users")
        print(f"| scorer | NDCG@{K} | Recall@{K} | x {a.base} | minus {a.base} (paired 95 % CI) |")
        print("|---|---|---|---|---|")
        for name, m in per_user.items():
            ndcg, recall = m[f"ndcg_at_{K}"], m[f"recall_at_{K}"]
            ci = boot.interval(ndcg, base)
            print(
                f"| {name} | {ndcg.mean():.4f} | {recall.mean():.4f} | {ndcg.mean() / max(base.mean(), 1e-12):.2f} "
                f"| {ci.mean:+.4f} ({ci.low:+.4f}..{ci.high:+.4f}) |"
            )


if __name__ == "__main__":
    run_script(main)
