"""Keyword blocklist on a prompt: the first text guard (upstream's ``Blocklist`` decisions, our code).

Lists come from ``Cosmos-Guardrail1/blocklist/``: ``custom/`` (censored words and phrases), ``whitelist/`` (words
never censored) and ``exact_match/`` (whole words, plus a fuzzy match for long ones), every file one entry per line.
A prompt is unsafe when

1. it is empty (non-ASCII characters are replaced by spaces first, as upstream);
2. better-profanity, loaded with the ``custom`` list (its own default list is not used) and the whitelist, censors a
   word that is not whitelisted; better-profanity keeps upstream's matching (leetspeak variants such as ``@`` for
   ``a``, multi-word phrases, separators between letters);
3. the same check fires on the lemmatised prompt (nltk ``word_tokenize`` + ``WordNetLemmatizer`` with the nltk data
   shipped in ``blocklist/nltk_data``), so plural and inflected forms are caught;
4. an ``exact_match`` entry appears as a whole word (case and runs of spaces ignored), or, for entries of 6 or
   more characters, a window of as many prompt words has a ``difflib`` similarity >= (len - 0.4) / len (a
   one-letter change in a long word is caught).
"""
from __future__ import annotations

import re
import string
from difflib import SequenceMatcher
from pathlib import Path
from typing import Callable

PARTIAL_MIN_CHARS = 6  # upstream's guardrail_partial_match_min_chars
PARTIAL_LETTERS = 0.4  # upstream's guardrail_partial_match_letter_count
# A prompt is made ASCII before censoring, so a non-ASCII censor mark can never come from the prompt itself.
MARK = "\u2588"


def read_list_dir(folder: Path) -> list[str]:
    """Every line (stripped, blank ones dropped) of every file directly in ``folder``, files in name order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"blocklist folder {folder} does not exist")
    words = []
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        words += [w.strip() for w in f.read_text(encoding="utf-8", errors="replace").splitlines() if w.strip()]
    return words


def to_ascii(text: str) -> str:
    return re.sub(r"[^\x00-\x7F]+", " ", text)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def whole_word_match(prompt: str, words: list[str], min_chars: int = PARTIAL_MIN_CHARS,
                     letters: float = PARTIAL_LETTERS) -> str | None:
    """The ``exact_match`` test: the first entry found (whole word, or fuzzily for long entries), else None."""
    norm = re.sub(r"\s+", " ", prompt).strip().lower()
    tokens = norm.split()
    for word in words:
        w = re.sub(r"\s+", " ", word).strip().lower()
        if not w:
            continue
        if re.search(r"\b" + re.escape(w) + r"\b", norm):
            return f"exact match of {word!r}"
        if len(w) >= min_chars:
            need = (len(w) - letters) / len(w)
            n = len(w.split())
            for i in range(len(tokens) - n + 1):
                window = " ".join(tokens[i:i + n])
                if SequenceMatcher(None, window, w).ratio() >= need:
                    return f"partial match of {word!r} by {window!r}"
    return None


def nltk_lemmatizer(nltk_data: Path) -> Callable[[str], list[str]]:
    """prompt -> lemmas, with nltk and the tokenizer/WordNet data of ``nltk_data`` (no download at run time)."""
    try:
        import nltk
    except ImportError:
        raise ImportError("the blocklist needs nltk: pip install 'mvworld[guardrail]'") from None
    if str(nltk_data) not in nltk.data.path:
        nltk.data.path.append(str(nltk_data))
    lemmatizer = nltk.WordNetLemmatizer()

    def lemmas(text: str) -> list[str]:
        return [lemmatizer.lemmatize(t) for t in nltk.word_tokenize(text)]

    try:
        lemmas("checking the tokenizer and wordnet data load")  # a missing data file fails here, at load time
    except LookupError as exc:  # nltk's message is a framed paragraph: keep the resource name only
        found = re.search(r"Resource (\S+) not found", str(exc))
        raise FileNotFoundError(f"nltk data {found.group(1) if found else ''} not found in {nltk_data} (the "
                                f"tokenizer and WordNet data shipped in Cosmos-Guardrail1/blocklist/nltk_data)") from None
    return lemmas


class Blocklist:
    """``is_safe(prompt) -> (safe, reason)``; ``lemmatize`` defaults to nltk with the checkpoint's data."""

    name = "blocklist"

    def __init__(self, folder: str | Path, lemmatize: Callable[[str], list[str]] | None = None):
        try:
            from better_profanity import Profanity
        except ImportError:
            raise ImportError("the blocklist needs better-profanity: pip install 'mvworld[guardrail]'") from None
        folder = Path(folder)
        self.custom = read_list_dir(folder / "custom")
        self.whitelist = read_list_dir(folder / "whitelist")
        self.exact = read_list_dir(folder / "exact_match")
        self.lemmatize = lemmatize or nltk_lemmatizer(folder / "nltk_data")
        # Only the checkpoint's list, as upstream (the constructor builds it once more without the whitelist:
        # better-profanity offers no other way to skip its default list).
        self.profanity = Profanity(words=self.custom)
        self.profanity.load_censor_words(custom_words=self.custom, whitelist_words=list(self.whitelist))
        self._white = {w.lower() for w in self.whitelist}

    def censored(self, text: str) -> str | None:
        """The censored prompt when better-profanity censors a non-whitelisted word, else None."""
        out = self.profanity.censor(text, censor_char=MARK).split()
        for i, token in enumerate(text.split()):
            # better-profanity's fuzzy matching can censor a whitelisted word: restore it (same split positions)
            if i < len(out) and token.strip(string.punctuation).lower() in self._white:
                out[i] = token
        joined = " ".join(out)
        return joined.replace(MARK * 4, "****").replace(MARK, "*") if MARK in joined else None

    def is_safe(self, prompt: str) -> tuple[bool, str]:
        if not prompt or not prompt.strip():
            return False, "the prompt is empty"
        prompt = to_ascii(prompt)
        hit = self.censored(prompt)
        if hit is not None:
            return False, f"blocked word in the prompt (censored: {_one_line(hit)})"
        hit = self.censored(" ".join(self.lemmatize(prompt)))
        if hit is not None:
            return False, f"blocked word in the lemmatised prompt (censored: {_one_line(hit)})"
        hit = whole_word_match(prompt, self.exact)
        if hit is not None:
            return False, f"blocked word in the prompt ({hit})"
        return True, ""
