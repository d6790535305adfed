"""The stages of ``python -m recsys.train``, each a function of a small state that the previous one built.

``prepare`` (check every input, build every part) -> ``log_inputs`` -> ``fit_validation`` (CF, the
text tower's fine-tuning, the fusion ranker, all on train) -> ``evaluate_test`` (refit on train +
validation, rank and score the test events) -> ``record`` (metrics, tables, evaluation bundle and
report) -> ``export`` (the fused lists) -> ``deploy`` (the served pipeline). ``recsys.train.run``
calls them in that order inside one MLflow run; a test can run one alone.

The order of the calls that draw random numbers (the encoder's and text network's initial
weights, the seeds) is part of the job's result: same seed, same metrics.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from omegaconf import DictConfig, OmegaConf

from recsys.columns import Columns
from recsys.data.dataset import Dataset, listing_times
from recsys.data.split import Split
from recsys.errors import ConfigError
from recsys.pipeline import FusionStage, HybridPipeline, LabelledStage, StageResult
from recsys.profiling import StageTimings
from recsys.recommender import History, Recommender
from recsys.text.recommender import TextRecommender
from recsys.tracking import Tracker

if TYPE_CHECKING:
    from recsys.text.fit import ResumeDir

log = logging.getLogger("recsys.train")


@dataclass
class Job:
    """What ``prepare`` checked and built: the inputs of every later stage."""

    cfg: DictConfig
    out_dir: Path
    source: Any  # the data source (its ``report`` holds what the loader's repair policies did)
    data: Dataset
    split: Split
    eval_split: Split  # ``split`` with its test part cut to ``eval.max_users`` users
    val_users: np.ndarray
    test_users: np.ndarray  # the evaluated ones
    eval_users: int
    all_test_users: int
    encoder: Any
    pipeline: HybridPipeline
    fusion: FusionStage
    tracker: Tracker
    need_gb: float  # the estimated peak memory
    as_of: bool  # eval.as_of_cut: histories cut at each stage's targets
    code: tuple[str, bool]  # the git commit and whether the tree had changes, as the job started


@dataclass
class Fitted:
    """The validation stage: models fitted on train, the ranker trained on the validation events."""

    history: History
    models: dict[str, Recommender]
    text: TextRecommender  # the fine-tuned tower
    zero_text: TextRecommender | None  # the untouched tower, when evaluated or a ranker feature
    text_metrics: dict[str, float]  # text/* from fine-tuning
    text_curve: list[tuple[int, float, float]]
    resume: ResumeDir

    def drop_cf(self) -> None:
        """Let go of the stage's CF models once the test stage has refitted its own (about
        0.4 GB at 100x); the text towers stay, which the test stage reads the test history with."""
        self.models = {n: m for n, m in self.models.items() if m is self.text or m is self.zero_text}


@dataclass
class Evaluated:
    """The test stage: models refitted on train + validation, the fused and single lists scored."""

    history: History
    models: dict[str, Recommender]
    exclude: Any  # what no model may propose (csr matrix)
    result: StageResult
    tables: dict[str, pl.DataFrame]  # protocol -> metric table
    impression_scores: pl.DataFrame | None


def job_memory(
    cfg: DictConfig,
    n_events: int,
    n_items: int,
    val_users: int,
    test_users: int,
    cf: Mapping[str, Recommender] | None = None,
) -> float:
    """The job's estimated peak memory (GB, ``recsys.profiling.check_memory``), which refuses a
    job that will not fit; the ranker learns from each labelled stage's users (about as many as
    validation has), up to its cap; of the ``cf`` models, the one whose fit holds the most."""
    from recsys.profiling import check_memory

    rank = cfg.rank
    stages = rank.get("label_stages", 1)
    ranker_users = min(val_users, rank.get("max_train_users") or val_users)
    ranker_users += (stages - 1) * min(val_users, rank.get("max_earlier_users") or val_users)
    cands = sum(rank.n_candidates.values())
    fits = [(name, model.fit_memory_gb(n_items)) for name, model in (cf or {}).items()]
    cf_fit = max(fits, key=lambda f: f[1], default=None)
    return check_memory(n_events, n_items, ranker_users, test_users, cands, cfg.get("memory_limit_gb"), cf_fit)


# The run folder's subfolders ``deploy`` saves pipelines to: the served one, and with
# ``model.refit_all`` the evaluated one beside it.
SERVED_FOLDER, EVALUATED_FOLDER = "pipeline", "pipeline_evaluated"


def refits_all(cfg: DictConfig) -> bool:
    """``model.refit_all`` (default true): the served pipeline is refitted on every event."""
    return bool((cfg.get("model") or {}).get("refit_all", True))


def check_run_folder(cfg: DictConfig, out_dir: Path) -> None:
    """The pipelines ``deploy`` saves into the run folder at the end may not exist there yet
    (``TrainedPipeline.check_target``): a rerun into a used folder (a fixed ``hydra.run.dir``)
    would otherwise stop only after all the training."""
    from recsys.pipeline_model import TrainedPipeline

    for folder in (EVALUATED_FOLDER, SERVED_FOLDER) if refits_all(cfg) else (SERVED_FOLDER,):
        TrainedPipeline.check_target(out_dir / folder, "hydra.run.dir")


def prepare(cfg: DictConfig, timings: StageTimings) -> Job:
    """Everything that can fail on bad input, then seed, before any training (stages ``load`` and
    ``text_setup``: Lightning, the seed and the encoder).

    The settings are checked before the data is read, and Lightning is imported only after both:
    its import alone takes 5-10 s on 2 cores, and a typo should fail in seconds.
    """
    from hydra.utils import instantiate

    from recsys.evaluation.bundle import git_version
    from recsys.evaluation.sampling import sample_test_users
    from recsys.pipeline import check_split, stage_users
    from recsys.recommender import DERIVED_SOURCES, nearest_name
    from recsys.text.distributed import check_trainer
    from recsys.text.options import budget, check_freeze_layers, check_options

    # The code this run trains with is the tree as it starts, not as the evaluation is written.
    code = git_version(cfg.paths.root_dir)

    out_dir = Path(cfg.paths.output_dir)
    check_run_folder(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with timings.stage("load"):
        budget(cfg.text.get("budget_minutes"))
        check_options(cfg.text.get("budget_minutes"), cfg.text.data, cfg.text.module, cfg.text.net)
        check_trainer(cfg.trainer)  # devices, strategy, launcher: before any data is loaded
        # The models' and the ranker's settings (their constructors check them), before the data.
        cf = {name: instantiate(node) for name, node in cfg.cf.items()}
        earlier_towers(cfg)
        ranker = instantiate(cfg.ranker)
        fusion = FusionStage(
            dict(cfg.rank.n_candidates),
            ranker,
            cfg.rank.get("max_train_users"),
            seed=cfg.seed,
            label_stages=cfg.rank.get("label_stages", 1),
            max_earlier_users=cfg.rank.get("max_earlier_users"),
            max_earlier_examined=cfg.rank.get("max_earlier_examined"),
            score_gaps=cfg.rank.get("score_gap_feature", False),
        )
        # Every candidate source by name, before any training: CF, the text towers, what derives from them.
        towers = ["text"] + (["text_zeroshot"] if cfg.rank.get("text_zeroshot_feature") else [])
        nearest = [nearest_name(t) for t in towers] if cfg.rank.get("text_nearest_feature") else []
        text_models = [*towers, *DERIVED_SOURCES, *nearest]
        fusion.fused.check_sources(dict.fromkeys([*cf, *text_models]))
        source = instantiate(cfg.data)
        planned = getattr(source, "planned_counts", None)
        if planned is not None:  # generated data: its size is known before a row is drawn
            n_users, n_items, n_events = planned()
            job_memory(cfg, n_events, n_items, n_users, min(n_users, cfg.eval.get("max_users") or n_users))
        data = source.load()
        split = instantiate(cfg.split).split(data.interactions)
        val_users, _ = check_split(data, split)

        for model in cf.values():  # a catalogue a model cannot fit is refused before the tower trains
            model.check_catalogue(data.n_items)
        # eval.max_users: past that many test users, every model is evaluated on a seeded sample.
        eval_split, eval_users, all_test_users = sample_test_users(split, cfg.eval.get("max_users"), cfg.seed)
        test_users = stage_users(eval_split.test, "test")
        need_gb = job_memory(cfg, data.interactions.height, data.n_items, len(val_users), len(test_users), cf)
        pipeline = HybridPipeline(cf, fusion, ks=list(cfg.eval.ks), max_k=cfg.eval.max_k)
        tracker = instantiate(cfg.logger)
    # Lightning last (the docstring says why), in a stage of its own: importing it and loading the
    # BERT take seconds that are neither the data's nor the text tower's training.
    with timings.stage("text_setup"):
        import lightning as L
        import torch

        from recsys.quiet import quiet_lightning

        quiet_lightning()
        L.seed_everything(cfg.seed, workers=True)
        torch.use_deterministic_algorithms(True, warn_only=True)
        encoder = instantiate(cfg.encoder)
        if freeze := cfg.text.module.get("freeze_layers"):  # the layer count, known now (encoder.num_layers)
            check_freeze_layers(freeze, len(encoder.bert.encoder.layer))
    for name, k in (("export.k", cfg.export.k), ("eval.max_k", cfg.eval.max_k)):
        if k > data.n_items:
            log.warning("%s=%d is larger than the catalogue (%d items): lists will be shorter", name, k, data.n_items)
    counts = (data.name, data.n_users, data.n_items, data.interactions.height, split.describe())
    log.info("data %s: %d users, %d items, %d events; %s", *counts)
    return Job(
        cfg=cfg,
        out_dir=out_dir,
        source=source,
        data=data,
        split=split,
        eval_split=eval_split,
        val_users=val_users,
        test_users=test_users,
        eval_users=eval_users,
        all_test_users=all_test_users,
        encoder=encoder,
        pipeline=pipeline,
        fusion=fusion,
        tracker=tracker,
        need_gb=need_gb,
        as_of=bool(cfg.eval.get("as_of_cut", True)),
        code=code,
    )


def log_inputs(job: Job) -> None:
    """The run's parameters, its data (name, hash, origin, row counts), the loader's repairs and
    the config, secrets masked in every copy."""
    from recsys.atomic import write_text_atomic
    from recsys.tracking import mask_secrets

    cfg, data, split, tracker = job.cfg, job.data, job.split, job.tracker
    tracker.log_params(OmegaConf.to_container(cfg, resolve=True))
    digest = data.fingerprint()
    tracker.set_tags({"dataset": data.name, "dataset_hash": digest})
    origin = next((str(cfg.data[k]) for k in ("interactions", "root", "directory") if cfg.data.get(k)), ".")
    counts = {"users": data.n_users, "items": data.n_items, "events": data.interactions.height}
    frame = data.interactions.select(Columns.User, Columns.Item, Columns.Timestamp, Columns.Event)
    tracker.log_dataset(frame, data.name, digest, origin, {**counts, **split.describe()})
    tracker.log_metrics({f"data/{k}": v for k, v in split.describe().items()})
    # What the loader's repair policies did (items_without_text_kept, duplicates_dropped:<file> ...).
    report = getattr(job.source, "report", {})
    tracker.log_metrics({f"data/{re.sub(r'[^a-zA-Z0-9_/. -]', '_', k)}": v for k, v in report.items()})
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(mask_secrets(OmegaConf.to_container(cfg, resolve=True))))
    tracker.log_artifact(write_text_atomic(config_yaml, job.out_dir / "config.yaml"))


def fit_validation(job: Job, run_id: str, timings: StageTimings) -> Fitted:
    """Fit on train: the text tower's fine-tuning (``text_finetune``), its item embeddings
    (``text_encode``), CF (``cf_fit_val``: after the tower, whose item vectors a CF model may
    start from) and the fusion ranker on the validation events (``ranker_fit``)."""
    from hydra.utils import instantiate

    from recsys.pipeline import stage_exclusion, stage_history
    from recsys.text.distributed import fine_tune_ranks
    from recsys.text.fit import RunLogger, open_resume_dir, zero_shot_copy

    cfg, data, split = job.cfg, job.data, job.split
    history = History(split.train, data.n_users, data.n_items)
    history = stage_history(history, split.val) if job.as_of else history
    with timings.stage("text_finetune"):
        item_ids, item_lengths = job.encoder.tokenize(data.texts)
        net = instantiate(cfg.text.net)(job.encoder)
        # rank.text_zeroshot_feature: the untouched tower is a ranker feature too, beside the tuned one.
        zs_feature = bool(cfg.rank.get("text_zeroshot_feature", False))
        zero_net = zero_shot_copy(net) if cfg.eval.zeroshot or zs_feature else None
        # rank.earlier_towers: each earlier labelled stage fine-tunes its own tower from this start.
        earlier_start = zero_shot_copy(net) if job.fusion.label_stages > 1 and earlier_towers(cfg) else None
        listed = listing_times(data.items)
        # Checkpoints live in a folder named by the config and data, so the same command resumes.
        resume = open_resume_dir(
            cfg.text.resume_root if cfg.text.get("resume", False) else None,
            OmegaConf.to_container(cfg, resolve=True),
            [cfg.paths.output_dir, cfg.paths.mlruns_dir],
            data.fingerprint(),
        )
        ckpt_dir = str(resume.path or job.out_dir / "checkpoints")
        logger = RunLogger(experiment_name=job.tracker.experiment, tracking_uri=job.tracker.uri, run_id=run_id)
        ft_job = tower_job(cfg, net, item_ids, item_lengths, listed, history, split.val, ckpt_dir, resume.path)
        net, text_metrics, text_curve = fine_tune_ranks(ft_job, logger)  # trainer=ddp: on several processes
        job.tracker.log_metrics(text_metrics)

    with timings.stage("text_encode"):
        text = TextRecommender.from_tokens(net, item_ids, item_lengths).fit(history)
        zero_text = TextRecommender.from_tokens(zero_net, item_ids, item_lengths) if zero_net is not None else None
        texts = text_features(cfg, history, text, text.net.temperature, zero_text.fit(history) if zs_feature else None)
    with timings.stage("cf_fit_val"):
        cf = job.pipeline.fit_cf(history, item_text=text.item_space())
    models = {**cf, **texts}
    with timings.stage("ranker_fit"):
        exclude = stage_exclusion(history, data.items, split.val)
        validation = LabelledStage(job.val_users, models, history, split.val, exclude)
        own = None
        if earlier_start is not None:
            own = StageTower(
                cfg, earlier_start, item_ids, item_lengths, listed, job.out_dir, job.tracker.log_metrics, resume.path
            )
        job.fusion.fit(validation, _earlier_stages(job, text, zero_text if zs_feature else None, own))
    return Fitted(history, models, text, zero_text, text_metrics, text_curve, resume)


def tower_job(
    cfg: DictConfig,
    net: Any,
    item_ids: Any,
    item_lengths: Any,
    listed: np.ndarray,
    history: History,
    targets: pl.DataFrame,
    ckpt_dir: str,
    resume_path: Path | None,
) -> Any:
    """The text tower's fine-tuning (``FineTuneJob``): ``net`` trained on ``history``, chosen on
    ``targets``, its checkpoints in ``ckpt_dir``, as configured (data, module, callbacks, trainer,
    ``text.budget_minutes``). The job's tower and each earlier stage's (``StageTower``) use it."""
    from hydra.utils import instantiate

    from recsys.text.distributed import FineTuneJob, TrainerSpec
    from recsys.text.options import budget

    datamodule = instantiate(cfg.text.data)(
        item_ids=item_ids, item_lengths=item_lengths, train=history, val=targets, available_from=listed
    )
    callbacks = [
        instantiate(c, **({"dirpath": ckpt_dir} if "dirpath" in c else {})) for c in cfg.text.callbacks.values()
    ]
    trainer = TrainerSpec(
        OmegaConf.to_container(cfg.trainer, resolve=True), callbacks, budget(cfg.text.get("budget_minutes"))
    )
    return FineTuneJob(net, datamodule, instantiate(cfg.text.module), trainer, resume_path)


def earlier_towers(cfg: DictConfig) -> bool:
    """``rank.earlier_towers``, checked: true or false."""
    flag = cfg.rank.get("earlier_towers", False)
    if not isinstance(flag, bool):
        raise ConfigError(f"rank.earlier_towers must be true or false, got {flag!r}")
    return flag


class StageTower:
    """``rank.earlier_towers``: the text tower of an earlier labelled stage, fine-tuned from the
    zero-shot ``start`` on that stage's history and chosen on its targets, as the job's tower is
    on train and the validation events. The job's own tower trained on those targets: a ranker
    that learns from its scores of them learns to trust it more than it earns on events it never
    saw (docs/design.md, "Labels from two stages"). Its checkpoints live in ``earlier_stage<k>/``
    of the job's resume folder (``resume_dir``, removed with it when the run succeeds), so a killed
    job resumes this fine-tuning, or reuses it when it had finished, as it does the job's tower;
    without one (``text.resume=false``, or another run holding the folder), in a temporary folder
    under ``work_dir``. ``log_metrics`` receives its ``text_stage<k>/*`` metrics.
    ``bench/fusion_sweep.py`` builds the same towers."""

    def __init__(
        self,
        cfg: DictConfig,
        start: Any,
        item_ids: Any,
        item_lengths: Any,
        listed: np.ndarray,
        work_dir: Path,
        log_metrics: Callable[[dict[str, float]], None],
        resume_dir: Path | None = None,
    ) -> None:
        self.cfg, self.start, self.item_ids, self.item_lengths, self.listed = cfg, start, item_ids, item_lengths, listed
        self.work_dir, self.log_metrics, self.resume_dir = work_dir, log_metrics, resume_dir
        self.stage = 0

    def __call__(self, history: History, targets: pl.DataFrame) -> TextRecommender:
        import copy
        import tempfile

        from recsys.text.distributed import fine_tune_ranks

        self.stage += 1

        def fine_tune(ckpt_dir: Path, resume: Path | None) -> tuple[Any, dict[str, float]]:
            net = copy.deepcopy(self.start)
            ft_job = tower_job(
                self.cfg, net, self.item_ids, self.item_lengths, self.listed, history, targets, str(ckpt_dir), resume
            )
            net, metrics, _ = fine_tune_ranks(ft_job, False)
            return net, metrics

        if self.resume_dir is not None:
            folder = self.resume_dir / f"earlier_stage{self.stage}"
            folder.mkdir(parents=True, exist_ok=True)
            net, metrics = fine_tune(folder, folder)
        else:
            with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="earlier_tower_") as tmp:
                net, metrics = fine_tune(Path(tmp), None)
        self.log_metrics({f"text_stage{self.stage}/{k.split('/', 1)[1]}": v for k, v in metrics.items()})
        return TextRecommender.from_tokens(net, self.item_ids, self.item_lengths)


def _earlier_stages(
    job: Job, text: TextRecommender, zero_text: TextRecommender | None, own: StageTower | None = None
) -> Iterator[LabelledStage]:
    """The ranker's labelled stages inside train (``rank.label_stages`` - 1), each with CF fitted
    on its own history and the text towers reading it (with ``own``, a tuned tower of its own);
    built one at a time, when the ranker reaches it."""
    from recsys.pipeline import earlier_labelled_stages

    def models(history: History, targets: pl.DataFrame) -> dict[str, Recommender]:
        tower = text if own is None else own(history, targets)
        tuned = TextRecommender(tower.net, tower.item_embeddings).fit(history)
        zero = None if zero_text is None else TextRecommender(zero_text.net, zero_text.item_embeddings).fit(history)
        cf = job.pipeline.fit_cf(history, item_text=tuned.item_space())
        return {**cf, **text_features(job.cfg, history, tuned, tuned.net.temperature, zero)}

    n = job.fusion.label_stages - 1
    return earlier_labelled_stages(job.split.train, n, job.data, job.as_of, models)


def text_features(
    cfg: DictConfig,
    history: History,
    text: Recommender,
    temperature: float,
    zero_text: Recommender | None = None,
) -> dict[str, Recommender]:
    """The text models a labelled stage's ranker reads, from towers fitted on ``history``, in the
    order of every stage's columns (after CF's): the fine-tuned tower (``temperature``: its
    softmax's), the candidate sources derived from it, the zero-shot tower where given
    (``rank.text_zeroshot_feature``) and the towers' nearest-history-item cosines. The job's
    validation, earlier and test stages and ``bench/fusion_sweep.py`` all build them here."""
    from recsys.recommender import derived_models

    models = {"text": text, **derived_models(text, temperature, history)}
    if zero_text is not None:
        models["text_zeroshot"] = zero_text
    return models | nearest_features(cfg, models, history)


def nearest_features(cfg: DictConfig, models: dict[str, Recommender], history: History) -> dict[str, Recommender]:
    """With ``rank.text_nearest_feature``: each text tower's closest-history-item cosine
    (``NearestText``) as a ranker feature, fitted on ``history``; else nothing (``text_features``
    adds them to every stage)."""
    from recsys.recommender import nearest_models

    if not cfg.rank.get("text_nearest_feature", False):
        return {}
    towers = {n: models[n] for n in ("text", "text_zeroshot") if n in models}
    return nearest_models(towers, history, cfg.text.max_history)


def evaluate_test(job: Job, val: Fitted, timings: StageTimings) -> Evaluated:
    """Refit CF on train + validation (``cf_fit_test``), rank the test users (``test_rank``) and
    score every model on the untouched test events (``evaluate``)."""
    from recsys.pipeline import BlockLists, stage_exclusion, stage_history

    cfg, data, split, targets = job.cfg, job.data, job.split, job.eval_split.test
    with timings.stage("cf_fit_test"):
        history = val.history.extend(split.val)
        history = stage_history(history, split.test) if job.as_of else history
        cf = job.pipeline.fit_cf(history, item_text=val.text.item_space())
    with timings.stage("test_rank"):
        val.text.fit(history)
        if val.zero_text is not None:
            val.zero_text.fit(history)  # a feature, or a single model the report compares
        zero_feature = val.zero_text if "text_zeroshot" in val.models else None
        models = {**cf, **text_features(cfg, history, val.text, val.text.net.temperature, zero_feature)}
        exclude = stage_exclusion(history, data.items, targets)
        singles = {name: m for name, m in models.items() if m.is_feature}
        if val.zero_text is not None:
            singles["text_zeroshot"] = val.zero_text
        # The candidate sources' own lists come from the score blocks the fused ranking reads.
        shared = BlockLists(singles, cfg.eval.max_k, exclude)
        fused = job.fusion.recommend(job.test_users, models, history, cfg.eval.max_k, exclude, on_blocks=shared)
    with timings.stage("evaluate"):
        evaluate = job.pipeline.evaluate
        listed = shared.lists(job.test_users)
        result = evaluate(job.test_users, targets, data.n_items, singles, history, fused, True, exclude, listed)
        tables = {"test": result.table}
        if cfg.eval.published:
            published = evaluate(job.test_users, targets, data.n_items, singles, history, fused, False)
            tables["test_published"] = published.table
        imp_scores = None
        if data.impressions is not None:
            imp_scores = _impressions(job, history, models, singles, exclude)
    return Evaluated(history, models, exclude, result, tables, imp_scores)


def _impressions(job: Job, history: History, models: dict, singles: dict, exclude: Any) -> pl.DataFrame | None:
    """Every model's scores of the shown test impressions, their metrics logged
    (``test_impressions/<model>/*``); None when no impression is left to score."""
    from recsys.evaluation.impressions import impression_metrics, stage_impressions, summarize
    from recsys.pipeline import impression_scores

    imps, imp_counts = stage_impressions(job.data.impressions, job.eval_split.test, history.interactions)
    log.info("test-stage impressions: %s", imp_counts)
    job.tracker.log_metrics({f"data/impressions_{k}": v for k, v in imp_counts.items()})
    if not imps.height:
        return None
    scores = impression_scores(imps, singles, job.fusion, models, history, exclude)
    for name, part in scores.partition_by("model", as_dict=True).items():
        summary = summarize(impression_metrics(part, ks=(5, 10)))
        job.tracker.log_metrics({f"test_impressions/{name[0]}/{k}": v for k, v in summary.items()})
    return scores


def record(job: Job, val: Fitted, test: Evaluated, run_id: str, timings: StageTimings) -> dict[str, float]:
    """Log the test and ranker metrics, ``metrics.csv`` and ``feature_importance.csv``; then the
    evaluation bundle and report (``evaluation_report``). Returns the metrics logged."""
    from recsys.atomic import write_text_atomic
    from recsys.evaluation.sampling import ci95_half_width

    cfg, fusion, tracker, result = job.cfg, job.fusion, job.tracker, test.result
    metrics = {
        f"{prefix}/{row['model']}/{c}": row[c]
        for prefix, tab in test.tables.items()
        for row in tab.iter_rows(named=True)
        for c in tab.columns[1:]
    }
    metrics["rank/candidate_recall_val"] = fusion.candidate_recall_val
    metrics["rank/train_users"] = fusion.train_users
    metrics["rank/examined_users"] = fusion.examined_users
    metrics["rank/label_stages_used"] = fusion.stages_used
    metrics["mem/estimated_peak_mb"] = job.need_gb * 1000
    metrics["eval/users"], metrics["eval/users_total"] = job.eval_users, job.all_test_users
    if job.eval_users < job.all_test_users:
        first = f"ndcg_at_{cfg.eval.ks[0]}"
        for name, per_user in result.metrics.items():
            metrics[f"test/{name}/{first}_ci95"] = ci95_half_width(per_user[first], job.all_test_users)
        log.warning(
            "evaluated on a sample of %d of %d test users (eval.max_users); test/*/%s_ci95 is the "
            "sampling error's 95%% half-width; recommendations.parquet holds the sampled users "
            "(python -m recsys.recommend exports everyone)",
            job.eval_users,
            job.all_test_users,
            first,
        )
    metrics["rank/best_iteration"] = fusion.ranker.best_iteration
    if fusion.ranker.stop_score is not None:
        metrics["rank/val_ndcg_heldout"] = fusion.ranker.stop_score
    tracker.log_metrics(metrics)
    table_all = pl.concat([tab.with_columns(pl.lit(p).alias("protocol")) for p, tab in test.tables.items()])
    tracker.log_artifact(write_text_atomic(table_all.write_csv(), job.out_dir / "metrics.csv"))
    importance = fusion.ranker.feature_importance().write_csv()
    tracker.log_artifact(write_text_atomic(importance, job.out_dir / "feature_importance.csv"))
    with timings.stage("evaluation_report"):
        finetuning = {**val.text_metrics, "curve": val.text_curve, "budget_minutes": cfg.text.get("budget_minutes")}
        save_evaluation(job, val, test, run_id, finetuning)
    return metrics


