"""Cost of ``head.C: auto`` (and ``head.alpha: auto``) against one fit at the value it chose.

Goal: the whole search, standardization included, costs at most 3x fitting the head once at
the chosen value. For each cache it times, in this process and one after the other, the
search as train_head runs it and then ``LogisticHead(C=chosen).fit`` (standardize, then
L-BFGS from scratch), and prints their ratio in wall time, CPU time and L-BFGS iterations. The
caches are synthetic (1,280-dimensional float32 rows, five overlapping Gaussian classes, split
70/15/15, written as ``extract`` writes them) at each ``--rows``, and any real embedding
caches given with ``--embeddings`` (e.g. a copy of ``data/embeddings``). Each is searched
twice: on its validation split, and with that split cut to ``--small-val`` images, which
makes the search cross-validate on the training split. ``--mlp`` adds the MLP's alpha search
against ``MLPHead(alpha=chosen).fit`` on each real cache.

    python -m benchmarks.head_search [--rows 20000 60000] [--embeddings DIR ...] [--mlp]
                                     [--threads 1] [--small-val 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from threadpoolctl import threadpool_limits

from benchmarks.head_memory import write_cache
from transfer.embeddings import EmbeddingMeta, load_split
from transfer.head_training import LogisticTrainer, MLPTrainer
from transfer.heads import LogisticHead, MLPHead
from transfer.params import HeadParams, Params

# Class centres this far from the origin, in unit noise: classes that overlap, with room
# to over-fit (see benchmarks.head_memory.write_cache).
SPREAD = 2.5


def timed(run: Callable[[], object]) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(name: str, directory: Path, small_val: int | None, mlp: bool) -> None:
    classes = EmbeddingMeta.read(directory).classes
    X, y, _ = load_split(directory, "train")
    X_val, y_val, _ = load_split(directory, "val")
    X_test, y_test, _ = load_split(directory, "test")
    if small_val:
        X_val, y_val = X_val[:small_val], y_val[:small_val]
    seed = Params().seed  # the pipeline's default, as train_head would run
    if mlp:
        trainer, parameter, unit = MLPTrainer(HeadParams(), seed, classes), "alpha", "epochs"
    else:
        trainer, parameter, unit = LogisticTrainer(HeadParams(), seed, classes), "C", "iterations"
    fitted, search_wall, search_cpu = timed(lambda: trainer.fit(X, y, X_val, y_val))
    search = fitted.search
    chosen = search.chosen
    if mlp:
        once = MLPHead(alpha=chosen, random_state=seed)
        _, fit_wall, fit_cpu = timed(lambda: once.fit(X, y, X_val, y_val))
    else:
        once = LogisticHead(C=chosen)
        _, fit_wall, fit_cpu = timed(lambda: once.fit(X, y))
    test_accuracy = float((fitted.head.predict(X_test) == y_test).mean())
    print(f"{name}: {len(y):,} training rows, {search.held_out.description}\n"
          f"  {parameter}={chosen:g} after {len(search.points)} of {len(trainer.auto_grid)} "
          f"values (test accuracy {test_accuracy:.4f})\n"
          f"  search {search_wall:6.2f} s wall, {search_cpu:6.2f} s CPU, {search.cost:4d} {unit}"
          f"\n  one fit {fit_wall:5.2f} s wall, {fit_cpu:6.2f} s CPU, {once.n_iter_:4d} {unit}"
          f"\n  search / one fit: {search_wall / fit_wall:.2f}x wall, "
          f"{search_cpu / fit_cpu:.2f}x CPU, {search.cost / max(once.n_iter_, 1):.2f}x {unit}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[20000, 60000])
    parser.add_argument("--embeddings", type=Path, nargs="*", default=[])
    parser.add_argument("--small-val", type=int, default=100)
    parser.add_argument("--mlp", action="store_true", help="the MLP's alpha search too")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    args = parser.parse_args()
    with threadpool_limits(args.threads), tempfile.TemporaryDirectory() as scratch:
        caches = [(str(directory), directory) for directory in args.embeddings]
        for rows in args.rows:
            directory = Path(scratch) / f"synthetic{rows}"
            write_cache(directory, rows, spread=SPREAD)
            caches.append((f"synthetic, {rows:,} rows", directory))
        for name, directory in caches:
            compare(name, directory, None, mlp=False)
            compare(name, directory, args.small_val, mlp=False)
        if args.mlp:
            for name, directory in caches[:len(args.embeddings)]:
                compare(name, directory, None, mlp=True)


if __name__ == "__main__":
    main()
