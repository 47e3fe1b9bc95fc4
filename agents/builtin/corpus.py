"""A multi-agent pipeline shipped with the platform: a corpus split into documents, each analysed in
parallel by `text_stats` (cacheable: a document seen before comes from the result cache, and copies
in flight at once share one execution), and one report aggregated from the analyses."""

import re
from collections import Counter

from pydantic import BaseModel, Field

from agents.registry import agent
from agents.workflows import Step, ref, workflow

# Documents are separated by a line holding only three or more dashes (or equals signs).
SEPARATOR = re.compile(r"^\s*(?:-{3,}|={3,})\s*$", re.MULTILINE)


class SplitInput(BaseModel):
    text: str = Field(max_length=900_000, description="The corpus: documents separated by a line of ---.")


@agent(name="corpus.split", input=SplitInput, soft_time_limit=30, time_limit=45)
def split(ctx, input: SplitInput) -> dict:
    """Split a corpus into its documents (blank ones left out)."""
    documents = [part.strip() for part in SEPARATOR.split(input.text)]
    return {"documents": [document for document in documents if document]}


class AggregateInput(BaseModel):
    analyses: list[dict] = Field(description="text_stats results, one per document.")
    top: int = Field(default=10, ge=0, le=100)


@agent(name="corpus.aggregate", input=AggregateInput, soft_time_limit=30, time_limit=45)
def aggregate(ctx, input: AggregateInput) -> dict:
    """One report over every document's statistics: totals, the longest document, the corpus's top terms."""
    terms: Counter[str] = Counter()
    for analysis in input.analyses:
        for entry in analysis.get("top_terms", []):
            terms[entry["term"]] += entry["count"]
    words = [analysis.get("words", 0) for analysis in input.analyses]
    return {
        "documents": len(input.analyses),
        "words": sum(words),
        "sentences": sum(analysis.get("sentences", 0) for analysis in input.analyses),
        "longest_document_words": max(words, default=0),
        "reading_time_seconds": round(sum(a.get("reading_time_seconds", 0) for a in input.analyses), 1),
        "top_terms": [
            {"term": term, "count": count}
            for term, count in sorted(terms.items(), key=lambda item: (-item[1], item[0]))[: input.top]
        ],
    }


class ReportInput(BaseModel):
    text: str = Field(max_length=900_000, description="The corpus: documents separated by a line of ---.")


corpus_report = workflow(
    name="corpus.report",
    input=ReportInput,
    description="Split a corpus into documents, analyse each in parallel (text_stats), aggregate one report.",
    steps=[
        Step("split", agent="corpus.split", input={"text": ref("input.text")}),
        Step("analyse", agent="text_stats", map=ref("split.documents"), input={"text": ref("item")}),
        Step("report", agent="corpus.aggregate", input={"analyses": ref("analyse")}),
    ],
)