def export(job: Job, test: Evaluated, timings: StageTimings) -> Path:
    """The fused top-``export.k`` of every evaluated test user, seen items removed (``export``)."""
    from recsys.atomic import write_parquet_atomic
    from recsys.output import recommendations_frame

    with timings.stage("export"):
        k, result = job.cfg.export.k, test.result
        top = (result.recommended["fused"][:, :k], result.scores["fused"][:, :k], result.sources[:, :k])
        recs = recommendations_frame(job.data, job.test_users, *top)
        path = write_parquet_atomic(recs, job.out_dir / "recommendations.parquet")
        job.tracker.log_artifact(path)
    return path


def log_timings(job: Job, timings: StageTimings) -> dict[str, float]:
    """``time/*`` and ``mem/*`` of every stage, and the ranker's parts summed over both stages
    (``time/fusion_*``, no memory window of their own), logged; returns them."""
    out = {**timings.metrics(), **{f"time/fusion_{k}_s": v for k, v in job.fusion.timings.items()}}
    job.tracker.log_metrics(out)
    return out


def print_summary(job: Job, test: Evaluated, run_id: str, model_uri: str, rec_path: Path, seconds: float) -> None:
    """The test tables and where the run's outputs are, on stdout."""
    from recsys.evaluation.bundle import split_description

    desc = split_description(job.cfg.split)
    split = f"{desc.pop('type')}({', '.join(f'{k}={v}' for k, v in desc.items())})"
    earlier = pl.concat([job.split.train[Columns.UserIdx], job.split.val[Columns.UserIdx]]).unique()
    new_users = int((~np.isin(job.test_users, earlier.to_numpy())).sum())
    without = f", {new_users} of them without earlier events (no list from CF or the text tower)" if new_users else ""
    users = f"{len(job.test_users)} users"
    if job.eval_users < job.all_test_users:
        users = f"{len(job.test_users)} of {job.all_test_users} users (a seeded sample)"
    with pl.Config(tbl_rows=20, tbl_cols=20, float_precision=4, tbl_hide_dataframe_shape=True):
        print(f"\nTest metrics ({job.data.name}, {split}, {users}{without}; full ranking, seen items removed):")
        print(test.result.table)
        if "test_published" in test.tables:
            print("Published protocol (full ranking, history items NOT removed by the evaluator):")
            print(test.tables["test_published"])
    print(f"MLflow run {run_id}; model {model_uri}; recommendations: {rec_path}; total {seconds:.0f}s")


