import re
from collections import Counter

from pydantic import BaseModel, Field

from agents.registry import agent

WORDS_PER_MINUTE = 238  # average adult silent reading speed for non-fiction
# Letters, with inner apostrophes (straight or typographic) and hyphens: "don't", "well-known".
WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves
    """.split()
)


class TextStatsInput(BaseModel):
    text: str = Field(max_length=500_000, description="The document.")
    top: int = Field(default=10, ge=0, le=100, description="How many of the most frequent terms to list.")


@agent(name="text_stats", input=TextStatsInput, cache_ttl=3600, soft_time_limit=30, time_limit=45)
def text_stats(ctx, input: TextStatsInput) -> dict:
    """Statistics of a document: words, sentences, top terms (stop words left out) and reading time."""
    words = [word.lower() for word in WORD.findall(input.text)]
    stripped = input.text.strip()
    sentences = len(SENTENCE_END.findall(stripped))
    if stripped and not SENTENCE_END.search(stripped[-1:] + " "):
        sentences += 1  # a last sentence without its full stop
    terms = Counter(word for word in words if word not in STOPWORDS and len(word) > 1)
    return {
        "characters": len(input.text),
        "words": len(words),
        "unique_words": len(set(words)),
        "sentences": sentences,
        "average_sentence_words": round(len(words) / sentences, 2) if sentences else 0.0,
        "top_terms": [
            {"term": term, "count": count}
            for term, count in sorted(terms.items(), key=lambda item: (-item[1], item[0]))[: input.top]
        ],
        "reading_time_seconds": round(len(words) * 60 / WORDS_PER_MINUTE, 1),
    }
