"""Content digests of the processor's tensors (`services.engines.digests`): a tensor that comes back is proven equal
by a compare, not hashed again, and the digest still says exactly what the content is."""

from __future__ import annotations

import torch

from services.engines.digests import TensorDigests


def test_a_tensor_seen_again_in_a_new_tensor_gets_its_digest_without_a_hash():
    digests = TensorDigests()
    features = torch.randn(128, 2400)
    first = [digests.digest(features[:, w:w + 800]) for w in (0, 800, 1600)]
    assert digests.hashed == 3 and len(set(first)) == 3
    again = features.clone()  # the next render of the same audio: other memory, same values
    assert [digests.digest(again[:, w:w + 800]) for w in (0, 800, 1600)] == first
    assert digests.hashed == 3 and digests.reused == 3
    assert digests.digest(features[:, :800].contiguous()) == first[0]  # layout does not matter, content does


def test_other_contents_get_other_digests():
    digests = TensorDigests()
    zeros = torch.zeros(128, 800)
    unsampled = zeros.clone()
    unsampled[1, 1] = 1.0  # between the values that find the candidates: only the compare tells them apart
    negative = zeros.clone()
    negative[5, 7] = -0.0  # equal by value, not by content
    seen = [digests.digest(t) for t in (zeros, unsampled, negative, torch.zeros(128, 800, dtype=torch.int32),
                                         torch.zeros(800, 128), torch.tensor(0.5), torch.tensor(0.25))]
    assert len(set(seen)) == len(seen)
    assert digests.hashed == len(seen) and digests.reused == 0


def test_a_write_to_a_tensor_after_its_digest_does_not_change_what_its_old_content_gets():
    digests = TensorDigests()
    t = torch.randn(64, 64)
    before = t.clone()
    digest = digests.digest(t)
    t += 1.0
    assert digests.digest(t) != digest
    assert digests.digest(before) == digest


def test_the_tensors_kept_are_bounded_in_bytes():
    digests = TensorDigests(max_bytes=2**20)
    seen = [digests.digest(torch.full((256, 256), float(i))) for i in range(12)]  # 256 KiB each
    assert 0 < digests.nbytes <= 2**20
    assert digests.digest(torch.full((256, 256), 11.0)) == seen[11] and digests.reused == 1  # the latest is kept
    assert digests.digest(torch.full((256, 256), 0.0)) == seen[0] and digests.hashed == 13  # the first is not
