from agents.builtin.text_stats import TextStatsInput, text_stats


def stats(text: str, top: int = 10) -> dict:
    return text_stats(None, TextStatsInput(text=text, top=top))


def test_words_and_sentences_are_counted():
    result = stats("It's a well-known fact. Cats sleep! Do dogs? Yes")

    assert result["words"] == 9
    assert result["sentences"] == 4


def test_top_terms_leave_out_stop_words_and_rank_by_count_then_name():
    result = stats("The rain in Spain. The rain falls. Spain is dry; rain.", top=2)

    assert result["top_terms"] == [{"term": "rain", "count": 3}, {"term": "spain", "count": 2}]


def test_reading_time_follows_238_words_a_minute():
    assert stats("word " * 238)["reading_time_seconds"] == 60.0


def test_an_empty_document_has_no_words_or_sentences():
    result = stats("")

    assert (result["words"], result["sentences"], result["average_sentence_words"]) == (0, 0, 0.0)
