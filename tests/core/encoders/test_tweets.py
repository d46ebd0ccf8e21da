"""Tweet text as tweets: what the offline text encoder sees with its ``tweets`` option."""

from __future__ import annotations

import pytest

from core.encoders.tweets import normalise_tweet


@pytest.mark.parametrize(
    ("tweet", "seen"),
    [
        ("look https://t.co/x7Gq and www.example.com/a?b=1", "look http and http"),
        ("RT @JohnDoe_1: hi @a", "RT @user: hi @user"),
        ("mail me at a@b.com", "mail me at a@b.com"),  # an address is not a mention
        ("#NeverAgain #NYCMarathon #Top10 #happy_days", "Never Again NYC Marathon Top 10 happy days"),
        ("great day 😂👍🏽", "great day face with tears of joy thumbs up sign"),  # skin tone dropped
        ("I ❤️ it", "I heavy black heart it"),  # variation selector dropped
        ("café déjà vu — ok", "café déjà vu — ok"),  # letters and punctuation untouched
    ],
)
def test_urls_mentions_hashtags_and_emoji_become_words(tweet: str, seen: str) -> None:
    assert normalise_tweet(tweet) == seen


def test_normalising_twice_changes_nothing() -> None:
    once = normalise_tweet("RT @x: #HappyDays 😍 http://a.b/c")
    assert normalise_tweet(once) == once
