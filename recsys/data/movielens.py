"""MovieLens 100K (GroupLens): ``u.data`` ratings, ``u.item`` titles and genres."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from recsys.columns import Columns
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

RATING = "rating"
TITLE = "title"
ITEM_FIELDS = ("release_date", "video_release_date", "imdb_url")
N_GENRES = 19


class MovieLensDataSource:
    """MovieLens 100K as implicit feedback: a rating of at least ``min_rating`` is a positive.

    Reads, from ``root``:

    * ``u.data``: ``user <TAB> item <TAB> rating <TAB> unix time``, no header;
    * ``u.item``: ``id | title | release date | video release date | IMDb URL | 19 genre flags``,
      latin-1 encoded (``item_encoding``);
    * ``u.genre``: ``genre name | flag position``.

    **Positives.** Ratings ``>= min_rating`` become interactions (default 4: "liked it"); lower
    ratings are dropped, not used as negatives, and their count is logged. ``min_rating=0`` keeps
    all 100,000 ratings (943 users, 1,682 movies), as in RecBole's ml-100k protocol; with the
    default 4 some users and movies keep no positive at all. The rating is kept as an extra
    ``rating`` column; every interaction has ``weight`` 1.

    **Text.** ``"<title>. <genre>, <genre>"`` (the title carries the year, e.g. "Toy Story
    (1995)"); the genre ``unknown`` is left out because it says nothing. All 1,682 movies are in
    the catalogue, also those without positives (cold items, reachable through text only). Movie
    267 is titled "unknown" in the original file; it keeps that text.

    **Validation.** Duplicate rating rows (same user, item, rating and time) are dropped and
    counted (``duplicates="drop"``) or rejected (``"error"``). A rated item missing from
    ``u.item``, a rating or time that is not an integer, a rating outside 1..5, a genre flag other
    than 0/1 and an empty title are errors naming the file, column and row. Ties in time (users
    often rated many movies in the same second) keep file order.

    Parameters
    ----------
    root:
        Folder holding ``u.data``, ``u.item`` and ``u.genre``.
    min_rating:
        Smallest rating that counts as a positive, 0..5.
    event:
        Event type given to every interaction.
    duplicates:
        ``drop`` (count and log) or ``error``.
    item_encoding:
        Encoding of ``u.item`` and ``u.genre`` (GroupLens ships latin-1).
    name:
        Shown in logs, reports and MLflow tags.
    """

    def __init__(
        self,
        root: str,
        min_rating: int = 4,
        event: str = "rating",
        duplicates: str = "drop",
        item_encoding: str = "latin-1",
        name: str = "ml-100k",
    ) -> None:
        if not 0 <= min_rating <= 5:
            raise ConfigError(f"data.min_rating must be in 0..5, got {min_rating}")
        self.root = Path(root)
        self.min_rating = int(min_rating)
        self.event = event
        self.duplicates = check_policy("duplicates", duplicates, DUPLICATE_POLICIES)
        self.item_encoding = item_encoding
        self.name = name
        self.report: dict[str, int] = {}

    def load_genres(self) -> list[str]:
        path = self.root / "u.genre"
        df = read_delimited(path, ["genre", "position"], separator="|", encoding=self.item_encoding)
        df = v.cast_column(df, "position", pl.Int64(), str(path))
        v.require_unique(df, "position", str(path))
        if sorted(df["position"].to_list()) != list(range(N_GENRES)):
            raise InputError(f"expected genre positions 0..{N_GENRES - 1}", file=str(path), column="position")
        return df.sort("position")["genre"].to_list()

    def load_items(self) -> pl.DataFrame:
        genres = self.load_genres()
        path = self.root / "u.item"
        file = str(path)
        df = read_delimited(
            path, [Columns.Item, TITLE, *ITEM_FIELDS, *genres], separator="|", encoding=self.item_encoding
        )
        df = handle_duplicates(df, df.columns[1:], self.duplicates, file, self.report)
        v.require_non_null(df, Columns.Item, file)
        v.require_unique(df, Columns.Item, file)
        v.require_non_null(df, TITLE, file)
        for genre in genres:
            v.require_in(df, genre, ["0", "1"], file)
        named = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in genres if g != "unknown"]
        genre_text = pl.concat_str(named, separator=", ", ignore_nulls=True)
        text = pl.concat_str([pl.col(TITLE).str.strip_chars(), genre_text], separator=". ", ignore_nulls=True)
        df = df.with_columns(
            # A movie with no genre flag but "unknown" would otherwise end in ". ".
            text.str.strip_suffix(". ").alias(Columns.Text),
            pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in genres])
            .list.drop_nulls()
            .alias("genres"),
        )
        require_text(df, file, TITLE)
        return df.select(v.ROW, Columns.Item, TITLE, "genres", *ITEM_FIELDS, Columns.Text)

    def load_interactions(self, item_ids: pl.Series) -> pl.DataFrame:
        path = self.root / "u.data"
        file = str(path)
        df = read_delimited(path, [Columns.User, Columns.Item, RATING, Columns.Timestamp])
        df = handle_duplicates(df, df.columns[1:], self.duplicates, file, self.report)
        for col in (Columns.User, Columns.Item):
            v.require_non_null(df, col, file)
        df = v.cast_column(df, RATING, pl.Int64(), file)
        df = v.cast_column(df, Columns.Timestamp, pl.Int64(), file)
        out_of_range = ~pl.col(RATING).is_between(1, 5)
        if df.select(out_of_range.any()).item():
            row, ex = v.example(df, out_of_range)
            raise InputError("ratings must be 1..5", file=file, column=RATING, row=row, example=ex)
        v.require_known(df, Columns.Item, item_ids, file, str(self.root / "u.item"))
        positive = pl.col(RATING) >= self.min_rating
        n_dropped = df.select((~positive).sum()).item()
        if n_dropped:
            log.info("%s: %d rating(s) below min_rating=%d dropped", file, n_dropped, self.min_rating)
            self.report["below_min_rating_dropped"] = n_dropped
        return df.filter(positive).select(
            v.ROW,
            Columns.User,
            Columns.Item,
            Columns.Timestamp,
            pl.lit(self.event).alias(Columns.Event),
            pl.lit(1.0, dtype=pl.Float32).alias(Columns.Weight),
            RATING,
        )

    def load(self) -> Dataset:
        self.report = {}
        items = self.load_items()
        inter = self.load_interactions(items[Columns.Item])
        if inter.height == 0:
            raise InputError(f"no rating is >= min_rating={self.min_rating}", file=str(self.root / "u.data"))
        data = index_dataset(inter, items, self.name)
        log.info(
            "%s: %d users, %d items, %d events (ratings >= %d)",
            self.name,
            data.n_users,
            data.n_items,
            data.interactions.height,
            self.min_rating,
        )
        return data
