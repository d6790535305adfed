"""MIND (Microsoft News): ``behaviors.tsv`` click histories and impressions, ``news.tsv`` text."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from recsys.columns import Columns, Events
from recsys.data import validation as v
from recsys.data.dataset import Dataset
from recsys.data.raw import (
    DUPLICATE_POLICIES,
    check_policy,
    handle_duplicates,
    index_dataset,
    read_delimited,
    require_text,
)
from recsys.errors import ConfigError, InputError

log = logging.getLogger(__name__)

BEHAVIOR_FIELDS = (Columns.Impression, Columns.User, "time", "history", "impressions")
NEWS_FIELDS = (
    Columns.Item,
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
)
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # "11/15/2019 8:55:22 AM"; MIND gives no time zone, read as UTC
MISSING_TEXT_POLICIES = ("drop", "category_only", "error")
# Fields that name a news item's section rather than say what it reports: text from them alone
# does not count as the item having text (category_only falls back on the category).
SECTION_FIELDS = ("category", "subcategory")


def none_of(fields: Sequence[str]) -> str:
    """``['title', 'abstract']`` -> ``'neither title nor abstract'``, for messages."""
    if len(fields) == 1:
        return f"no {fields[0]}"
    if len(fields) == 2:
        return f"neither {fields[0]} nor {fields[1]}"
    return "none of " + ", ".join(fields)


def join_fields(fields: Sequence[str], separator: str) -> pl.Expr:
    """Non-empty ``fields`` joined by ``separator``; with ". " a field's own end punctuation is kept.

    >>> df = pl.DataFrame({"a": ["Is it?", "Yes."], "b": ["x", ""], "c": ["news", "news"]})
    >>> df.select(join_fields(["a", "b", "c"], ". "))["a"].to_list()
    ['Is it? x. news', 'Yes. news']
    """
    glue = "\x00"  # a NUL byte never occurs in real text fields, so it cannot be confused with one
    joined = pl.concat_str(
        [pl.when(pl.col(f) != "").then(pl.col(f)) for f in fields], separator=glue, ignore_nulls=True
    )
    if separator.lstrip().startswith("."):
        # "Is it?" + ". " + "x" would read "Is it?. x" (MIND abstracts end in a full stop).
        joined = joined.str.replace_all(f"([.!?]){glue}", "$1 ")
    return joined.str.replace_all(glue, separator, literal=True)


class MindDataSource:
    """MIND as interactions (clicks), impressions (shown / clicked) and news text.

    **Interactions** (event ``click``, weight 1):

    * *history clicks*: each behaviors row lists the user's earlier clicks, oldest first, with no
      time of their own. They get the impression time minus their distance from the end of the
      list, in seconds (the last history click at ``time - 1``, the first at ``time - len``), so
      their order is kept and they come before the impression. A user's history is repeated on
      each of their rows; the k-th click of a news item by a user is taken once, at the earliest
      time any row implies for it (repeated clicks in one history stay separate events). MIND
      built the histories from the weeks before the behaviors log (a user's list is the same on
      each of their rows), so these times are stand-ins: the events carry ``dated=False``
      (``Columns.Dated``), and ``split=global_time`` keeps them in training and cuts on the
      impression clicks alone, so that validation and test hold impression clicks only.
    * *impression clicks*: every candidate marked ``-1`` is also a click, at the impression time.

    **Impressions** (``Dataset.impressions``): ``impression_id, user_id, item_id, timestamp,
    clicked, position`` (+ ``user_idx, item_idx``), one row per candidate shown, sorted by time,
    file row and position. Score them with ``recsys.evaluation.impressions``.

    **Text**: the ``text_fields`` of ``news.tsv`` joined with ``text_separator`` (default title,
    abstract, category), empty fields skipped. Every news row is in the catalogue, also those no
    one clicked (cold items).

    **Items without text** (``missing_text``): a news item *has text* if it has a ``news.tsv`` row
    in which one of the ``text_fields`` other than category and subcategory (by default title
    and abstract; with ``text_fields=[abstract]`` the abstract alone) is not empty; text fields
    that are only the category or subcategory count every row with one. In the shared sample
    only about 4 % of the referenced news have a row at all.

    * ``drop`` (default): news without text are left out of the catalogue, and their history
      clicks, impression clicks and impression candidates are dropped; the counts are logged at
      INFO and kept in ``report``. Impressions may lose candidates (some all of them).
    * ``category_only``: a news row without text is kept with its category as text. News with
      no row at all are still dropped as in ``drop``: we know nothing about them, and a made-up
      text (the id, a placeholder) would teach the text tower noise and let it match unrelated
      items on the placeholder.
    * ``error``: any referenced news without a row, or a row without text, is an error naming
      the file, column and row (full MIND, where every news has a row).

    **Validation**: rows repeating an earlier row (behaviors: the whole line; news: the whole
    row) are dropped and counted (``duplicates="drop"``) or rejected (``"error"``), and so is a
    candidate listed twice with the same label in one impression (the first is kept); an
    impression id or news id used twice with different content, a candidate listed both clicked
    and not clicked in one impression, an unparsable time, an impression token other than
    ``<news id>-0`` / ``<news id>-1``, a wrong number of fields and bytes that are not UTF-8 are
    errors naming the file, column and row.

    Parameters
    ----------
    root:
        Folder holding the two files.
    missing_text:
        ``drop``, ``category_only`` or ``error``, see above.
    text_fields:
        ``news.tsv`` columns joined into the item text, in this order.
    text_separator:
        Put between text fields.
    duplicates:
        ``drop`` (count and log) or ``error``.
    behaviors_file, news_file:
        File names inside ``root``.
    name:
        Shown in logs, reports and MLflow tags; default: the name of the ``root`` folder (MIND's
        releases come as ``MINDsmall_train``, ``MINDlarge_dev``...), so that two releases read with
        the same config are told apart.
    """

    def __init__(
        self,
        root: str,
        missing_text: str = "drop",
        text_fields: Sequence[str] = ("title", "abstract", "category"),
        text_separator: str = ". ",
        duplicates: str = "drop",
        behaviors_file: str = "behaviors.tsv",
        news_file: str = "news.tsv",
        name: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.missing_text = check_policy("missing_text", missing_text, MISSING_TEXT_POLICIES)
        self.text_fields = list(text_fields)
        unknown = [f for f in self.text_fields if f not in NEWS_FIELDS or f == Columns.Item]
        if not self.text_fields or unknown:
            raise ConfigError(
                f"data.text_fields must be columns of news.tsv {list(NEWS_FIELDS[1:])}, got {text_fields}"
            )
        self.body_fields = [f for f in self.text_fields if f not in SECTION_FIELDS]
        self.text_separator = text_separator
        self.duplicates = check_policy("duplicates", duplicates, DUPLICATE_POLICIES)
        self.behaviors_path = self.root / behaviors_file
        self.news_path = self.root / news_file
        self.name = name or self.root.resolve().name or "mind"
        self.report: dict[str, int] = {}

    def load_news(self) -> pl.DataFrame:
        file = str(self.news_path)
        df = read_delimited(self.news_path, NEWS_FIELDS)
        df = handle_duplicates(df, NEWS_FIELDS, self.duplicates, file, self.report)
        v.require_non_null(df, Columns.Item, file)
        v.require_unique(df, Columns.Item, file)
        df = df.with_columns(pl.col(f).str.strip_chars() for f in NEWS_FIELDS[1:5])
        # Judged on the fields the text is made of: with text_fields=[abstract] a row with only a
        # title would otherwise pass here and then stop the run as "empty text" under every policy.
        no_body = pl.lit(bool(self.body_fields))
        for f in self.body_fields:
            no_body = no_body & (pl.col(f).str.strip_chars() == "")
        n_no_body = df.select(no_body.sum()).item()
        missing = none_of(self.body_fields)
        if n_no_body and self.missing_text == "error":
            row, ex = v.example(df, no_body)
            raise InputError(
                f"{n_no_body} news row(s) have {missing} (set data.missing_text=drop or category_only)",
                file=file,
                column=self.body_fields[0],
                row=row,
                example=ex,
            )
        if n_no_body and self.missing_text == "drop":
            log.info("%s: dropped %d news row(s) with %s", file, n_no_body, missing)
            self.report["news_without_text_dropped"] = n_no_body
            df = df.filter(~no_body)
        text = join_fields(self.text_fields, self.text_separator)
        df = df.with_columns(pl.when(no_body).then(pl.col("category")).otherwise(text).alias(Columns.Text))
        require_text(df, file, self.text_fields[0])
        return df

    def load_behaviors(self) -> pl.DataFrame:
        file = str(self.behaviors_path)
        df = read_delimited(self.behaviors_path, BEHAVIOR_FIELDS)
        df = handle_duplicates(df, BEHAVIOR_FIELDS, self.duplicates, file, self.report)
        for col in (Columns.Impression, Columns.User, "time"):
            v.require_non_null(df, col, file)
        v.require_unique(df, Columns.Impression, file)
        ts = pl.col("time").str.strip_chars().str.strptime(pl.Datetime("ms"), TIME_FORMAT, strict=False)
        df = df.with_columns(ts.dt.epoch("s").alias(Columns.Timestamp))
        bad = pl.col(Columns.Timestamp).is_null()
        if df.select(bad.any()).item():
            row, ex = v.example(df, bad)
            raise InputError(
                f"{df.select(bad.sum()).item()} time value(s) do not match '{TIME_FORMAT}' "
                "(e.g. 11/15/2019 8:55:22 AM)",
                file=file,
                column="time",
                row=row,
                example=ex,
            )
        return df

    def _history(self, beh: pl.DataFrame) -> pl.DataFrame:
        hist = (
            beh.select(
                v.ROW,
                Columns.User,
                Columns.Timestamp,
                pl.col("history").str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias(Columns.Item),
            )
            .with_columns(pl.col(Columns.Item).list.len().alias("_n"))
            .with_columns(pl.int_ranges(0, "_n").alias("_pos"))
            .explode(Columns.Item, "_pos")
            .with_columns(
                (pl.col(Columns.Timestamp) - pl.col("_n") + pl.col("_pos")).alias(Columns.Timestamp),
                # k-th occurrence of this item in this history: repeated clicks stay distinct events.
                pl.col("_pos").rank("ordinal").over(v.ROW, Columns.Item).alias("_occ"),
            )
        )
        # The same click shows up in each of the user's rows: keep it once, at its earliest time.
        return (
            hist.group_by(Columns.User, Columns.Item, "_occ")
            .agg(pl.col(c).sort_by(Columns.Timestamp, v.ROW).first() for c in (Columns.Timestamp, v.ROW, "_pos"))
            .select(v.ROW, "_pos", Columns.User, Columns.Item, Columns.Timestamp, pl.lit("history").alias("_from"))
            .sort(v.ROW, "_pos")  # group_by does not keep order; errors should name the first row
        )

    def _impressions(self, beh: pl.DataFrame) -> pl.DataFrame:
        tokens = (
            beh.select(
                v.ROW,
                Columns.Impression,
                Columns.User,
                Columns.Timestamp,
                "impressions",
                pl.col("impressions").str.split(" ").list.eval(pl.element().filter(pl.element() != "")).alias("_tok"),
            )
            .with_columns(pl.int_ranges(0, pl.col("_tok").list.len()).alias(Columns.Position))
            # An empty candidate list becomes one null token, reported below.
            .explode("_tok", Columns.Position, empty_as_null=True)
        )
        parts = pl.col("_tok").str.extract_groups(r"^(\S+)-([01])$")
        tokens = tokens.with_columns(
            parts.struct.field("1").alias(Columns.Item), parts.struct.field("2").alias("_label")
        )
        bad = tokens[Columns.Item].is_null()
        if bad.any():
            row, ex = v.example(tokens.select(v.ROW, Columns.Impression, "_tok", "impressions"), bad)
            raise InputError(
                f"{int(bad.sum())} candidate(s) are not '<news id>-1' (clicked) or '<news id>-0' "
                f"(shown, not clicked), or the impression list is empty; first bad token: {ex.pop('_tok')!r}",
                file=str(self.behaviors_path),
                column="impressions",
                row=row,
                example=ex,
            )
        tokens = self._repeated_candidates(tokens)
        return tokens.select(
            v.ROW,
            Columns.Impression,
            Columns.User,
            Columns.Item,
            Columns.Timestamp,
            (pl.col("_label") == "1").alias(Columns.Clicked),
            pl.col(Columns.Position).cast(pl.Int32),
        )

    def _repeated_candidates(self, tokens: pl.DataFrame) -> pl.DataFrame:
        """Candidates listed more than once in one impression (``tokens``: one row per token).

        Shown clicked and not clicked at once, the labels contradict each other: the impression
        would count a forced tie in its AUC and the click would be both a positive and a negative,
        so it is always an error. The same token twice would make two clicks at one instant and
        weigh the candidate twice in the impression's metrics: it follows ``duplicates`` (the
        first is kept).
        """
        per_item = pl.len().over(v.ROW, Columns.Item)
        mixed = (per_item > 1) & (pl.col("_label").n_unique().over(v.ROW, Columns.Item) > 1)
        shown = tokens.select(v.ROW, Columns.Impression, Columns.Item, "impressions")
        file = str(self.behaviors_path)
        if tokens.select(mixed.any()).item():
            row, ex = v.example(shown, tokens.select(mixed).to_series())
            raise InputError(
                f"news {ex[Columns.Item]!r} is listed both clicked and not clicked in one impression",
                file=file,
                column="impressions",
                row=row,
                example=ex,
            )
        repeat = pl.int_range(pl.len()).over(v.ROW, Columns.Item) > 0  # rows keep their file order
        n = tokens.select(repeat.sum()).item()
        if n == 0:
            return tokens
        if self.duplicates == "error":
            row, ex = v.example(shown, tokens.select(repeat).to_series())
            raise InputError(
                f"{n} candidate(s) are listed more than once in their impression; set data.duplicates=drop "
                "to keep the first",
                file=file,
                column="impressions",
                row=row,
                example=ex,
            )
        log.info("%s: dropped %d candidate(s) listed more than once in their impression", file, n)
        self.report["repeated_candidates_dropped"] = n
        return tokens.filter(~repeat)

    def _require_news(self, df: pl.DataFrame, known: pl.Series, column: str, what: str) -> pl.DataFrame:
        """Apply the missing-text policy to ``df`` (rows of ``behaviors.tsv`` exploded); ``what``: report key."""
        missing = ~pl.col(Columns.Item).is_in(known.implode())
        n = df.select(missing.sum()).item()
        if n == 0:
            return df
        if self.missing_text == "error":
            why = f"no row, or {none_of(self.body_fields)}" if self.body_fields else "no row"
            row, ex = v.example(df.select(v.ROW, Columns.User, Columns.Item), missing)
            raise InputError(
                f"{n} {what.replace('_', ' ')} refer to news without text in {self.news_path} ({why}); "
                "set data.missing_text=drop to drop them",
                file=str(self.behaviors_path),
                column=column,
                row=row,
                example=ex,
            )
        self.report[f"{what}_dropped"] = n
        return df.filter(~missing)

    def load(self) -> Dataset:
        self.report = {}
        news = self.load_news()
        beh = self.load_behaviors()
        known = news[Columns.Item]
        referenced = pl.concat(
            [
                beh["history"].str.split(" ").explode(),
                beh["impressions"].str.split(" ").explode().str.replace(r"-[01]$", ""),
            ]
        )
        referenced = referenced.filter(referenced != "").unique()
        history = self._require_news(self._history(beh), known, "history", "history_clicks")
        imps = self._require_news(self._impressions(beh), known, "impressions", "impression_candidates")
        clicks = imps.filter(pl.col(Columns.Clicked)).select(
            v.ROW,
            pl.col(Columns.Position).cast(pl.Int64).alias("_pos"),
            Columns.User,
            Columns.Item,
            Columns.Timestamp,
            pl.lit("impression").alias("_from"),
        )
        inter = (
            pl.concat([history, clicks])
            # Ties in time keep file order: behaviors row, then history before the row's clicks.
            .sort(Columns.User, Columns.Timestamp, v.ROW, "_from", "_pos")
            .with_row_index("_order")
            .select(
                pl.col("_order").alias(v.ROW),
                Columns.User,
                Columns.Item,
                Columns.Timestamp,
                pl.lit(Events.Click).alias(Columns.Event),
                pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight),
                (pl.col("_from") == "impression").alias(Columns.Dated),
            )
        )
        if inter.height == 0:
            raise InputError(
                "no click is left after applying data.missing_text: no clicked news has text",
                file=str(self.behaviors_path),
            )
        n_missing = referenced.filter(~referenced.is_in(known.implode())).len()
        if n_missing:
            self.report["news_without_text"] = n_missing
            log.info(
                "%s: %d of %d referenced news have no text in %s (missing_text=%s); dropped %s",
                self.behaviors_path,
                n_missing,
                referenced.len(),
                self.news_path,
                self.missing_text,
                {k: n for k, n in self.report.items() if k.endswith("_dropped")},
            )
        items = news.select(v.ROW, Columns.Item, *NEWS_FIELDS[1:5], Columns.Text)
        data = index_dataset(inter, items, self.name, impressions=imps)
        log.info(
            "%s: %d users, %d items, %d clicks, %d impressions with %d candidates",
            self.name,
            data.n_users,
            data.n_items,
            data.interactions.height,
            imps[Columns.Impression].n_unique(),
            imps.height,
        )
        return data
