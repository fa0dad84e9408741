"""Anomaly-size curriculum: the schedule, its effect on the drawn anomalies, and its path into the samples."""
import numpy as np
import pytest

from condiff.train import shapes, tasks
from condiff.train.curriculum import SizeCurriculum, parse_size_curriculum
from condiff.train.data import TaskSamples


def _mri(size=64):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2 + 0.5, xx - size / 2 + 2)
    values = 0.3 + 0.4 * np.sin(yy / 5) ** 2 * np.cos(xx / 7) ** 2
    return np.where(r < 0.4 * size, values, 0.0)[None].astype(np.float32)


def test_schedule_falls_linearly_from_start_to_one_and_stays_there():
    c = SizeCurriculum(2.5, 1000)
    assert c.active
    assert c.scale_at_step(0) == 2.5 and c.scale_at_step(-5) == 2.5
    assert c.scale_at_step(500) == pytest.approx(1.75)
    assert c.scale_at_step(1000) == 1.0 and c.scale_at_step(10**6) == 1.0
    steps = np.arange(0, 1200, 37)
    scales = [c.scale_at_step(s) for s in steps]
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    assert not SizeCurriculum().active and SizeCurriculum().scale_at_step(0) == 1.0
    assert not SizeCurriculum(1.0, 500).active and not SizeCurriculum(3.0, 0).active


def test_epoch_scale_maps_an_epoch_to_the_step_where_it_starts():
    c = SizeCurriculum(3.0, 100)
    at = c.epoch_scale(n_samples=250, global_batch=50)  # 5 steps per epoch
    assert at(0) == 3.0
    assert at(10) == pytest.approx(c.scale_at_step(50)) == pytest.approx(2.0)
    assert at(20) == 1.0
    with pytest.raises(ValueError):
        c.epoch_scale(0, 8)


@pytest.mark.parametrize("text, expected", [("2:4000", (2.0, 4000)), ("0.5:10", (0.5, 10)), ("", (1.0, 0)),
                                            (None, (1.0, 0)), ("none", (1.0, 0)), ("OFF", (1.0, 0)),
                                            ("1:500", (1.0, 0)), ("3:0", (1.0, 0))])
def test_parse(text, expected):
    c = parse_size_curriculum(text)
    assert (c.start, c.steps) == expected


@pytest.mark.parametrize("text", ["2", "2:x", "a:10", "2:10:3", "0:100", "2:-1"])
def test_parse_rejects_malformed_or_impossible_values(text):
    with pytest.raises(ValueError, match="size curriculum"):
        parse_size_curriculum(text)


def test_side_lengths_stretch_before_the_clip_and_draw_the_same_numbers():
    lb, ub, hw = np.array([4, 4]), np.array([51, 51]), (64, 64)
    for seed in range(50):
        g = np.random.default_rng(seed).gamma(shapes.GAMMA_SHAPE, shapes.GAMMA_SCALE, size=2)
        raw = (shapes.GAMMA_OFFSET + g) * np.asarray(hw)
        for scale in (1.0, 1.7):
            rng = np.random.default_rng(seed)
            d = shapes.sample_side_lengths(lb, ub, hw, rng, scale)
            assert np.array_equal(d, np.clip(scale * raw, lb, ub).astype(int))
        # Both scales leave the generator in the same state: later draws do not shift.
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        shapes.sample_side_lengths(lb, ub, hw, a, 1.0)
        shapes.sample_side_lengths(lb, ub, hw, b, 2.0)
        assert a.random() == b.random()


def test_a_stretched_task_corrupts_more_of_the_image_and_scale_one_is_the_reference():
    image = _mri()
    pool = tasks.ArrayPool(np.stack([image, image[:, :, ::-1]]))
    task = tasks.RestorationTask((0, 2, 4), p_no_task=0.0, same_pool=pool, has_background=True)
    areas = {1.0: [], 2.0: []}
    for seed in range(40):
        for scale in areas:
            _, mask, _ = task(image, np.random.default_rng(seed), size_scale=scale)
            areas[scale].append(mask.sum())
        plain = task(image, np.random.default_rng(seed))
        same = task(image, np.random.default_rng(seed), size_scale=1.0)
        assert np.array_equal(plain[0], same[0]) and np.array_equal(plain[1], same[1]) and plain[2] == same[2]
    assert np.mean(areas[2.0]) > 1.8 * np.mean(areas[1.0])


def test_task_samples_pass_the_epoch_scale_to_the_task_and_stay_keyed():
    seen = []

    def task(image, rng, size_scale=1.0):
        seen.append(size_scale)
        return image.copy(), np.zeros(image.shape[1:], bool), None

    images = np.stack([_mri(32)] * 4)
    at = SizeCurriculum(2.0, 8).epoch_scale(n_samples=4, global_batch=2)  # 2 steps per epoch
    samples = TaskSamples(images, task, seed=3, size_scale_at=at)
    first = samples[(0, 1)]
    samples[(2, 1)]
    samples[(9, 1)]
    assert seen == [2.0, pytest.approx(1.5), 1.0]
    again = samples[(0, 1)]
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)  # the key decides
    seen.clear()
    TaskSamples(images, lambda im, rng: (im.copy(), np.zeros(im.shape[1:], bool), None), seed=3)[(0, 0)]
    assert seen == []  # without a curriculum the task is called as before, with two arguments


def test_an_epoch_may_start_between_two_steps():
    """250 samples, global batch 64: epoch e starts at step 250·e/64 (not rounded), so the scale is continuous."""
    c = SizeCurriculum(3.0, 100)
    at = c.epoch_scale(n_samples=250, global_batch=64)
    for epoch in (1, 3, 7, 25):
        assert at(epoch) == pytest.approx(3.0 - 2.0 * min(250 * epoch / 64, 100) / 100, rel=1e-12)
