"""Tweet text as tweets, before a general-purpose tokenizer sees it (the offline encoder's ``tweets`` option).

A sentence encoder trained on web prose splits ``https://t.co/x7Gq`` into a dozen meaningless word pieces, reads
``#NeverAgain`` as one unknown word and maps every emoji to ``[UNK]``.  Each step below is the usual fix
(TweetEval, BERTweet): a URL becomes ``http``, a mention ``@user``, a hashtag its words, an emoji its Unicode
name.  Which steps pay is measured under cross-validation (docs/evaluation.md).
"""

from __future__ import annotations

import re
import unicodedata

_URL = re.compile(r"(?:https?://|www\.)\S+|\bpic\.twitter\.com/\S+", re.IGNORECASE)
_MENTION = re.compile(r"(?<!\w)@\w{1,15}")
_HASHTAG = re.compile(r"(?<!\w)#(\w+)")
# Word boundaries inside a hashtag: lower→upper ("NeverAgain"), letter↔digit ("Top10"), acronym→word ("NYCMarathon").
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPACES = re.compile(r"\s+")


def _hashtag_words(match: re.Match[str]) -> str:
    return " ".join(part for part in _CAMEL.split(match.group(1).replace("_", " ")) if part)


def _emoji_name(char: str) -> str:
    """' smiling face with heart-shaped eyes ' for an emoji (a symbol of category So), the character otherwise;
    skin-tone modifiers and variation selectors are dropped."""
    if unicodedata.category(char) != "So":
        return "" if "\ufe00" <= char <= "\ufe0f" or "\U0001f3fb" <= char <= "\U0001f3ff" else char
    name = unicodedata.name(char, "")
    return f" {name.lower()} " if name else char


def normalise_tweet(text: str) -> str:
    """URLs → ``http``, mentions → ``@user``, hashtags → their words, emoji → their names; whitespace collapsed."""
    text = _URL.sub(" http ", text)
    text = _MENTION.sub("@user", text)
    text = _HASHTAG.sub(_hashtag_words, text)
    text = "".join(_emoji_name(c) if ord(c) > 0x2000 else c for c in text)
    return _SPACES.sub(" ", text).strip()
