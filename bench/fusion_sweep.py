"""Fusion variants (ranker settings, candidate sources, text features) on the validation stage only.

    python bench/fusion_sweep.py --run outputs/<date>/  --experiment scientific

Reuses a finished run's text towers (its saved ``pipeline/``: fine-tuned item vectors, the zero-shot
tower when the run had ``rank.text_zeroshot_feature``) so that a variant costs a ranker fit, not a
fine-tuning. The CF models are refitted on the training split, exactly as the job's validation
stage does. The test split is never read: the validation users are cut in two seeded halves, the
ranker is fitted on one and scored (full-ranking NDCG@10 / Recall@10 over the catalogue, seen items
removed, candidate recall included) on the other, then the other way round, and the table reports
the mean over all validation users. Every variant is scored on the same users and the same folds.
A variant's ranker settings override the experiment's ``ranker`` config (``bags: 5`` by default).

``--label-stages N`` adds the job's earlier labelled stages (``rank.label_stages``) to every
ranker's training but the ``*_one_stage`` variants' (the validation stage alone, so that one run
compares the two on the same users; ``both_two_stages`` learns from the first earlier stage
only): each user's last N - 1 training events, CF refitted on the events before them. The run's
towers read those histories; with ``rank.earlier_towers`` (the
Scientific preset) each earlier stage's fine-tuned tower is its own instead, fine-tuned here from
the zero-shot start on the stage's history and chosen on its targets, as the job does
(``recsys.stages.StageTower``: one more fine-tuning, within ``text.budget_minutes``, per stage).

``--oracle`` (generated data only) adds the ceiling: the generator's own next-event probabilities
(``bench/generator_oracle.py``) ranking the whole catalogue, and ranking each variant's candidates
(what a perfect ranker would make of them); and the same with the user's hidden state inferred
from the history (``posterior``: what a ranker that knew every item perfectly could reach), and
with each item's popularity counted from its training events too (``posterior_counts``).

``--fold-seed A B C`` repeats every comparison on other halves, the stages and frames built once.

``--max-users N`` scores a seeded sample of N validation users (the job's sampling of test users):
at 100x the generated data has 300,000.

Both halves' targets fall in the same period, so a feature that tells items apart where their
history does not (an item's listing time counted to one date for everybody, say) lets the ranker
learn that period's hits from one half and find them in the other: the sweep rates it far above
what the job gets, whose ranker learns on the validation period and ranks the test period's items.
Check such a feature on the job's test stage, or make it depend on the user as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import recsys.config  # noqa: F401  (resolvers)
from recsys.columns import Columns
from recsys.data import listing_times
from recsys.errors import run_script
from recsys.evaluation.bootstrap import PairedBootstrap
from recsys.evaluation.metrics import ranking_metrics
from recsys.evaluation.sampling import sample_users
from recsys.pipeline import (
    FusionStage,
    HybridPipeline,
    LabelledStage,
    candidate_recall,
    earlier_labelled_stages,
    relevance_matrix,
    stage_exclusion,
    stage_history,
)
from recsys.pipeline_model import PipelineHistories, TrainedPipeline
from recsys.rank.features import GAP as GAP_SUFFIX
from recsys.rank.features import feature_columns
from recsys.rank.fused import ranked_arrays, ranked_candidates
from recsys.recommender import DERIVED_SOURCES, History, Recommender, nearest_name
from recsys.stages import StageTower, earlier_towers, text_features
from recsys.text.history_tower import HistoryTower
from recsys.text.recommender import TextRecommender

CONF = Path(__file__).resolve().parents[1] / "conf"

LR02 = {"learning_rate": 0.02, "n_estimators": 1000, "early_stopping_rounds": 80}
LR03 = {"learning_rate": 0.03, "n_estimators": 800, "early_stopping_rounds": 60}
# name -> (ranker overrides, candidate sources (added, or their counts changed), feature-name prefixes
# left out of the ranker's features)
ZS = ("score_text_zeroshot",)  # the zero-shot tower's features: the *finetuned* variants go without
# A model added to ``cf`` by ``--overrides`` (EASE below) is a feature of every variant but these.
NO_EASE = ("score_ease", "rank_ease")
NO_NEAREST = ("score_text_nearest", "score_text_zeroshot_nearest")  # rank.text_nearest_feature
VARIANTS: dict[str, tuple[dict, dict, tuple[str, ...]]] = {
    "finetuned_only": ({}, {}, ZS),
    "both_towers": ({}, {}, ()),
    "both_leaves7": ({"num_leaves": 7}, {}, ()),
    "both_leaves31": ({"num_leaves": 31, "min_child_samples": 100}, {}, ()),
    "both_lr02": (LR02, {}, ()),
    "both_zs_source30": ({}, {"text_zeroshot": 30}, ()),
    "both_zs_source50": ({}, {"text_zeroshot": 50}, ()),
    "both_zs30_lr02": (LR02, {"text_zeroshot": 30}, ()),
    "both_zs50_lr02": (LR02, {"text_zeroshot": 50}, ()),
    "both_zs30_lr02_leaves7": ({**LR02, "num_leaves": 7}, {"text_zeroshot": 30}, ()),
    "finetuned_only_lr02": (LR02, {}, ZS),
    "both_als100": ({}, {"als": 100}, ()),
    "both_knn60": ({}, {"itemknn": 60}, ()),
    "both_cand_x2": ({}, {"als": 100, "text": 100, "itemknn": 60}, ()),
    "both_cand_x2_lr02": (LR02, {"als": 100, "text": 100, "itemknn": 60}, ()),
    "both_cand_small": ({}, {"als": 30, "text": 30, "itemknn": 20}, ()),
    "both_bags5": ({"bags": 5}, {}, ()),
    "both_bags10": ({"bags": 10}, {}, ()),
    "both_bags5_lr02": ({**LR02, "bags": 5}, {}, ()),
    "finetuned_leaves15": ({"num_leaves": 15, "min_child_samples": 50}, {}, ZS),
    "finetuned_leaves7": ({"num_leaves": 7}, {}, ZS),
    "finetuned_bags5": ({"bags": 5}, {}, ZS),
    "finetuned_lr02": (LR02, {}, ZS),
    "finetuned_lambdarank": ({"objective": "lambdarank"}, {}, ZS),
    "finetuned_xendcg": ({"objective": "rank_xendcg"}, {}, ZS),
    "finetuned_binary": ({"objective": "binary"}, {}, ZS),
    "finetuned_textpop30": ({}, {"text_popular": 30}, ZS),
    "finetuned_textpop50": ({}, {"text_popular": 50}, ZS),
    "finetuned_textpop100": ({}, {"text_popular": 100}, ZS),
    "finetuned_textpop50_text20": ({}, {"text_popular": 50, "text": 20}, ZS),
    "finetuned_item_rate": ({}, {}, ZS),
    "both_one_stage": ({}, {}, ()),
    "both_two_stages": ({}, {}, ()),
    "both_textpop30": ({}, {"text_popular": 30}, ()),
    "both_textpop50": ({}, {"text_popular": 50}, ()),
    "finetuned_one_stage": ({}, {}, ZS),
    "both_binary": ({"objective": "binary"}, {}, ()),
    "both_next30": ({}, {"itemknn_next": 30}, ()),
    "both_next60": ({}, {"itemknn_next": 60}, ()),
    "both_binary_leaves31": ({"objective": "binary", "num_leaves": 31, "min_child_samples": 100}, {}, ()),
    "both_no_ease": ({}, {}, NO_EASE),
    "both_no_nearest": ({}, {}, NO_NEAREST),
    "finetuned_no_nearest": ({}, {}, ZS + NO_NEAREST),
    "finetuned_no_ease": ({}, {}, ZS + NO_EASE),
    "both_ease_source30": ({}, {"ease": 30}, ()),
    "both_ease_source50": ({}, {"ease": 50}, ()),
    # A second SASRec added by --overrides as ``textsasrec`` (its own settings, text_init_std say)
    # against the config's ``sasrec``: each variant the one model's feature and 30-item source.
    "sasrec_config": ({}, {}, ("score_textsasrec", "rank_textsasrec")),
    "sasrec_override": ({}, {"sasrec": 0, "textsasrec": 30}, ("score_sasrec", "rank_sasrec")),
    "both_ff05": ({"feature_fraction": 0.5}, {}, ()),
    "both_ff07": ({"feature_fraction": 0.7}, {}, ()),
    "finetuned_ff07": ({"feature_fraction": 0.7}, {}, ZS),
    "both_ff06": ({"feature_fraction": 0.6}, {}, ()),
    "both_ff08": ({"feature_fraction": 0.8}, {}, ()),
    "both_ff07_lr03": ({"feature_fraction": 0.7, **LR03}, {}, ()),
    "both_mcs20": ({"min_child_samples": 20}, {}, ()),
    "both_mcs100": ({"min_child_samples": 100}, {}, ()),
    "both_lr03": (LR03, {}, ()),
    "both_mix_binary": ({}, {}, ()),
    "both_gap": ({}, {}, ()),
    "both_rrf": ({}, {}, ()),
    "both_gap_rrf": ({}, {}, ()),
    "both_gap_all": ({}, {}, ()),
    "finetuned_gap_all": ({}, {}, ZS),
    "both_crank": ({}, {}, ()),
    "both_crank_share": ({}, {}, ()),
    "both_umax": ({}, {}, ()),
    "both_margin": ({}, {}, ()),
    # The preset's ranker with another seed (its bags' folds and trees): the spread the ranker's
    # own randomness leaves on one fold split.
    **{f"both_seed{i}": ({"seed": i}, {}, ()) for i in range(1, 6)},
}
# Variants whose rankers learn from the validation stage alone, beside others that also learn from
# the earlier stages of ``--label-stages N``: one run compares the two on the same users.
VALIDATION_STAGE_ONLY = {"both_one_stage", "finetuned_one_stage"}
# Variants that learn from fewer of the earlier stages than ``--label-stages N`` builds: beside the
# others, one run compares two stages with three.
EARLIER_STAGES_USED = {"both_two_stages": 1}
# Variants whose score is the mean of several rankers' (each with these overrides of the variant's
# own), each standardised over the users it ranks: rankers of other losses err apart.
ENSEMBLES: dict[str, list[dict]] = {"both_mix_binary": [{}, {"objective": "binary"}]}
# Each strong model's score minus the best of the user's candidates: how far a candidate lies behind
# the user's top pick, which per-user z-scores do not say for a peaked score list.
GAP = {
    f"gap_{m}": pl.col(f"score_{m}") - pl.col(f"score_{m}").max().over(Columns.UserIdx)
    for m in ("sasrec", "text", "text_zeroshot", "als", "itemknn", "itemknn_recent", "itemknn_next")
}


def model_scores(columns: list[str]) -> list[str]:
    """The frame's raw model-score columns (``score_<model>``), not those derived from them
    (per-user z-scores, and the gaps of ``rank.score_gap_feature``)."""
    return [c for c in columns if c.startswith("score_") and not c.endswith(("_z", GAP_SUFFIX))]


def gap_all(columns: list[str]) -> dict[str, pl.Expr]:
    """Every model's score gap to the user's best candidate (what ``rank.score_gap_feature`` adds)."""
    return {f"gap_{c[6:]}": pl.col(c) - pl.col(c).max().over(Columns.UserIdx) for c in model_scores(columns)}


def candidate_ranks(columns: list[str], share: bool) -> dict[str, pl.Expr]:
    """Every model's rank of the candidate among the user's candidates (1 = its best), or that rank
    over the user's number of candidates (``share``): the sources' own ranks cover the catalogue
    and only the sources."""
    out = {}
    for c in model_scores(columns):
        rank = pl.col(c).rank("min", descending=True).over(Columns.UserIdx).cast(pl.Float32)
        out[f"crank_{c[6:]}"] = rank / pl.len().over(Columns.UserIdx) if share else rank
    return out


def user_shape(columns: list[str], margin: bool) -> dict[str, pl.Expr]:
    """Per user, each model's best candidate score (how sure the model is of this user), or the
    margin between its best and second-best candidates (``margin``)."""
    out = {}
    for c in model_scores(columns):
        best = pl.col(c).max().over(Columns.UserIdx)
        second = pl.col(c).top_k(2).min().over(Columns.UserIdx)
        out[f"{'margin' if margin else 'umax'}_{c[6:]}"] = best - second if margin else best
    return out


# Reciprocal-rank fusion over the candidate sources (60 as in Cormack et al.): agreement between
# sources, which a tree reads only through many splits.
RRF = {
    "rrf": pl.sum_horizontal(
        [1.0 / (60.0 + pl.col(f"rank_{s}").cast(pl.Float64)) for s in ("als", "text", "itemknn", "sasrec", "text_new")]
    ).fill_null(0.0)
}
# Features a variant adds to the frames (derived from their columns), by variant name.
# A callable builds them from the frame's columns.
EXTRA_FEATURES: dict[str, dict[str, pl.Expr] | Callable[[list[str]], dict[str, pl.Expr]]] = {
    "both_gap": GAP,
    "both_rrf": RRF,
    "both_gap_rrf": {**GAP, **RRF},
    "both_gap_all": gap_all,
    "finetuned_gap_all": gap_all,
    "both_crank": lambda columns: candidate_ranks(columns, share=False),
    "both_crank_share": lambda columns: candidate_ranks(columns, share=True),
    "both_umax": lambda columns: user_shape(columns, margin=False),
    "both_margin": lambda columns: user_shape(columns, margin=True),
    # Events per day since the item's first event: popularity per unit of exposure.
    "finetuned_item_rate": {"item_rate": pl.col("item_events") / (pl.col("item_age_days").fill_null(0.0) + 1.0)},
}


def text_models(pipeline: TrainedPipeline, history: History) -> dict[str, Recommender]:
    """The run's text towers (fine-tuned, and the further ones), scoring every user of ``history``."""
    n = history.n_users
    everyone = PipelineHistories([""] * n, np.full(n, -1), history)  # ids unused by text scorers
    towers = [n for n, m in pipeline.models.items() if isinstance(m, HistoryTower)]
    return pipeline.scorers(everyone, only=towers)


