"""The inference fast paths against the fp32 reference path."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from perceptclip.model.artifact import load_artifact
from perceptclip.model.preprocess import decode_image
from perceptclip.model.scorer import Scorer
from support.images import image_bytes, make_image


@pytest.fixture(scope="module")
def crops(iqa_artifact):
    scorer = Scorer.load(iqa_artifact, device="cpu")
    return [scorer.preprocess(decode_image(image_bytes(make_image(i, (64 + i, 48 + i))))) for i in range(64)]


def test_bf16_scores_rank_like_fp32(iqa_artifact, crops):
    fp32 = Scorer.load(iqa_artifact, device="cpu", precision="fp32").score(crops)[:, 0]
    bf16 = Scorer.load(iqa_artifact, device="cpu", precision="bf16").score(crops)[:, 0]
    assert not np.array_equal(fp32, bf16)                         # bf16 really ran
    assert spearmanr(fp32, bf16).statistic >= 0.999


def test_merged_sdpa_path_equals_unmerged_reference_in_fp32(iqa_artifact, crops):
    scorer = Scorer.load(iqa_artifact, device="cpu", precision="fp32")
    model, meta = load_artifact(iqa_artifact)                      # unmerged, LoRA applied per forward
    from perceptclip.model.preprocess import normalize

    with torch.no_grad():
        reference = np.stack([model(normalize(torch.from_numpy(c), meta.preprocess.mean, meta.preprocess.std)).mean(0).numpy()
                              for c in crops])
    np.testing.assert_allclose(scorer.score(crops), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_equals_eager(iqa_artifact, crops):
    """torch.compile gives the eager scores. (Slow: compiling takes seconds.)"""
    eager = Scorer.load(iqa_artifact, device="cpu", precision="fp32").score(crops[:8])
    compiled = Scorer.load(iqa_artifact, device="cpu", precision="fp32", compile=True).score(crops[:8])
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-6)


def test_batch_composition_does_not_change_a_score(iqa_artifact, crops):
    scorer = Scorer.load(iqa_artifact, device="cpu", precision="fp32")
    together = scorer.score(crops[:10])
    alone = np.concatenate([scorer.score([c]) for c in crops[:10]])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_one_stacked_array_scores_as_the_list_of_its_images(iqa_artifact, crops):
    """The scoring job hands over its block's crops as one (images, crops, 3, S, S) array; images with
    different numbers of crops still go as a list."""
    scorer = Scorer.load(iqa_artifact, device="cpu", precision="fp32")
    as_list = scorer.score(crops[:12])
    np.testing.assert_allclose(scorer.score(np.stack(crops[:12])), as_list, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scorer.score(torch.from_numpy(np.stack(crops[:12]))), as_list, rtol=1e-6, atol=1e-7)
    assert crops[0].shape[0] > 1                                    # the IQA preset averages several crops
    uneven = [crops[0], crops[1][:1], crops[2]]
    alone = np.concatenate([scorer.score([c]) for c in uneven])
    np.testing.assert_allclose(scorer.score(uneven), alone, rtol=1e-5, atol=1e-6)
    assert scorer.score(np.zeros((0, *crops[0].shape), np.uint8)).shape == (0, 1)
    with pytest.raises(ValueError, match="expected \\(images, crops, 3, S, S\\)"):
        scorer.score(np.stack(crops[:2])[:, 0])


def test_unknown_precision_is_refused(iqa_artifact):
    with pytest.raises(ValueError, match="precision must be one of"):
        Scorer.load(iqa_artifact, device="cpu", precision="int4")


def test_jpeg_draft_decoding_keeps_the_source_size_and_stays_close():
    data = image_bytes(make_image(9, (683, 512)), quality=90)
    full, draft = decode_image(data), decode_image(data, draft_size=224)
    assert draft.size == (342, 256) and full.size == (683, 512)
    assert draft.info["source_size"] == full.info["source_size"] == (683, 512)
    small = np.asarray(full.resize(draft.size), dtype=np.float32)
    assert np.abs(small - np.asarray(draft, dtype=np.float32)).mean() < 12     # same picture, other filter


@pytest.mark.gpu
def test_gpu_bf16_scores_rank_like_cpu_fp32(iqa_artifact, crops):
    fp32 = Scorer.load(iqa_artifact, device="cpu", precision="fp32").score(crops)[:, 0]
    gpu = Scorer.load(iqa_artifact, device="cuda").score(crops)[:, 0]
    assert spearmanr(fp32, gpu).statistic >= 0.999
