"""One image, one score at any thread count: on a CPU every model call runs on the canonical number of
intra-op threads, so ``Scorer``, ``predict``, the job and ``add_scores`` give an image the same bits
whether torch is set to 1, 2 or 4 threads (a 1-CPU actor, a 2-core laptop, a 4-CPU actor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptclip.model.batching import CPU_THREADS
from perceptclip.model.preprocess import decode_image
from perceptclip.model.scorer import Scorer
from support.images import image_bytes, make_image
from support.wide_model import make_thread_sensitive_artifact

THREADS = (1, 2, 4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_thread_sensitive_artifact(str(tmp_path_factory.mktemp("threads") / "wide"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(3):
        path = folder / f"p{i}.jpg"
        path.write_bytes(image_bytes(make_image(40 + i, (240, 230))))
        paths.append(str(path))
    return paths


def scores_at(scorer: Scorer, crops, threads: int) -> np.ndarray:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return scorer.score(crops)
    finally:
        torch.set_num_threads(before)


def test_unpinned_calls_give_other_bits_at_other_thread_counts(model, images):
    """The premise: where this machine's kernels split this model's sums by thread, the tests of bits below
    can fail. Some CPUs' kernels (seen on an AMD EPYC with MKL) give the same bits at any thread count: the
    premise is then skipped and ``test_every_cpu_model_call_runs_on_the_canonical_thread_count`` alone
    checks the pinning."""
    scorer = Scorer.load(model, device="cpu", threads=0)
    crops = [scorer.preprocess(decode_image(open(p, "rb").read())) for p in images]
    results = [scores_at(scorer, crops, n) for n in THREADS]
    if all(np.array_equal(results[0], other) for other in results[1:]):
        pytest.skip(f"this machine's kernels give this model the same bits at {THREADS} threads")


def test_every_cpu_model_call_runs_on_the_canonical_thread_count(model, images):
    """Whatever torch is set to, the model runs on ``CPU_THREADS`` intra-op threads (``threads=0``: on
    torch's setting), and torch's setting is what it was after the call."""
    seen = []
    for threads, during in ((None, CPU_THREADS), (0, 3)):
        scorer = Scorer.load(model, device="cpu", threads=threads)
        hook = scorer.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        crops = [scorer.preprocess(decode_image(open(p, "rb").read())) for p in images]
        before = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            scorer.score(crops)
            assert torch.get_num_threads() == 3
        finally:
            torch.set_num_threads(before)
            hook.remove()
        assert seen and set(seen) == {during}
        seen.clear()


def test_scorer_gives_the_same_bits_at_any_thread_count(model, images):
    scorer = Scorer.load(model, device="cpu")
    assert scorer.threads == CPU_THREADS and scorer.describe()["threads"] == CPU_THREADS
    crops = [scorer.preprocess(decode_image(open(p, "rb").read())) for p in images]
    results = [scores_at(scorer, crops, n) for n in THREADS]
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_predict_gives_the_bits_of_a_one_thread_scorer(model, images):
    from perceptclip.model.predict import load_scorers, predict

    alone = Scorer.load(model, device="cpu")
    crops = [alone.preprocess(decode_image(open(p, "rb").read())) for p in images]
    expected = scores_at(alone, crops, 1)[:, 0]
    for n in (2, 4):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            rows = list(predict(images, load_scorers([model], device="cpu"), batch_size=2))
        finally:
            torch.set_num_threads(before)
        assert [np.float32(r["memorability"]) for r in rows] == list(expected)


@pytest.mark.slow
def test_the_job_and_add_scores_give_the_same_bits_at_any_actor_thread_count(model, images, tmp_path, ray_local):
    """A model whose sums depend on the thread count (``make_thread_sensitive_artifact``): the job's actor on
    4 threads, the job's steps on 1, and ``add_scores`` on the actor's default give the same bits."""
    import pyarrow.parquet as pq

    import perceptclip
    from perceptclip.scoring.config import ScoreConfig
    from perceptclip.scoring.job import run_score
    from support.scoring import score_here

    folder = str(images[0].rsplit("/", 1)[0])
    # the job's model actor on 4 threads; the job's steps in this process on 1
    run_score(ScoreConfig(input=[folder], output=str(tmp_path / "out-4"), models=[model], torch_threads=4))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        score_here([folder], [model], str(tmp_path / "out-1"))
    finally:
        torch.set_num_threads(before)
    tables = []
    for n in (1, 4):
        table = pq.read_table(tmp_path / f"out-{n}" / f"{folder.rsplit('/', 1)[1]}-000000.parquet")
        tables.append(dict(zip(table["key"].to_pylist(), table["memorability"].to_pylist())))
    assert tables[0] == tables[1]

    ds = ray_local.data.read_binary_files(folder, include_paths=True)
    rows = perceptclip.add_scores(ds, [model], image_column="bytes").take_all()
    added = {r["path"].rsplit("/", 1)[1]: r["memorability"] for r in rows}
    assert added == tables[0]
