"""The one retry-delay formula of the LLM client and the downloader."""

import random

from medvlm.utils.backoff import backoff_delay


def test_delay_doubles_is_jittered_within_half_to_whole_and_is_capped():
    rng = random.Random(0)
    for retry, whole in enumerate((0.5, 1.0, 2.0, 4.0, 5.0, 5.0)):
        delays = [backoff_delay(retry, 0.5, 5.0, rng=rng) for _ in range(200)]
        assert all(whole / 2 <= d <= whole for d in delays), (retry, min(delays), max(delays))
        assert max(delays) - min(delays) > whole / 4  # jittered, not a fixed delay
    assert backoff_delay(10_000, 1.0, 60.0) <= 60.0  # no overflow on a very late retry


def test_a_retry_after_hint_raises_the_delay_within_the_cap():
    assert backoff_delay(0, 0.1, 30.0, hint=7.0) == 7.0
    assert backoff_delay(0, 0.1, 30.0, hint=120.0) == 30.0
    assert 0.05 <= backoff_delay(0, 0.1, 30.0, hint=0.0) <= 0.1