def deploy(job: Job, test: Evaluated) -> str:
    """Register what is served; returns its model URI.

    With ``model.refit_all`` (default) the served pipeline learns from every event, the test
    events included: CF refitted, histories and item statistics extended, the text towers'
    weights and the ranker as evaluated. The evaluated test-stage pipeline is logged beside it as
    ``model_evaluated`` (not registered), for the record. Without it, the evaluated pipeline is
    the served one.
    """
    from recsys.export.pyfunc import log_trained_pipeline

    cfg, data, fusion, out_dir = job.cfg, job.data, job.fusion, job.out_dir
    if not refits_all(cfg):
        return log_trained_pipeline(cfg, data, test.history, test.models, fusion, out_dir, folder=SERVED_FOLDER)
    log_trained_pipeline(
        cfg, data, test.history, test.models, fusion, out_dir, name="model_evaluated", folder=EVALUATED_FOLDER
    )
    hist_all = test.history.extend(job.split.test)
    models_all = refit_models(job.pipeline, hist_all, test.models)
    log.info("deploy: refitted on all %d events", hist_all.interactions.height)
    return log_trained_pipeline(cfg, data, hist_all, models_all, fusion, out_dir, folder=SERVED_FOLDER)


def refit_models(pipeline, history, models: dict) -> dict:
    """``models`` for ``history``: CF refitted, the text towers (weights kept) reading it, in the
    same order (the ranker's features follow it)."""
    from recsys.recommender import derived_bases

    cf = pipeline.fit_cf(history, item_text=models["text"].item_space())
    out = {}
    for name, m in models.items():
        if name in cf:
            out[name] = cf[name]
        elif isinstance(m, TextRecommender):
            out[name] = TextRecommender(m.net, m.item_embeddings).fit(history)
    for name, tower in derived_bases(models).items():
        out[name] = models[name].over(out[tower]).fit(history)
    return {name: out[name] for name in models}


