import pytest

from trustray.core.rag.lexical import LexicalIndex, reciprocal_rank_fusion

TEXTS = ["The Eiffel Tower is in Paris.", "Mount Fuji is the highest mountain in Japan.",
         "Paris is the capital of France.", "The Nile flows through Egypt."]


def test_bm25_ranks_word_overlap_first_and_skips_unknown_words():
    index = LexicalIndex([f"d{i}#0" for i in range(4)], ["", "", "", ""], TEXTS)
    [eiffel, fuji, nothing] = index.search(["Where is the Eiffel Tower?", "highest mountain Japan", "zebra"], 3)
    assert eiffel[0][0] == "d0#0" and fuji[0][0] == "d1#0" and len(fuji) == 1
    assert nothing == []
    assert {i for i, _ in index.search(["Paris"], 4)[0]} == {"d0#0", "d2#0"}  # only passages sharing a word
    with pytest.raises(ValueError):
        index.search(["x"], 0)


def test_fusion_rewards_agreement():
    # a: 1/61; b: 2/62; c: 1/63 + 1/61; d: 1/63
    assert reciprocal_rank_fusion([["a", "b", "c"], ["c", "b", "d"]], 4) == ["c", "b", "a", "d"]
    assert reciprocal_rank_fusion([["a", "b", "c"], ["c", "b", "d"]], 2) == ["c", "b"]
    assert reciprocal_rank_fusion([["a", "b"], ["b", "a"]], 1) == ["a"]  # a tie keeps the first seen
    assert reciprocal_rank_fusion([["x"], []], 5) == ["x"]
