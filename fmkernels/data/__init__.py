"""Data: the embedded standard-library corpus, user corpora, tokenizers, memory-mapped token caches."""
from .corpus import CorpusError, load_documents, split_documents, stdlib_documents, stdlib_files, user_documents
from .dataset import BatchSampler, DataBundle, bits_per_byte, eval_windows, prepare_data
from .tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "CorpusError", "user_documents", "load_documents", "split_documents", "stdlib_documents", "stdlib_files",
    "BatchSampler", "DataBundle", "bits_per_byte", "eval_windows", "prepare_data",
    "BPETokenizer", "ByteTokenizer", "load_tokenizer",
]