def stage_models(
    cfg, pipeline: TrainedPipeline, history: History, tuned: TextRecommender | None = None
) -> dict[str, Recommender]:
    """The models of a labelled stage, as the job has them (``recsys.stages.text_features``): CF
    fitted on ``history``, the run's text towers reading it; ``tuned`` (an earlier stage's own
    tower, ``rank.earlier_towers``) replaces the run's fine-tuned one. The towers' nearest-item
    cosines come from the towers, so a run trained without them is swept with them too."""
    texts = text_models(pipeline, history)
    if tuned is None:
        text, temperature = texts[pipeline.text_name], pipeline.models[pipeline.text_name].bert.temperature
    else:
        text, temperature = TextRecommender(tuned.net, tuned.item_embeddings).fit(history), tuned.net.temperature
    cf = HybridPipeline({n: instantiate(node) for n, node in cfg.cf.items()}, None).fit_cf(history, text.item_space())
    return {**cf, **text_features(cfg, history, text, temperature, texts.get("text_zeroshot"))}


def stage_tower(cfg, data, run: str) -> StageTower:
    """The earlier stages' own towers (``rank.earlier_towers``), from the zero-shot start of the
    config's encoder, as the job fine-tunes them; their checkpoints in a temporary folder of ``run``."""
    import lightning as L

    from recsys.text.fit import zero_shot_copy

    L.seed_everything(cfg.seed, verbose=False)
    # Lightning's folder: the job's is the Hydra run's output folder, which a composed config lacks.
    cfg = OmegaConf.merge(cfg, {"trainer": {"default_root_dir": str(run)}})
    encoder = instantiate(cfg.encoder)
    item_ids, item_lengths = encoder.tokenize(data.texts)
    start = zero_shot_copy(instantiate(cfg.text.net)(encoder))

    def log(metrics: dict[str, float]) -> None:
        shown = {k: round(v, 4) for k, v in metrics.items() if k.endswith(("finetuned", "zeroshot", "steps"))}
        print(f"earlier stage's own tower: {shown}", flush=True)

    return StageTower(cfg, start, item_ids, item_lengths, listing_times(data.items), Path(run), log)