def feature_time(history, as_of_cut: bool) -> str:
    """The protocol card's line on when time-dependent features were taken."""
    if history.user_now is not None:
        # A per-user split, or a global cut whose training side holds undated events with stand-in
        # times after it (MIND's history clicks): either way each user is judged at their own cut.
        return "as of each user's cut: just before their first held-out event"
    if as_of_cut:
        return "as of the stage's end: one cut for everybody, every held-out event after it"
    return (
        "as of the stage's end (eval.as_of_cut=false): under a per-user split, time-dependent "
        "features count other users' events from after a user's held-out one"
    )


def save_evaluation(job: Job, val: Fitted, test: Evaluated, run_id: str, finetuning: dict[str, Any]) -> None:
    """The evaluation bundle (``evaluation/``) and, with ``eval.report``, the report (``report/``),
    both logged to the run; ``python -m recsys.evaluate`` rebuilds the report from the bundle alone."""
    from hydra.utils import instantiate

    from recsys.evaluation.bundle import BUNDLE_DIR, make_protocol, read_bundle, write_bundle

    cfg, data, split, tracker, result = job.cfg, job.data, job.eval_split, job.tracker, test.result
    out_dir = job.out_dir
    protocol = make_protocol(
        run_id=run_id,
        experiment=tracker.experiment,
        data_name=data.name,
        data_hash=data.fingerprint(),
        n_users=data.n_users,
        n_items=data.n_items,
        split=OmegaConf.to_container(cfg.split, resolve=True),
        split_counts=split.describe(),
        seen_filtering=True,
        availability_filtering=listing_times(data.items) is not None,
        ks=list(cfg.eval.ks),
        max_k=cfg.eval.max_k,
        seed=cfg.seed,
        targets=split.test,
        models=list(result.recommended),
        root=cfg.paths.root_dir,
        feature_time=feature_time(test.history, job.as_of),
        test_users_sampled_from=job.all_test_users if job.eval_users < job.all_test_users else None,
        code=job.code,
    )
    folder = out_dir / BUNDLE_DIR
    files = write_bundle(
        folder,
        protocol=protocol,
        users=result.users,
        recommended=result.recommended,
        scores=result.scores,
        sources=result.sources,
        targets=split.test,
        history=test.history.interactions,
        n_items=data.n_items,
        item_embeddings=val.text.item_embeddings.numpy(),
        feature_importance=job.fusion.ranker.feature_importance(),
        impression_scores=test.impression_scores,
        finetuning=finetuning,
    )
    for f in files:
        tracker.log_artifact(f, BUNDLE_DIR)
    result.keep_lists(["fused"])  # the export's; the others are on disk, and the report reads them there
    if cfg.eval.report:
        # Read back from disk: the report at the end of training is exactly the one the CLI makes.
        report_dir = out_dir / "report"
        for f in instantiate(cfg.eval.reporter).write(read_bundle(folder, run_id), report_dir):
            tracker.log_artifact(f, str(Path("report") / f.parent.relative_to(report_dir)))
            if f.suffix == ".png":  # the report's plots, also as images beside the run's charts
                tracker.log_image(f, key=f"report/{f.stem}")
        log.info("evaluation report: %s", out_dir / "report" / "report.html")
