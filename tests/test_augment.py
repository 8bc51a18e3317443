"""Feature-space augmentation: seeded by (seed, epoch), views stay with their tile, noise follows
per-dimension std, mixup stays within a class."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from embedstore.heads.augment import (
    AugmentConfig, ViewBank, add_noise, augment_epoch, epoch_generator, feature_dropout,
    mixup_within_class, parse_augment, sample_views,
)
from embedstore.errors import HeadError


def bank_with_marked_views(n: int = 300, dim: int = 6, seed: int = 0):
    """Tile ``i`` has id ``1000 + i``, 0-4 views; each view's first feature is its tile id and its
    second feature its view number, so every gathered row says whose view it is."""
    rng = np.random.default_rng(seed)
    ids = 1000 + np.arange(n, dtype=np.int64)
    k = rng.integers(0, 5, size=n)
    view_ids = np.repeat(ids, k)
    view_num = np.concatenate([np.arange(c) for c in k]).astype(np.float32)
    shuffle = rng.permutation(view_ids.size)                    # the store's bank order is arbitrary
    view_ids, view_num = view_ids[shuffle], view_num[shuffle]
    view_emb = np.zeros((view_ids.size, dim), np.float32)
    view_emb[:, 0], view_emb[:, 1] = view_ids, view_num + 1     # originals have 0 in column 1
    x = np.zeros((n, dim), np.float32)
    x[:, 0] = ids
    return ids, k, ViewBank.build(ids, view_ids, view_emb), x


def test_parse_augment_round_trip_and_errors():
    cfg = parse_augment("views,noise=0.1,mixup=0.2,dropout=0.1")
    assert cfg == AugmentConfig(views=True, noise=0.1, mixup=0.2, dropout=0.1)
    assert parse_augment(str(cfg)) == cfg
    assert parse_augment("views, p_original=0.5").p_original == 0.5
    assert parse_augment(None) == parse_augment("none") == AugmentConfig()
    assert not AugmentConfig().active and cfg.active
    for bad, msg in (("noise", "unknown augmentation"), ("rotate=3", "unknown augmentation"),
                     ("noise=abc", "needs a number"), ("dropout=1.5", "dropout must be"),
                     ("p_original=0.3", "only applies with views"), ("mixup=-1", "mixup must be")):
        with pytest.raises(HeadError, match=msg):
            parse_augment(bad)


def test_view_bank_groups_each_tiles_views():
    ids, k, bank, _ = bank_with_marked_views()
    assert np.array_equal(bank.counts, k)
    assert np.array_equal(bank.base_ids, np.repeat(ids, k))
    assert np.array_equal(bank.emb[:, 0].astype(np.int64), bank.base_ids)
    sub = bank.take(np.array([5, 2, 9]))
    assert np.array_equal(sub.ids, ids[[5, 2, 9]])
    assert np.array_equal(sub.base_ids, np.repeat(ids[[5, 2, 9]], k[[5, 2, 9]]))


def test_view_sampling_is_reproducible_varies_by_epoch_and_is_uniform():
    counts = np.full(20000, 3)
    a = sample_views(counts, seed=4, epoch=0)
    assert np.array_equal(a, sample_views(counts, seed=4, epoch=0))
    assert (a != sample_views(counts, seed=4, epoch=1)).mean() > 0.5
    assert (a != sample_views(counts, seed=5, epoch=0)).mean() > 0.5
    freq = np.bincount(a + 1, minlength=4) / a.size                 # original + 3 views
    assert np.allclose(freq, 0.25, atol=0.015)
    b = sample_views(counts, seed=4, epoch=0, p_original=0.7)
    assert abs((b == -1).mean() - 0.7) < 0.015
    assert np.allclose(np.bincount(b[b >= 0], minlength=3) / (b >= 0).sum(), 1 / 3, atol=0.02)
    assert (sample_views(np.zeros(10, int), 0, 0) == -1).all()       # no views: always original


def test_epoch_views_never_mix_tiles():
    ids, k, bank, x = bank_with_marked_views()
    xt = torch.from_numpy(x)
    cfg = AugmentConfig(views=True)
    y = np.zeros(len(ids), dtype=np.int64)
    seen_views = 0
    outs = []
    for epoch in range(4):
        out = augment_epoch(xt, y, cfg, seed=1, epoch=epoch, bank=bank).numpy()
        assert np.array_equal(out[:, 0].astype(np.int64), ids)      # every row is its own tile
        assert (out[:, 1] <= k).all()                                # and only its own view numbers
        assert (out[k == 0, 1] == 0).all()
        seen_views += int((out[:, 1] > 0).sum())
        outs.append(out)
    assert seen_views > 0
    again = augment_epoch(xt, y, cfg, seed=1, epoch=2, bank=bank).numpy()
    assert np.array_equal(again, outs[2]) and not np.array_equal(outs[1], outs[2])
    assert np.array_equal(xt.numpy(), x)                              # input untouched


def test_noise_scales_with_per_dimension_std():
    std = torch.tensor([0.1, 1.0, 5.0, 20.0])
    x = torch.zeros(40000, 4)
    out = add_noise(x, 0.3, std, epoch_generator(0, 0))
    measured = out.std(dim=0)
    assert torch.allclose(measured, 0.3 * std, rtol=0.03)
    assert torch.equal(out, add_noise(x, 0.3, std, epoch_generator(0, 0)))
    assert not torch.equal(out, add_noise(x, 0.3, std, epoch_generator(0, 1)))


def test_mixup_never_mixes_across_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=2000)
    x = np.zeros((y.size, 4 + 3), np.float32)
    x[np.arange(y.size), y] = 1.0 + rng.random(y.size)                # class indicator, varying
    x[:, 4:] = rng.normal(size=(y.size, 3))
    out = mixup_within_class(torch.from_numpy(x), y, 0.4, np.random.default_rng(1)).numpy()
    other = np.ones_like(out[:, :4], dtype=bool)
    other[np.arange(y.size), y] = False
    assert (out[:, :4][other] == 0).all()                            # no trace of another class
    own = out[np.arange(y.size), y]
    assert ((own >= 1.0 - 1e-6) & (own <= 2.0 + 1e-6)).all()         # convex mix of own class
    assert np.abs(out - x).max() > 0.1                                # it did mix


def test_feature_dropout_rate_and_scale():
    x = torch.ones(500, 400)
    out = feature_dropout(x, 0.2, epoch_generator(3, 0))
    zero = (out == 0).float().mean().item()
    assert abs(zero - 0.2) < 0.01
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.8))
    assert abs(out.mean().item() - 1.0) < 0.02


def test_composed_augmentation_is_seeded_by_seed_and_epoch():
    ids, k, bank, x = bank_with_marked_views(n=200)
    x[:, 2:] = np.random.default_rng(2).normal(size=(200, 4))
    y = np.arange(200) % 3
    cfg = parse_augment("views,noise=0.1,mixup=0.2,dropout=0.1")
    a = augment_epoch(torch.from_numpy(x), y, cfg, seed=9, epoch=3, bank=bank)
    b = augment_epoch(torch.from_numpy(x), y, cfg, seed=9, epoch=3, bank=bank)
    c = augment_epoch(torch.from_numpy(x), y, cfg, seed=9, epoch=4, bank=bank)
    assert torch.equal(a, b) and not torch.equal(a, c)