def ensemble_predict(rankers: list, frame: pl.DataFrame) -> np.ndarray:
    """A variant's score: its one ranker's, or the mean of its members' scores, each standardised
    over the frame (``ENSEMBLES``)."""
    if len(rankers) == 1:
        return rankers[0].predict(frame)
    preds = [r.predict(frame) for r in rankers]
    return np.mean([(p - p.mean()) / max(float(p.std()), 1e-12) for p in preds], axis=0)


def paired(boot: PairedBootstrap, x: np.ndarray, reference: np.ndarray) -> str:
    ci = boot.interval(x, reference)
    return f"{ci.mean:+.4f} ({ci.low:+.4f}..{ci.high:+.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="output folder of a finished training run (has pipeline/)")
    ap.add_argument("--experiment", default="scientific")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument(
        "--fold-seed",
        type=int,
        nargs="+",
        default=None,
        help="seeds of the two validation halves (default: the config's); several: one table each, the "
        "stages and frames built once",
    )
    ap.add_argument(
        "--label-stages",
        type=int,
        default=None,
        help="labelled stages each ranker learns from (default: the config's rank.label_stages): the "
        "validation half, and each user's last N - 1 training events with CF refitted before them",
    )
    ap.add_argument(
        "--stage-cap",
        type=int,
        default=None,
        help="taught users per earlier stage (default: the config's rank.max_earlier_users, among at most "
        "rank.max_earlier_examined users; 0: all, among all)",
    )
    ap.add_argument(
        "--singles", default="als,itemknn", help="single models scored on the same validation users (comma-separated)"
    )
    ap.add_argument(
        "--blend",
        default="",
        help="also score each variant as ranker + w * s * score_<--blend-model> for these w (comma-separated; "
        "s: the ratio of their standard deviations on the ranker's training rows)",
    )
    ap.add_argument("--blend-model", default="als")
    ap.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="score a seeded sample of this many validation users (default: all; at 100x, 300k are too many)",
    )
    ap.add_argument(
        "--oracle",
        action="store_true",
        help="generated data only: also rank by the generator's own probabilities (bench/generator_oracle.py), "
        "over the whole catalogue and over each variant's candidates",
    )
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={args.experiment}", *args.overrides])
    t0 = time.perf_counter()
    source = instantiate(cfg.data)
    data = source.load()
    split = instantiate(cfg.split).split(data.interactions)
    if args.max_users is not None:  # the validation targets of a seeded sample of users, as the job samples test
        if args.max_users < 1:
            raise SystemExit(f"--max-users must be >= 1, got {args.max_users}")
        split = dataclasses.replace(split, val=sample_users(split.val, args.max_users, cfg.seed)[0])
    history = History(split.train, data.n_users, data.n_items)
    # As the job's validation stage: time-dependent statistics as of each user's cut.
    history = stage_history(history, split.val) if cfg.eval.as_of_cut else history
    pipeline = TrainedPipeline.load(Path(args.run) / "pipeline")
    n_stages = cfg.rank.label_stages if args.label_stages is None else args.label_stages
    if n_stages < 1:
        raise SystemExit(f"--label-stages must be >= 1, got {n_stages}")
    stage_cap = cfg.rank.max_earlier_users if args.stage_cap is None else args.stage_cap
    max_examined = None if args.stage_cap == 0 else cfg.rank.get("max_earlier_examined")
    names = args.variants.split(",")
    if unknown := sorted(set(names) - set(VARIANTS)):
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    # The models a validation stage has (stage_models): CF from the config, the run's text towers.
    known = {*cfg.cf, *pipeline.models, *DERIVED_SOURCES}
    if cfg.rank.get("text_nearest_feature", False):
        known |= {nearest_name(n) for n, m in pipeline.models.items() if isinstance(m, HistoryTower)}
    singles = args.singles.split(",") if args.singles else []
    if unknown := sorted(set(singles) - known):
        raise SystemExit(f"--singles: no model named {unknown}; known: {sorted(known)}")
    needs_zs = any(ZS[0] not in VARIANTS[n][2] for n in names)
    if needs_zs and sum(isinstance(m, HistoryTower) for m in pipeline.models.values()) < 2:
        raise SystemExit("the run has no zero-shot tower: train it with rank.text_zeroshot_feature=true")
    users = split.val[Columns.UserIdx].unique().sort().to_numpy()
    # The validation stage (CF on train, as the job's), then the job's earlier stages.
    val_exclude = stage_exclusion(history, data.items, split.val)
    validation = LabelledStage(users, stage_models(cfg, pipeline, history), history, split.val, val_exclude)
    own = stage_tower(cfg, data, args.run) if n_stages > 1 and earlier_towers(cfg) else None
    earlier = list(
        earlier_labelled_stages(
            split.train,
            n_stages - 1,
            data,
            cfg.eval.as_of_cut,
            lambda h, t: stage_models(cfg, pipeline, h, None if own is None else own(h, t)),
        )
    )
    print(f"setup {time.perf_counter() - t0:.0f} s; {len(users)} validation users in two halves\n")
    # The single models on the same users (full ranking, the job's exclusions): what fused must beat.
    relevant = relevance_matrix(split.val, users, data.n_items)
    if singles or args.oracle:
        print("| single model | val NDCG@10 | val Recall@10 |\n|---|---|---|")
    for name in singles:
        m = ranking_metrics(validation.models[name].recommend(users, 10, exclude=val_exclude)[0], relevant, (10,))
        print(f"| {name} | {m['ndcg_at_10'].mean():.4f} | {m['recall_at_10'].mean():.4f} |", flush=True)
    oracles = {}
    if args.oracle:
        from generator_oracle import GeneratorOracle, PosteriorOracle

        world = source.world()
        oracles = {
            "generator": GeneratorOracle(world, data, split.val),
            "posterior": PosteriorOracle(world, data, split.val),
            "posterior_counts": PosteriorOracle(world, data, split.val, counted_popularity=True),
        }
        for o_name, oracle in oracles.items():
            m = ranking_metrics(oracle.fit(history).recommend(users, 10, exclude=val_exclude)[0], relevant, (10,))
            print(f"| {o_name} (every item) | {m['ndcg_at_10'].mean():.4f} | {m['recall_at_10'].mean():.4f} |")
    frames: dict[tuple, pl.DataFrame] = {}
    extra: dict[tuple, pl.DataFrame] = {}
    boot = PairedBootstrap(len(users), seed=0)

    def sweep_variant(name: str, reference: np.ndarray | None, halves: list[np.ndarray]) -> np.ndarray:
        """One variant's row (and its blends) on one fold split; returns the reference per-user NDCG@10."""
        ranker_over, extra_sources, dropped = VARIANTS[name]
        n_cand = {k: n for k, n in {**cfg.rank.n_candidates, **extra_sources}.items() if n}  # 0: not a source
        key = tuple(sorted(n_cand.items()))
        if key not in frames:
            fusion = FusionStage(n_cand, None, seed=cfg.seed, score_gaps=cfg.rank.get("score_gap_feature", False))
            v = validation
            frames[key] = fusion.labelled_frame(v.users, v.models, v.history, v.targets, v.exclude)
            # The earlier stages as the job builds them: the first taught users in a seeded order.
            earlier_frames = [
                fusion.taught_frame(
                    e.users, e.models, e.history, e.targets, e.exclude, stage_cap or None, max_examined
                ).with_columns(pl.lit(k, dtype=pl.Int8).alias(Columns.Stage))
                for k, e in enumerate(earlier, start=1)
            ]
            extra[key] = pl.concat(earlier_frames) if earlier_frames else None
            for o_name, oracle in oracles.items():  # the best any ranker could do with these candidates
                every = frames[key].sort(Columns.UserIdx, Columns.ItemIdx)
                score = oracle.score_pairs(every[Columns.UserIdx].to_numpy(), every[Columns.ItemIdx].to_numpy())
                top = ranked_candidates(every, score, users, 10)[0]
                m = ranking_metrics(ranked_arrays(top, users, 10)[0], relevant, (10,))
                ndcg_o, recall_o = m["ndcg_at_10"].mean(), m["recall_at_10"].mean()
                print(f"| {o_name} over {name}'s candidates | {ndcg_o:.4f} | {recall_o:.4f} | | | |", flush=True)
        df = frames[key]
        extra_cols = EXTRA_FEATURES.get(name, {})
        if callable(extra_cols):
            extra_cols = extra_cols(df.columns)
        if extra_cols:
            df = df.with_columns(**extra_cols)
        feats = [c for c in feature_columns(df) if not c.startswith(dropped)]
        weights = [0.0] + [float(w) for w in args.blend.split(",") if w]
        ndcg, recall, fit_s = [], [], 0.0
        blended: dict[float, list] = {w: [] for w in weights[1:]}
        col = f"score_{args.blend_model}"
        for a, b in ((0, 1), (1, 0)):
            part = df.filter(pl.col(Columns.UserIdx).is_in(halves[a].tolist()))
            if extra[key] is not None and name not in VALIDATION_STAGE_ONLY:
                part = part.with_columns(pl.lit(0, dtype=pl.Int8).alias(Columns.Stage))
                rows = extra[key].filter(pl.col(Columns.Stage) <= EARLIER_STAGES_USED.get(name, n_stages))
                part = pl.concat([part, rows.with_columns(**extra_cols).select(part.columns)])
            held = df.filter(pl.col(Columns.UserIdx).is_in(halves[b].tolist())).sort(Columns.UserIdx, Columns.ItemIdx)
            held_users = np.sort(halves[b])
            members = ENSEMBLES.get(name, [{}])
            rankers = []
            for member in members:
                ranker = instantiate(cfg.ranker, **{**ranker_over, **member})
                t1 = time.perf_counter()
                ranker.fit(part, feats)
                fit_s += time.perf_counter() - t1
                rankers.append(ranker)
            pred = ensemble_predict(rankers, held)
            targets = split.val.filter(pl.col(Columns.UserIdx).is_in(halves[b].tolist()))
            rel = relevance_matrix(targets, held_users, data.n_items)
            # The blend's weight is in units of the variant's own score spread on its training rows.
            scale = np.std(ensemble_predict(rankers, part)) / max(float(part[col].std()), 1e-12) if weights[1:] else 0.0
            for w in weights:
                score = pred + w * scale * held[col].to_numpy() if w else pred
                items = ranked_arrays(ranked_candidates(held, score, held_users, 10)[0], held_users, 10)[0]
                m = ranking_metrics(items, rel, (10,))
                if w:
                    blended[w].append(m["ndcg_at_10"])
                else:
                    ndcg.append(m["ndcg_at_10"])
                    recall.append(m["recall_at_10"])
        per_user = np.concatenate(ndcg)
        reference = per_user if reference is None else reference

        print(
            f"| {name} | {per_user.mean():.4f} | {np.concatenate(recall).mean():.4f} "
            f"| {candidate_recall(df):.3f} | {fit_s:.0f} | {paired(boot, per_user, reference)} |",
            flush=True,
        )
        for w, parts in blended.items():
            x = np.concatenate(parts)
            print(
                f"| {name} + {w:g} x {args.blend_model} | {x.mean():.4f} | | | | {paired(boot, x, reference)} |",
                flush=True,
            )
        return reference

    for fold_seed in args.fold_seed or [cfg.seed]:
        fold = np.random.default_rng(fold_seed).permutation(len(users)) % 2
        halves = [users[fold == 0], users[fold == 1]]
        print(f"\nfold seed {fold_seed}\n")
        print(
            f"| variant | val NDCG@10 | val Recall@10 | candidate recall | ranker fit s "
            f"| minus {names[0]} (paired 95 % CI) |"
        )
        print("|---|---|---|---|---|---|")
        # The first variant's per-user NDCG@10, in the same user order as every other's.
        reference = None
        for name in names:
            reference = sweep_variant(name, reference, halves)


if __name__ == "__main__":
    run_script(main)
