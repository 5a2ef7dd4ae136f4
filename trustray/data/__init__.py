"""Bundled corpora and datasets in standard formats, plus loaders for users' own JSONL/Parquet files."""

from trustray.data.corpus import load_corpus, load_wiki_corpus
from trustray.data.io import read_jsonl, read_table, write_jsonl
from trustray.data.qa import load_fanoutqa_single_hop, load_qa, load_rag_dev

__all__ = [
    "load_corpus",
    "load_fanoutqa_single_hop",
    "load_qa",
    "load_rag_dev",
    "load_wiki_corpus",
    "read_jsonl",
    "read_table",
    "write_jsonl",
]
